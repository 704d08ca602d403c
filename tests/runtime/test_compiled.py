"""The compiled decode step's dense LoRA (runtime.compiled.DenseLora over BatchPlan.row_stacks / rescale_stacks)
against BatchPlan.apply_, for both plan strategies, mixes, DoRA rows and pad rows; no graph is compiled here
(tests/runtime/test_decoder.py compiles)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decoder import close, mixed_pool, tiny

from loraplex.runtime.compiled import DenseLora
from loraplex.serve import CompactLlama

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = CompactLlama(tiny("Llama"))
POOL = mixed_pool(MODEL)  # slots 0, 1: plain r=4; 2: DoRA on q_proj and down_proj
ROW = st.sampled_from([-1, 0, 1, 2, [(0, 0.5), (1, 1.5)], [(1, -2.0)]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=9), strategy=st.sampled_from(["gather", "segment"]),
       pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_dense_lora_equals_plan(rows, strategy, pad, seed):
    plan = POOL.plan(rows, strategy=strategy)
    n = len(rows)
    dense = DenseLora(plan, n + pad)
    gen = torch.Generator().manual_seed(seed)
    for key, (fin, fout) in MODEL.layer_shapes().items():
        x = torch.randn(n + pad, 1, fin, generator=gen)
        y = torch.randn(n + pad, 1, fout, generator=gen)
        want = plan.apply_(key, x[:n], y[:n].clone())
        got = dense.apply_(key, x, y.clone())
        close(got[:n], want)
        assert torch.equal(got[n:], y[n:])  # pad rows: no LoRA, g = 1, c = 0

