"""A LoRA layer's forward plan (plans.py) is chosen when its state changes: after any sequence of public state
changes, every forward equals the generic path of a fresh copy (fused = False, plan chosen anew)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loraplex as lp
from loraplex.errors import LoraplexError
from loraplex.functional import tolerance
from loraplex.layers import LoraLinear
from loraplex.models import tiny_mlp
from loraplex.plans import BasePlan, FusedPlan, SumPlan

NAMES = ("a", "b", "c", "d")
X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Module:
    model = tiny_mlp(seed=1)
    linear = ["net.0", "net.2", "head"]
    configs = {
        "a": dict(target_modules=linear),
        "b": dict(target_modules=["net.0", "head"], lora_dropout=0.3),
        "c": dict(target_modules=["net.0", "head"], lora_bias=True),
        "d": dict(target_modules=["net.2", "head"], use_dora=True),
    }
    for seed, (name, kw) in enumerate(configs.items()):
        lp.inject(model, lp.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw), name, seed=seed)
    return model


def _hook(module, args, out):  # a hook that changes the base's output: a path that skips hooks shows
    return out * 2


def _apply(model: torch.nn.Module, op: tuple, hooks: list) -> None:
    kind, arg = op
    if kind == "active":
        lp.set_active(model, arg)
    elif kind == "merge":
        lp.merge(model, arg)
    elif kind == "unmerge":
        lp.unmerge(model, arg)
    elif kind == "train":
        model.train(arg)
    elif kind == "base_grad":  # training code freezes / unfreezes base weights directly
        for _, layer in lp.lora_layers(model):
            layer.base_layer.weight.requires_grad_(arg)
    elif kind == "hook":
        if arg and not hooks:
            hooks.append(model.net[0].base_layer.register_forward_hook(_hook))
        elif not arg and hooks:
            hooks.pop().remove()
    elif kind == "readd":  # remove an adapter and add it again (a new init)
        lp.remove_adapter(model, arg)
        lp.inject(model, lp.LoraConfig(r=3, target_modules=["net.0"], init_lora_weights=False), arg, seed=9)


def _context(model: torch.nn.Module, how: tuple):
    kind, arg = how
    if kind == "disable":
        return lp.disable_adapters(model)
    if kind == "route":
        return lp.route_rows(model, arg)
    return contextlib.nullcontext()


def _forward(model: torch.nn.Module, how: tuple) -> torch.Tensor:
    with _context(model, how):
        torch.manual_seed(0)  # the same dropout masks for the model and its reference
        return model(X).detach()


weights = st.sampled_from([1.0, 0.5, -0.7])
ops = st.one_of(
    st.tuples(st.just("active"), st.one_of(
        st.dictionaries(st.sampled_from(NAMES[:3]), weights, max_size=3),
        st.just("d"))),
    st.tuples(st.sampled_from(["merge", "unmerge", "readd"]), st.sampled_from(NAMES)),
    st.tuples(st.sampled_from(["train", "base_grad", "hook"]), st.booleans()),
)
contexts = st.one_of(
    st.tuples(st.sampled_from(["none", "disable"]), st.none()),
    st.tuples(st.just("route"), st.lists(st.sampled_from([None, *NAMES]), min_size=4, max_size=4)),
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(ops, contexts), min_size=1, max_size=10))
def test_every_forward_equals_a_fresh_generic_plan(steps):
    """Sequences of set_active, merge, unmerge, remove+add, train/eval, base requires_grad flips and base hooks,
    each followed by a forward plain / inside disable_adapters / inside route_rows: the layer's cached plan gives
    what a deep copy with `fused = False` (its plan chosen anew, the generic path) gives."""
    model, hooks = _model(), []
    lp.set_active(model, "a")
    _forward(model, ("none", None))  # a plan is cached before the first change
    atol, rtol = tolerance(torch.float32)
    for op, how in steps:
        try:
            _apply(model, op, hooks)
        except LoraplexError:  # a refused change (e.g. merging a DoRA adapter beside another) changes nothing
            pass
        reference = copy.deepcopy(model)
        for _, layer in lp.lora_layers(reference):
            if isinstance(layer, LoraLinear):
                layer.fused = False
        try:
            want = _forward(reference, how)
        except LoraplexError as e:  # the state cannot run (e.g. routing a merged adapter): neither may the model
            with pytest.raises(type(e)):
                _forward(model, how)
            continue
        torch.testing.assert_close(_forward(model, how), want, atol=atol, rtol=rtol)


def test_the_plan_is_chosen_at_state_changes_and_kept_between_calls():
    """A forward reuses the plan chosen at the first call after a change; assigning active / disabled / fused,
    merging (also through the layer's records) and unmerging each choose anew."""
    model = _model()
    layer = model.net[0]
    lp.set_active(model, "a")
    model(X)
    plan = layer.plan
    assert isinstance(plan, FusedPlan) and plan.name == "a"
    model(X)
    assert layer.plan is plan
    layer.fused = False
    model(X)
    assert isinstance(layer.plan, SumPlan)
    lp.merge(model, "a")
    assert isinstance(layer.plan, BasePlan)  # every active adapter is inside the base weight
    lp.unmerge(model, "a")
    model(X)
    assert isinstance(layer.plan, SumPlan) and layer.plan.adapters == (("a", 1.0, "addmm"),)
    with lp.disable_adapters(model):
        model(X)
        assert isinstance(layer.plan, BasePlan)
    model(X)
    assert isinstance(layer.plan, SumPlan)
