"""serve/lanes.py: the running batch's LoRA as per-lane stacks, against the pool's `BatchPlan` (the reference)
on the compact decoder's forward, and the engine on that path against each request run alone; the engine's
finite-logits check against the elementwise one.

Logits are compared with functional.tolerance(dtype); greedy token sequences exactly.
"""

from __future__ import annotations

import pytest
import torch

from loraplex import models
from loraplex.functional import tolerance
from loraplex.runtime import AdapterPool
from loraplex.runtime.compiled import DenseLora
from loraplex.serve import CompactLlama, Engine, EngineConfig, SamplingParams
from loraplex.serve.lanes import LaneBatch, LaneLora
from loraplex.serve.sequence import finite_rows
from loraplex.serve.text import TextCodec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    atol, rtol = tolerance(a.dtype)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def add_random(pool: AdapterPool, model: CompactLlama, name: str, r: int, seed: int, *, every: int = 1,
               dora: bool = False) -> int:
    """A random rank-r adapter on every `every`-th layer key (the head included), made to move the output."""
    g = torch.Generator().manual_seed(seed)
    keys = list(model.layer_shapes().items())[::every]
    t = {k: (torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3) for k, (i, o) in keys}
    gc = {k: torch.stack([1 + 0.1 * torch.randn(o, generator=g), 0.1 * torch.randn(o, generator=g)])
          for k, (_, o) in keys} if dora else None
    return pool.add(name, f"{name}-{seed}", t, {k: 0.5 for k in t}, dora=gc)


def setup(lanes: int = 6, dtype: torch.dtype = torch.float32):
    hf = models.tiny_llama(seed=0).to(dtype)
    model = CompactLlama(hf)
    pool = AdapterPool(model.layer_shapes(), dtype=model.dtype, max_plans=4)
    return hf, model, pool, LaneLora(pool, lanes)


def test_lane_rows_equal_the_pool_plan():
    _, model, pool, lora = setup()
    a, b, c = (add_random(pool, model, n, r, s, every=e) for n, r, s, e in [("a", 2, 1, 1), ("b", 4, 2, 2), ("c", 3, 3, 3)])
    ids = torch.randint(3, 128, (6, 5), generator=torch.Generator().manual_seed(0))
    layout = [((a, 1.0),), (), ((b, 1.0),), ((a, 0.5), (c, 0.7)), ((c, 1.0),), ((b, 1.0),)]

    def check(rows: list[int]) -> None:
        batch = lora.rows([layout[i] for i in rows], rows)
        assert isinstance(batch, LaneBatch)
        close(model.logits(ids[rows], batch), model.logits(ids[rows], pool.plan([layout[i] for i in rows])))

    check(list(range(6)))  # the decode batch: contiguous lanes, views
    check([4, 0, 3])  # a prefill of scattered new lanes
    check([2, 3])
    assert lora.rank == 5  # the mix: 2 + 3
    layout[1], layout[0], layout[5] = ((b, 1.0),), ((a, 2.0), (b, 1.0), (c, -1.0)), ()  # lanes reused; rank grows
    check(list(range(6)))
    assert lora.rank == 9
    pool.remove("c")  # no lease: slot c is freed, and the next adapter takes it with new content
    d = add_random(pool, model, "d", 2, 4)
    assert d == c
    layout[4], layout[3] = ((d, 1.0),), ()  # lane 4's assignment tuple is unchanged; its content is not
    check(list(range(6)))
    check([4])
    lora.shrink([2, 4])  # ranks 4 and 2: the stacks drop to rank 4, the other lanes are rewritten when used
    assert lora.rank == 4
    check(list(range(6)))
    assert lora.rank == 8  # lane 0's mix, now over d: 2 + 4 + 2
    lora.shrink([0, 2])  # rank 8 is needed: nothing changes
    assert lora.rank == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: stacks in float32, as gather plans
