"""The training loop: schedule, loss fast path vs reference, determinism, outputs, accumulation, several
adapters in one pass == each alone, resume after SIGKILL == uninterrupted, crashes during a checkpoint,
QLoRA. Everything runs on a tiny random Llama saved with a character-level tokenizer (`tiny_base`)."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import loraplex as lp
from loraplex.cli import main
from loraplex.errors import (CheckpointError, ConfigError, NonFiniteError, OutputExistsError, QuantConfigError,
                             WriteError)
from loraplex.functional import tolerance
from loraplex.models import tiny_gpt2, tiny_llama
from loraplex.train import Batcher, TrainConfig, lr_factor, row_losses, row_losses_reference, train
from loraplex.train.config import INT_LIMIT, NUMERIC_FIELDS
from loraplex.train.loss import head_logits
from loraplex.train import checkpoint as ckpt_mod
from loraplex.cli.train import parse_targets
from loraplex.train.data import Example
from train_helpers import (WEIGHTS, assert_same, config, crash_at_second_checkpoint_then_resume, data,  # noqa: F401
                           subprocess_env, tensors, tiny_base)  # data, tiny_base: fixtures

# ---- pieces ------------------------------------------------------------------------------------------------

def test_lr_schedule():
    total, warmup = 20, 4
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[:4] == [1 / 5, 2 / 5, 3 / 5, 4 / 5] and f[4] == 1.0  # linear warmup, then the peak
    assert all(a > b for a, b in zip(f[4:], f[5:])) and f[-1] > 0  # cosine decay, never exactly 0
    assert math.isclose(f[4 + 8], 0.5)  # halfway through the decay
    assert lr_factor(0, 10, 0) == 1.0


def test_fused_adamw_equals_the_loop_version(tmp_path):
    """make_optimizer's AdamW runs fused and gives the for-loop AdamW's updates, to float32 rounding."""
    from loraplex.train.loop import make_optimizer

    cfg = TrainConfig(base="x", data="a.jsonl", out=tmp_path, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 5, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(5)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    opt, _ = make_optimizer(fused, cfg, total_steps=1)  # no scheduler step: lr stays 1e-2 * lr_factor(0) = 1e-2
    assert opt.defaults["fused"] is True
    loop = [torch.nn.Parameter(t.clone()) for t in start]
    ref = torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.1, foreach=False)
    for params, o in ((fused, opt), (loop, ref)):
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            o.step()
    for a, b, s0 in zip(fused, loop, start):
        assert not torch.equal(a.detach(), s0)  # it moved
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # two AdamW kernels: fp32 rounding of a step of ~lr


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets("q_proj") == ["q_proj"]
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    with pytest.raises(ConfigError):
        parse_targets(" , ")


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="quantize"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, quantize="int4")
    with pytest.raises(ConfigError, match="apply to quantize='nf4'"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, quantize="int8", quant_block_size=32)
    with pytest.raises(QuantConfigError, match="even integer"):
        TrainConfig(base="x", data="a.jsonl", out=tmp_path, quantize="nf4", quant_block_size=33)


BAD_NUMBERS = [0, -1, -0.5, math.nan, math.inf, -math.inf, 1e300, -1e300, 10**30, 2**31, 2**63, 2**64 + 1,
               "8", b"8", True, False, [1], 1.5, 0.999999]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(NUMERIC_FIELDS)),
       value=st.one_of(st.sampled_from(BAD_NUMBERS), st.integers(), st.floats(), st.none(), st.text(max_size=3)))
def test_every_numeric_field_is_checked(key, value):
    """Each numeric TrainConfig field (= train flag) refuses a bad value with a ConfigError naming it (no
    TypeError/OverflowError later); what it accepts is a finite number of its kind, within the int range."""
    try:
        cfg = TrainConfig(base="x", data="a.jsonl", out="out", **{key: value})
    except ConfigError as exc:
        assert key in str(exc)
        return
    kind, optional = NUMERIC_FIELDS[key][:2]
    got = getattr(cfg, key)
    if got is None:
        assert optional
        return
    assert not isinstance(got, bool) and isinstance(got, (int, float) if kind is float else int)
    assert math.isfinite(got) and (kind is float or 0 <= got <= INT_LIMIT)


@pytest.mark.parametrize("key,value", [("lr", 1e300), ("lr", 1e-300), ("alpha", 1e300), ("weight_decay", 1e300),
                                       ("max_grad_norm", 1e300), ("dropout", 0.999999), ("warmup_ratio", 0.999999),
                                       ("eval_split", 0.999999), ("max_length", INT_LIMIT), ("batch_size", INT_LIMIT)])
def test_extreme_accepted_values_train_finitely_or_stop_typed(tiny_base, data, tmp_path, key, value):
    """What TrainConfig accepts at its edges either trains to a finite adapter or stops with a typed error
    before any adapter is written (never a NaN adapter, never a crash)."""
    out = tmp_path / "run"
    try:
        train(config(tiny_base, [data["a"]], out, max_steps=2, **{key: value}))
    except lp.LoraplexError:
        assert not (out / WEIGHTS).exists()
        return
    assert all(torch.isfinite(t).all() for t in tensors(out).values())


def test_divergence_stops_typed_and_keeps_the_last_good_checkpoint(tiny_base, data, tmp_path, capsys):
    """`train --lr inf` is refused up front; a run that diverges (loss NaN) stops with NonFiniteError, writes
    no adapter, and its last checkpoint (before the NaN) still loads, finite."""
    out = tmp_path / "inf"
    assert main(["train", "--base", str(tiny_base), "--data", str(data["a"]), "--out", str(out),
                 "--lr", "inf", "--max-steps", "2"]) == 2
    assert "lr" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteError, match="diverged at step 2"):
        train(config(tiny_base, [data["a"]], out, lr=1e30, save_every=1))
    assert not (out / WEIGHTS).exists()
    ckpt = ckpt_mod.load_checkpoint(ckpt_mod.find_checkpoint(out))
    assert ckpt.state["step"] == 1
    assert all(torch.isfinite(t).all() for t in lp.read_adapter(ckpt.adapter_dir("default")).tensors.values())


def test_out_is_never_an_existing_adapter_or_file_without_asking(tiny_base, data, tmp_path):
    model = tiny_llama(seed=0)
    lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lp.save_adapter(model, "a", tmp_path / "mine")
    before = tensors(tmp_path / "mine")
    for flags in ({}, {"resume": True}):  # resume continues an earlier run, and this is none
        with pytest.raises(OutputExistsError, match="--overwrite"):
            train(config(tiny_base, [data["a"]], tmp_path / "mine", max_steps=1, **flags))
    assert_same(tensors(tmp_path / "mine"), before)
    (tmp_path / "file").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputExistsError, match="is a file"):
            train(config(tiny_base, [data["a"]], tmp_path / "file", max_steps=1, **flags))
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="input"):  # the folder holding the data, even with --overwrite
        train(config(tiny_base, [data["a"]], data["a"].parent, max_steps=1, overwrite=True))
    assert data["a"].is_file()


def test_rank_above_a_targeted_layer_is_refused_before_allocating(tiny_base, data, tmp_path):
    hidden = lp.models.load_base(str(tiny_base))[0].config.hidden_size
    for rank in (hidden + 1, 10**9):
        with pytest.raises(ConfigError, match=f"--rank {rank} exceeds min"):
            train(config(tiny_base, [data["a"]], tmp_path / f"r{rank}", rank=rank, max_steps=1))


def test_full_disk_during_training_is_a_write_error(tiny_base, data, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("loraplex.outputs.os.fsync", full)
    out = tmp_path / "run"
    with pytest.raises(WriteError, match="No space left"):
        train(config(tiny_base, [data["a"]], out, max_steps=1))
    assert not (out / WEIGHTS).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("packing", [False, True])
def test_fast_loss_equals_reference(build, packing):
    """row_losses (output head on target positions only) == full logits + masked cross-entropy, values and
    LoRA gradients."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12]
    exs = [Example(ids := torch.randint(3, 120, (n,), generator=g).tolist(),
                   [-100] * (n // 2) + ids[n // 2:]) for n in lengths]
    batch = next(iter(Batcher(exs, 4, seed=0, packing=packing, max_length=12, pad_id=0)))
    grads = []
    for fn in (row_losses, row_losses_reference):
        model = build(seed=0)
        lp.inject(model, lp.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), "a", seed=1)
        losses = fn(model, batch)
        losses.sum().backward()
        grads.append((losses.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (fast, gf), (ref, gr) = grads
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(fast, ref, atol=atol, rtol=rtol)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("bias", [False, True])
def test_head_logits_equals_head(bias):
    """head_logits ((W @ x.T).T for a plain Linear head) == head(x): values and the gradients of x, W, bias."""
    torch.manual_seed(0)
    head = nn.Linear(6, 50, bias=bias)
    x = torch.randn(7, 6, requires_grad=True)
    dy = torch.randn(7, 50)
    got = []
    for fn in (head_logits, lambda h, t: h(t)):
        head.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(head, x)
        y.backward(dy)
        got.append([y.detach(), x.grad] + [p.grad for p in head.parameters()])
    atol, rtol = tolerance(torch.float32)
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("scale", [2.0, -0.75])
def test_fused_lora_add_equals_reference(lead, scale):
    """The training fast path LF.lora_linear_add (one addmm) == result + LF.lora_linear (the obvious version),
    values and the gradients of x, A, B and result."""
    from loraplex import functional as LF

    g = torch.Generator().manual_seed(0)
    made = [torch.randn(*shape, generator=g, requires_grad=True)
            for shape in ((*lead, 6), (*lead, 11), (3, 11), (6, 3))]  # result, x, A, B
    outs = []
    for fn in (lambda r, x, a, b: LF.lora_linear_add(r, x, a, b, scale),
               lambda r, x, a, b: r + LF.lora_linear(x, a, b, scale)):
        leaves = [t.detach().clone().requires_grad_(True) for t in made]
        y = fn(*leaves)
        (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    atol, rtol = tolerance(torch.float32)
    for fast, ref in zip(*outs):
        torch.testing.assert_close(fast, ref, atol=atol, rtol=rtol)


@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(5,), (2, 3), (1, 4, 2)]), dims=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       r=st.integers(1, 4), scale=st.floats(-3, 3, allow_nan=False), bias=st.booleans(),
       needs=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**16))
def test_linear_with_lora_equals_reference(lead, dims, r, scale, bias, needs, seed):
    """LF.linear_with_lora (base + LoRA as one autograd node, reordered backward) == the base linear followed
    by result + LF.lora_linear: values and the gradients of x, A, B, whichever of them require one."""
    from loraplex import functional as LF

    d_in, d_out = dims
    g = torch.Generator().manual_seed(seed)
    x, w, a, b = (torch.randn(*shape, generator=g) for shape in ((*lead, d_in), (d_out, d_in), (r, d_in), (d_out, r)))
    bias_t = torch.randn(d_out, generator=g) if bias else None
    outs = []
    for fn in (lambda x_, a_, b_: LF.linear_with_lora(x_, w, bias_t, a_, b_, scale),
               lambda x_, a_, b_: F.linear(x_, w, bias_t) + LF.lora_linear(x_, a_, b_, scale)):
        leaves = [t.clone().requires_grad_(need) for t, need in zip((x, a, b), needs)]
        y = fn(*leaves)
        if y.requires_grad:
            (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    atol, rtol = tolerance(torch.float32)
    for fast, ref in zip(*outs):
        assert (fast is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(fast, ref, atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lora_layers_take_the_one_node_path_only_when_exact(build):
    """With one active adapter without dropout over a frozen plain Linear/Conv1D, LoraLinear runs
    LF.linear_with_lora and matches the generic path (fused=False); dropout, two active adapters, a trainable
    base weight or a hooked base fall back to the generic path."""
    model = build()
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), "a")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    outs = []
    for fused in (True, False):
        for _, layer in lp.lora_layers(model):
            layer.fused = fused
            layer.lora_A["a"].weight.grad = layer.lora_B["a"].weight.grad = None
        logits = model(input_ids=ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads = [t.grad for _, layer in lp.lora_layers(model) for t in layer.adapter_tensors("a")]
        outs.append([logits.detach()] + grads)
    atol, rtol = tolerance(torch.float32)
    for fast, ref in zip(*outs):  # summation order differs: errors scale with the tensor's largest entries
        torch.testing.assert_close(fast, ref, atol=atol * max(1.0, float(ref.abs().max())), rtol=rtol)
    key, layer = next(iter(lp.lora_layers(model)))
    layer.fused = True
    layer.add_adapter("b", 2, 4.0)
    x = torch.randn(2, layer.in_features)

    def one_node() -> bool:
        return type(layer(x).grad_fn).__name__ == "_LinearWithLoraBackward"

    assert one_node()
    base = layer.base_layer
    generic = {  # each change alone, then undone, so every case is checked on an otherwise fast layer
        "dropout": (lambda: layer.lora_dropout.__setitem__("a", torch.nn.Dropout(0.1)),
                    lambda: layer.lora_dropout.__setitem__("a", torch.nn.Identity())),
        "two active": (lambda: setattr(layer, "active", [("a", 1.0), ("b", 1.0)]),
                       lambda: setattr(layer, "active", [("a", 1.0)])),
        "trainable base": (lambda: base.weight.requires_grad_(True), lambda: base.weight.requires_grad_(False)),
    }
    for case, (change, undo) in generic.items():
        change()
        assert not one_node(), (key, case)
        undo()
        assert one_node(), (key, case)
    hook = base.register_forward_hook(lambda *args: None)
    assert not one_node(), (key, "hooked base")
    hook.remove()
    assert one_node()


# ---- whole runs ------------------------------------------------------------------------------------------

def test_train_outputs_determinism_and_peft(tiny_base, data, tmp_path):
    """Same seed -> bit-identical adapter; outputs present; eval loss drops; PEFT loads the adapter."""
    runs = [train(config(tiny_base, [data["a"]], tmp_path / f"run{i}", dropout=0.1, max_steps=8, eval_every=4))
            for i in range(2)]
    first, second = runs
    assert_same(tensors(first.out), tensors(second.out), exact=True)
    out = first.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows[1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "train_summary.json").read_text())
    adapter = summary["adapters"]["default"]
    assert adapter["eval_loss_after"] < adapter["eval_loss_before"] == rows[0]["eval_loss"]
    assert summary["trainable_params"] == adapter["trainable_params"] > 0 and summary["peak_rss_bytes"] > 0
    assert summary["tokens"] == sum(r["tokens"] for r in rows[1:])
    # PEFT (the oracle) reads the adapter and computes what loraplex computes with it
    model, _ = lp.models.load_base(str(tiny_base))
    lp.load_adapter(model, out, "t")
    model.eval()  # the injected dropout modules are created in training mode
    ref, _ = lp.models.load_base(str(tiny_base))
    pm = peft.PeftModel.from_pretrained(ref, out).eval()
    ids = torch.randint(4, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        atol, rtol = tolerance(torch.float32)
        torch.testing.assert_close(pm(ids).logits, model(ids).logits, atol=atol, rtol=rtol)


def test_grad_accum_equals_bigger_batch(tiny_base, data, tmp_path):
    big = train(config(tiny_base, [data["a"]], tmp_path / "big", batch_size=4, grad_accum=1, eval_split=0.0))
    acc = train(config(tiny_base, [data["a"]], tmp_path / "acc", batch_size=2, grad_accum=2, eval_split=0.0))
    assert big.eval_loss_before == {"default": None}  # no held-out split asked for: no eval
    assert_same(tensors(big.out), tensors(acc.out), exact=False)


def test_several_adapters_in_one_pass_equal_each_alone(tiny_base, data, tmp_path):
    """--out-per-data: one forward/backward per micro-batch for both adapters (rows routed per adapter) gives
    each adapter what training it alone gives. epochs=2 (not max_steps): b runs out of steps before a,
    so later batches hold a's rows only; clipping is active (max_grad_norm) and is per adapter."""
    kw = dict(max_steps=None, epochs=2, max_grad_norm=0.5)
    both = train(config(tiny_base, [data["a"], data["b"]], tmp_path / "both", out_per_data=True, **kw))
    assert sorted(both.adapters) == ["a", "b"]
    for name in ("a", "b"):
        alone = train(config(tiny_base, [data[name]], tmp_path / f"alone_{name}", **kw))
        assert both.summary["adapters"][name]["steps"] == alone.steps
        assert both.eval_loss_before[name] == pytest.approx(alone.eval_loss_before["default"], rel=1e-5)
        assert both.eval_loss_after[name] == pytest.approx(alone.eval_loss_after["default"], rel=1e-4)
        assert_same(tensors(both.out / name), tensors(alone.out), exact=False)
    rows = [json.loads(line) for line in (both.out / "metrics.jsonl").read_text().splitlines()]
    assert {r["adapter"] for r in rows} == {"a", "b"}


def test_packing_and_qlora_nf4(tiny_base, data, tmp_path):
    """--packing trains; --quantize nf4 trains LoRA over QuantLinear layers and the adapter reloads onto a
    quantized base with the eval loss the run reported."""
    packed = train(config(tiny_base, [data["b"]], tmp_path / "packed", packing=True, max_length=32))
    assert packed.eval_loss_after["default"] < packed.eval_loss_before["default"]
    q = train(config(tiny_base, [data["a"]], tmp_path / "nf4", quantize="nf4", max_steps=8))
    assert q.eval_loss_after["default"] < q.eval_loss_before["default"]
    from loraplex.quant import QuantLinear, quantize_model

    model, _ = lp.models.load_base(str(tiny_base))
    quantize_model(model, "nf4")
    lp.load_adapter(model, q.out, "q")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    plain = train(config(tiny_base, [data["a"]], tmp_path / "plain", max_steps=8))
    assert plain.eval_loss_before != q.eval_loss_before  # the quantized base really is another base
    fine = train(config(tiny_base, [data["a"]], tmp_path / "nf4-16", quantize="nf4", quant_block_size=16,
                        double_quant=True, max_steps=8))
    gap = {k: abs(r.eval_loss_before["default"] - plain.eval_loss_before["default"])
           for k, r in (("64", q), ("16", fine))}
    assert gap["16"] < gap["64"]  # smaller blocks: a base closer to the float one
    assert json.loads((fine.out / "train_summary.json").read_text())["config"]["quant_block_size"] == 16


def test_out_dir_guard_and_resume_refuses_other_settings(tiny_base, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_base, [data["a"]], out, save_every=2))
    with pytest.raises(OutputExistsError, match="earlier run"):
        train(config(tiny_base, [data["a"]], out))
    with pytest.raises(CheckpointError, match="lr"):
        train(config(tiny_base, [data["a"]], out, resume=True, lr=5e-3))


def test_crash_during_checkpoint_keeps_the_previous_one(tiny_base, data, tmp_path, monkeypatch):
    """A failure while writing checkpoint #2, and a kill between atomic_directory's two renames, both leave
    checkpoint #1 usable; resuming from it ends where an uninterrupted run ends."""
    whole, resumed = crash_at_second_checkpoint_then_resume(monkeypatch, tiny_base, data["a"], tmp_path,
                                                            dropout=0.1, save_every=2)
    out = resumed.out
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.tmp")]  # the half-written one is gone
    assert resumed.resumed_from == 2
    assert_same(tensors(whole.out), tensors(out), exact=True)

    # a kill after the old checkpoint was renamed aside but before the new one took its name
    import loraplex.outputs as outputs

    real_rename, renames = os.rename, []

    class Killed(BaseException):  # like SIGKILL, nothing may catch it as an ordinary error
        pass

    def dying_rename(src, dst):
        renames.append(dst)
        if Path(dst).name == "checkpoint" and len([d for d in renames if Path(d).name == "checkpoint"]) == 2:
            raise Killed("between the renames")
        return real_rename(src, dst)

    out2 = tmp_path / "window"
    monkeypatch.setattr(outputs.os, "rename", dying_rename)
    with pytest.raises(Killed):
        train(config(tiny_base, [data["a"]], out2, dropout=0.1, save_every=2))
    monkeypatch.undo()
    assert not (out2 / "checkpoint").exists()
    found = ckpt_mod.find_checkpoint(out2)
    assert found is not None and found.name.startswith(".checkpoint.old-")
    resumed = train(config(tiny_base, [data["a"]], out2, dropout=0.1, save_every=2, resume=True))
    assert resumed.resumed_from == 2
    assert_same(tensors(whole.out), tensors(out2), exact=True)


# ---- resume after a real SIGKILL ---------------------------------------------------------------------------

def cli(tiny_base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraplex", "train", "--base", str(tiny_base), "--data", str(data), "--out",
            str(out), "--batch-size", "4", "--max-length", "64", "--eval-split", "0.25", "--lr", "5e-3",
            "--dropout", "0.1", "--max-steps", "80", "--save-every", "10", "--eval-every", "40", "--seed", "5",
            *extra]


def test_resume_after_sigkill_equals_uninterrupted(tiny_base, data, tmp_path):
    """SIGKILL a CLI run once its first checkpoint exists, resume it, and compare with a run never killed:
    the adapter is bit-identical (same kernels, same thread count, RNG/optimizer/schedule/data order restored),
    and metrics.jsonl has the same rows (timings aside)."""
    env = subprocess_env()
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    ref = subprocess.Popen(cli(tiny_base, data["a"], whole), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)  # the uninterrupted run, alongside (one thread each)
    proc = subprocess.Popen(cli(tiny_base, data["a"], killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    while not (killed / "checkpoint" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 150 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / WEIGHTS).exists(), "the run finished before it could be killed"
    at = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    done = subprocess.run(cli(tiny_base, data["a"], killed, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from the checkpoint at step {at}" in done.stdout
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    assert_same(tensors(killed), tensors(whole), exact=True)
    strip = ("tokens_per_s", "elapsed_s")

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in strip}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(killed) == rows(whole)


def test_a_run_that_fails_before_writing_leaves_no_empty_out(data, tmp_path):
    """`train` with a base that does not exist fails before writing anything: the --out folder it created is
    removed again, while a folder the user made stays."""
    out = tmp_path / "new"
    assert main(["train", "--base", str(tmp_path / "missing"), "--data", str(data["a"]), "--out", str(out)]) == 1
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["train", "--base", str(tmp_path / "missing"), "--data", str(data["a"]), "--out", str(mine)]) == 1
    assert mine.is_dir()