def test_lane_rows_equal_the_pool_plan_at_every_layer(dtype):
    _, model, pool, lora = setup(dtype=dtype)
    a, b = add_random(pool, model, "a", 2, 1), add_random(pool, model, "b", 4, 2, every=2)
    layout = [((b, 1.0),), ((a, 0.5), (b, 2.0)), (), ((a, 1.0),)]
    g = torch.Generator().manual_seed(0)
    for rows in ([0, 1, 2, 3], [3, 1]):
        batch, plan = lora.rows([layout[i] for i in rows], rows), pool.plan([layout[i] for i in rows])
        for key, (fin, fout) in model.layer_shapes().items():
            x = torch.randn(len(rows), 3, fin, generator=g).to(dtype)
            wide = torch.randn(len(rows), 3, fout + 5, generator=g).to(dtype)  # y: or a view, as a fused GEMM's part
            for view in (False, True):
                got, want = (t[..., 5:] if view else t[..., 5:].contiguous() for t in (wide.clone(), wide.clone()))
                batch.apply_(key, x, got)
                plan.apply_(key, x, want)
                close(got, want)


@pytest.mark.parametrize("pad_rows, pad_rank", [(0, 0), (1, 0), (2, 3)])
def test_lane_rows_as_dense_stacks_equal_the_pool_plan(pad_rows, pad_rank):
    """What the compiled decode step reads (runtime/compiled.py DenseLora over `row_stacks`): the lane stacks
    themselves when rows and rank are theirs, zero-padded copies otherwise; the pad rows get no LoRA."""
    _, model, pool, lora = setup()
    a, b = add_random(pool, model, "a", 2, 1), add_random(pool, model, "b", 4, 2, every=2)
    layout = [((b, 1.0),), ((a, 0.5), (b, 2.0)), (), ((a, 1.0),)]
    batch, plan = lora.rows(layout, range(4)), pool.plan(layout)
    rows, rank = 4 + pad_rows, batch.max_rank + pad_rank
    assert batch.max_rank == lora.rank == 6 and batch.rescale_stacks("lm_head", rows) is None
    dense = DenseLora(batch, rows) if pad_rank == 0 else None
    g = torch.Generator().manual_seed(0)
    for key, (fin, fout) in model.layer_shapes().items():
        stacks = batch.row_stacks(key, rows, rank)
        if key not in lora.A:
            assert stacks is None
            continue
        A, Bt = stacks
        assert A.shape == (rows, rank, fin) and Bt.shape == (rows, rank, fout)
        assert (A.data_ptr() == lora.A[key].data_ptr()) == (pad_rows == pad_rank == 0)  # views: no copy
        x, y = torch.randn(rows, 1, fin, generator=g), torch.randn(rows, 1, fout, generator=g)
        want = plan.apply_(key, x[:4], y[:4].clone())
        close(y[:4] + torch.bmm(torch.bmm(x[:4], A[:4].transpose(1, 2)), Bt[:4]), want)
        assert not A[4:].any() and not Bt[4:].any()
        if dense is not None:
            got = dense.apply_(key, x, y.clone())
            close(got[:4], want)
            assert torch.equal(got[4:], y[4:])


def test_an_assignment_that_is_not_plain_lora_is_refused():
    _, model, pool, lora = setup(2)
    a = add_random(pool, model, "a", 2, 1)
    d = add_random(pool, model, "d", 2, 2, dora=True)
    assert lora.rows([((a, 1.0),), ((d, 1.0),)], [0, 1]) is None
    assert isinstance(lora.rows([((a, 1.0),), ()], [0, 1]), LaneBatch)


def test_engine_on_lane_stacks_equals_each_request_alone():
    hf, model, pool, _ = setup()
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        add_random(pool, model, n, 2 + i, 10 + i)
    codec = TextCodec.for_model(None, hf.config)
    config = dict(max_prompt_tokens=48, max_new_tokens=32)
    eng = Engine(model, pool, codec, base_ids=("base",), config=EngineConfig(max_batch=3, admit_min=1, **config))
    g = torch.Generator().manual_seed(5)
    specs = ["a", "b", "base", "a:0.5+c:0.5", "c", "b", "a", "c"]
    reqs = [(torch.randint(3, 128, (3 + 2 * i,), generator=g).tolist(), m) for i, m in enumerate(specs)]
    params = [SamplingParams(max_tokens=4 + 3 * (i % 3), temperature=0.0, ignore_eos=True) for i in range(len(reqs))]
    handles = []
    on_lanes = 0
    for step in range(300):
        if step % 2 == 0 and len(handles) < len(reqs):
            i = len(handles)
            handles.append(eng.submit(reqs[i][0], reqs[i][1], params[i]))
        eng.step()
        on_lanes += isinstance(eng._plan, LaneBatch)
        if len(handles) == len(reqs) and all(h.done for h in handles):
            break
    assert on_lanes > 0  # the lane path ran
    for i, h in enumerate(handles):
        alone = Engine(model, pool, codec, base_ids=("base",), config=EngineConfig(**config)).generate(reqs[i][0], reqs[i][1], params[i])
        assert h.result().token_ids == alone.token_ids, f"request {i} ({reqs[i][1]})"


@pytest.mark.compile
def test_compiled_engine_on_lane_stacks_equals_the_eager_engine():
    """With the compiled decode step, a batch of distinct adapters still runs on the lane stacks (read without a
    copy), with the greedy tokens of the eager engine; one graph for base steps, one for the LoRA plans."""
    from torch._dynamo.utils import counters

    hf = models.tiny_llama(seed=0)
    tokens = {}
    for compiled in (False, True):
        model = CompactLlama(hf, compile=compiled)
        pool = AdapterPool(model.layer_shapes(), dtype=model.dtype, max_plans=4)
        for i, n in enumerate(["a", "b", "c"]):
            g = torch.Generator().manual_seed(10 + i)
            t = {k: (torch.randn(2 + i, fin, generator=g) * 0.3, torch.randn(fout, 2 + i, generator=g) * 0.3)
                 for k, (fin, fout) in model.layer_shapes().items() if k != "lm_head"}  # head LoRA runs eagerly
            pool.add(n, f"{n}-{i}", t, {k: 0.5 for k in t})
        codec = TextCodec.for_model(None, hf.config)
        eng = Engine(model, pool, codec, base_ids=("base",),
                     config=EngineConfig(max_batch=4, admit_min=1, max_prompt_tokens=48, max_new_tokens=32))
        if compiled:
            torch._dynamo.reset()
            model.warm_up(eng.cache)
            graphs = counters["stats"]["unique_graphs"]
        g = torch.Generator().manual_seed(5)
        specs = ["a", "b", "base", "a:0.5+c:0.5", "c", "b"]
        reqs = [(torch.randint(3, 128, (3 + 2 * i,), generator=g).tolist(), m) for i, m in enumerate(specs)]
        handles, on_lanes = [], 0
        for step in range(300):
            if step % 2 == 0 and len(handles) < len(reqs):
                i = len(handles)
                handles.append(eng.submit(reqs[i][0], reqs[i][1],
                                          SamplingParams(max_tokens=4 + 3 * (i % 3), temperature=0.0, ignore_eos=True)))
            eng.step()
            on_lanes += isinstance(eng._plan, LaneBatch)
            if len(handles) == len(reqs) and all(h.done for h in handles):
                break
        assert on_lanes > 0 and model.compiled == compiled
        tokens[compiled] = [h.result().token_ids for h in handles]
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the LoRA graph; base steps reused the warm-up's
    assert tokens[True] == tokens[False]


def test_finite_rows_equals_the_elementwise_check():
    big = torch.finfo(torch.float32).max
    logits = torch.tensor([[0.0, 1.0, -2.0], [big, big, 1.0], [0.0, float("inf"), 1.0], [float("nan"), 0.0, 0.0],
                           [float("-inf"), float("inf"), 0.0]])  # row 1: finite, but its sum overflows
    assert finite_rows(logits) == torch.isfinite(logits).all(-1).tolist() == [True, True, False, False, False]
