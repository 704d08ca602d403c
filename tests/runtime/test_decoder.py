"""The compact decoder's fast paths against its reference: fused q/k/v and gate/up GEMMs against one GEMM per
projection, the oneDNN kernel against F.linear, bf16 decode against the bf16 full forward, and greedy tokens on
SmolLM2 against transformers. Logits are compared with functional.tolerance(dtype); tokens exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import models
from loraplex.errors import ConfigError, UnsupportedFeatureError
from loraplex.functional import tolerance
from loraplex.runtime import AdapterPool
from loraplex.serve import CompactLlama
from loraplex.runtime import decoder
from loraplex.runtime.decoder import HEAD_KEY, decode_attention
from loraplex.runtime.kernels import onednn_supports, pick_kernel, projection

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
KERNELS = ["aten"] + [k for k in ["onednn"] if onednn_supports(CPU, torch.float32)]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    atol, rtol = tolerance(a.dtype)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def tiny(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer random model; Qwen2 has q/k/v biases, so fusing them is tested too."""
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, f"{arch}ForCausalLM")(config).eval().to(dtype)


def random_pool(model: CompactLlama, n: int, seed: int = 0) -> AdapterPool:
    """n random r=4 adapters on all seven projections, large enough to change the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    pool = AdapterPool(model.layer_shapes(), dtype=model.dtype)
    for a in range(n):
        t = {k: (torch.randn(4, i, generator=gen) * 0.3, torch.randn(o, 4, generator=gen) * 0.3)
             for k, (i, o) in model.layer_shapes().items() if k != HEAD_KEY}  # the projections, not lm_head
        pool.add(f"a{a}", f"h{a}", t, {k: 2.0 for k in t})
    return pool


def run_all(model: CompactLlama, pool: AdapterPool, assignments: list, strategy: str) -> list[torch.Tensor]:
    """logits, prefill into shuffled lanes, two decode steps: every entry point, the same rows."""
    plan = pool.plan(assignments, strategy=strategy)
    n = len(assignments)
    ids = torch.randint(3, 128, (n, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9 - b % 4 for b in range(n)])
    cache = model.new_cache(max_lanes=n, max_len=32)
    out = [model.logits(ids, plan), model.prefill(ids, lengths, cache, list(range(n)), plan)]
    tokens = torch.arange(n) + 5
    for step in range(2):
        out.append(model.decode(tokens + step, lengths + step, cache, plan))
    return out


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("strategy", ["gather", "segment"])
def test_fused_equals_unfused(arch, kernel, strategy):
    hf = tiny(arch)
    ref, fused = CompactLlama(hf, fused=False, kernel="aten"), CompactLlama(hf, fused=True, kernel=kernel)
    assert len(fused.layers[0].qkv) == 1 and len(ref.layers[0].qkv) == 3
    assert fused.layer_shapes() == ref.layer_shapes()
    pool = random_pool(ref, 3)
    assignments = [0, -1, 1, [(0, 0.5), (2, 1.5)], 2, 1]
    got, want = run_all(fused, pool, assignments, strategy), run_all(ref, pool, assignments, strategy)
    for g, w in zip(got, want):
        close(g, w)
    base = run_all(ref, pool, [-1] * len(assignments), strategy)
    assert not torch.allclose(want[0][0], base[0][0], atol=1e-2)  # the adapters really change the output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), fin=st.integers(1, 80), fout=st.integers(1, 80), bias=st.booleans(),
       lead=st.booleans(), strided=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_onednn_projection_equals_f_linear(rows, fin, fout, bias, lead, strided, dtype, seed):
    if not onednn_supports(CPU, dtype):
        pytest.skip(f"oneDNN does not compute {dtype} natively on this CPU")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(fout, fin, generator=gen).to(dtype)
    b = torch.randn(fout, generator=gen).to(dtype) if bias else None
    x = torch.randn(*((2,) if lead else ()), rows, fin, generator=gen).to(dtype)  # (rows, in) or (2, rows, in)
    if strided:  # the same values in a non-contiguous layout
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    p = projection(w, b, "onednn")
    assert p.shape == (fin, fout)
    close(p(x), F.linear(x, w, b))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lanes=st.integers(1, 6), n_kv=st.integers(1, 3), group=st.integers(1, 4), span=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), long=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_attention_equals_sdpa(lanes, n_kv, group, span, dtype, long, seed):
    """The decode step's attention (fp32 matmuls up to MATMUL_ATTENTION_MAX_SPAN[dtype], bf16 upcast; SDPA
    beyond) against SDPA with the same additive mask; each lane sees positions 0..its own."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(lanes, n_kv, group, 16, generator=gen).to(dtype)
    k, v = (torch.randn(lanes, n_kv, span, 16, generator=gen).to(dtype) for _ in range(2))
    seen = torch.randint(0, span, (lanes,), generator=gen)
    mask = torch.zeros(lanes, 1, 1, span, dtype=dtype)
    mask.masked_fill_((torch.arange(span) > seen[:, None])[:, None, None], -math.inf)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    limits = decoder.MATMUL_ATTENTION_MAX_SPAN
    # long: past the matmul route's limit (SDPA); else within it
    decoder.MATMUL_ATTENTION_MAX_SPAN = {**limits, dtype: span - 1 if long else span}
    try:
        got = decode_attention(q, k, v, mask, 0.25)
        assert got.dtype == dtype
        close(got, want)
    finally:
        decoder.MATMUL_ATTENTION_MAX_SPAN = limits


def test_kernel_and_fused_are_checked():
    hf = tiny("Llama")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        CompactLlama(hf, kernel="mkl")
    with pytest.raises(ConfigError, match="fused must be a bool"):
        CompactLlama(hf, fused="yes")
    with pytest.raises(UnsupportedFeatureError, match="onednn"):
        pick_kernel("onednn", CPU, torch.float16)
    assert pick_kernel("auto", CPU, torch.float16) == "aten"
    assert CompactLlama(hf, kernel="aten").layers[0].qkv[0].proj.weight is not None


@pytest.mark.parametrize("kernel", ["aten"] + [k for k in ["onednn"] if onednn_supports(CPU, torch.bfloat16)])
def test_bf16_decode_equals_bf16_forward_and_tracks_fp32(kernel):
    """bf16: decode (grouped-query attention over the cache) == the full forward's last position, in bf16;
    and the bf16 model's logits stay within the bf16 tolerance of the fp32 model's."""
    hf32 = tiny("Llama")
    m32, m16 = CompactLlama(hf32, kernel="aten"), CompactLlama(tiny("Llama", torch.bfloat16), kernel=kernel)
    assert m16.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(4))
    cache = m16.new_cache(max_lanes=3, max_len=16)
    m16.prefill(ids[:, :7], torch.tensor([7, 7, 7]), cache, [0, 1, 2])
    step = m16.decode(ids[:, 7], torch.tensor([7, 7, 7]), cache)
    full = m16.logits(ids)
    close(step, full[:, -1])
    close(full, m32.logits(ids).to(torch.bfloat16))


@pytest.mark.smollm2
def test_default_decoder_greedy_equals_transformers_on_smollm2():
    """The default (fused, kernel "auto") decoder at full depth: prefill + decode greedy tokens == transformers'."""
    hf, tok = models.load_base("smollm2")
    model = CompactLlama(hf)
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    n = 8
    cache = model.new_cache(max_lanes=len(prompts), max_len=64)
    L = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    got = [model.prefill(ids, lengths, cache, list(range(len(prompts)))).argmax(-1)]
    for step in range(n - 1):
        got.append(model.decode(got[-1], lengths + step, cache).argmax(-1))
    got_tokens = torch.stack(got, 1).tolist()
    for p, tokens in zip(prompts, got_tokens):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):]
        assert tokens == want.tolist()


def test_rope_tables_grow_and_match_transformers():
    """The cos/sin tables are made for 64 positions first, then regrown: positions past the first table still
    give transformers' logits, in the full forward and in decode."""
    hf = tiny("Llama")
    model = CompactLlama(hf)
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        close(model.logits(ids[:, :10]), hf(ids[:, :10]).logits)
        assert model._rope_tables[0].shape[0] == 64
        close(model.logits(ids[:, :100]), hf(ids[:, :100]).logits)
        cache = model.new_cache(max_lanes=2, max_len=160)
        model.prefill(ids[:, :140], torch.tensor([140, 140]), cache, [0, 1])
        close(model.decode(ids[:, 140], torch.tensor([140, 140]), cache), hf(ids[:, :141]).logits[:, -1])
    assert model._rope_tables[0].shape[0] >= 141


def test_rotary_of_fused_and_separate_q_k_equals_transformers_bit_for_bit():
    """q and k rotated as one tensor (parts of one fused GEMM output) and one by one (separate tensors) give the
    same values as transformers' apply_rotary_pos_emb, bit for bit."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = tiny("Llama")
    model = CompactLlama(hf)
    nh, n_kv, hd = model.n_heads, model.n_kv, model.head_dim
    B, L = 3, 5
    g = torch.Generator().manual_seed(3)
    y = torch.randn(B, L, (nh + 2 * n_kv) * hd, generator=g)  # a fused q/k/v GEMM output
    q, k, _ = y.split([nh * hd, n_kv * hd, n_kv * hd], dim=-1)
    assert decoder._follows(q, k) and not decoder._follows(q.clone(), k.clone())
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [60, 61, 62, 63, 64]])
    cos, sin = model._rope(pos, 65)
    joined = model._rotary(q, k, cos, sin)
    apart = model._rotary(q.clone(), k.clone(), cos, sin)
    hf_cos, hf_sin = hf.model.rotary_emb(y, pos)  # (B, L, hd)
    want = apply_rotary_pos_emb(q.view(B, L, nh, hd).transpose(1, 2), k.view(B, L, n_kv, hd).transpose(1, 2),
                                hf_cos, hf_sin)
    for got in (joined, apart):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# ---- the compiled decode step (runtime/compiled.py) -----------------------------------------------------------
# Compiling a graph of the tiny model takes ~10-30 s on the shared 2-core machine: these tests compile few graphs
# (one per dtype and the failing one) and check everything on them.
COMPILE_ROWS = [0, -1, 1, [(0, 0.5), (1, 1.5)], 2, 0, -1, 1]  # base rows, 2 adapters, a mix, a DoRA adapter (2)


def mixed_pool(model: CompactLlama) -> AdapterPool:
    """random_pool's two adapters, plus a DoRA adapter (slot 2) with its own [g; c] on the q and down layers."""
    pool = random_pool(model, 2)
    gen = torch.Generator().manual_seed(7)
    t = {k: (torch.randn(4, i, generator=gen) * 0.3, torch.randn(o, 4, generator=gen) * 0.3)
         for k, (i, o) in model.layer_shapes().items() if k != HEAD_KEY}
    dora = {k: torch.stack([1 + 0.2 * torch.randn(o, generator=gen), 0.1 * torch.randn(o, generator=gen)])
            for k, (_, o) in model.layer_shapes().items() if k.endswith(("q_proj", "down_proj"))}
    pool.add("dora", "hd", t, {k: 2.0 for k in t}, dora=dora)
    return pool


def decode_steps(model: CompactLlama, pool: AdapterPool, rows: list, n: int, steps: int = 3) -> tuple:
    """Prefill the 8 sequences into lanes 0..7, then `steps` greedy decode steps of the first n rows ->
    (logits of every step (steps, n, V), the cache)."""
    ids = torch.randint(3, 128, (8, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9 - b % 4 for b in range(8)])
    cache = model.new_cache(max_lanes=8, max_len=32)
    first = model.prefill(ids, lengths, cache, list(range(8)), pool.plan(rows)).argmax(-1)
    plan = pool.plan(rows[:n])
    tokens, out = first[:n], []
    for step in range(steps):
        out.append(model.decode(tokens, lengths[:n] + step, cache, plan))
        tokens = out[-1].argmax(-1)
    return (torch.stack(out) if out else None), cache


@pytest.mark.compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_equals_eager_and_reference(dtype):
    """Compiled decode (5 rows, mixed plan with a DoRA row) == eager decode == the unfused aten
    reference, in logits (tolerance) and greedy tokens (fp32); base rows == transformers' full forward."""
    hf = tiny("Llama", dtype)
    comp, eager = CompactLlama(hf, compile=True), CompactLlama(hf)
    pool = mixed_pool(eager)
    got, _ = decode_steps(comp, pool, COMPILE_ROWS, 5)
    assert comp.compiled  # compiled, no fallback
    want, _ = decode_steps(eager, pool, COMPILE_ROWS, 5)
    if dtype == torch.bfloat16:
        # 2x the bf16 tolerance: inductor keeps each fused chain of bf16 elementwise ops (norm, rotary, silu,
        # LoRA adds) in float32 and rounds once, eager rounds after every op; over 2 layers x 3 steps with large
        # random adapters the two drift apart by up to ~1.5 bf16 tolerances
        atol, rtol = tolerance(dtype)
        torch.testing.assert_close(got, want, atol=2 * atol, rtol=2 * rtol)
        return
    close(got, want)
    ref, _ = decode_steps(CompactLlama(hf, fused=False, kernel="aten"), pool, COMPILE_ROWS, 5)
    close(got, ref)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    base, _ = decode_steps(comp, pool, [-1] * 8, 5)  # the same graph shapes: a base-only plan is all-zero stacks
    ids = torch.randint(3, 128, (8, 9), generator=torch.Generator().manual_seed(1))
    seq = torch.cat([ids[:1, :9], hf(ids[:1, :9]).logits[:, -1].argmax(-1, keepdim=True)], 1)  # row 0: length 9
    with torch.no_grad():
        close(base[0, 0], hf(seq).logits[0, -1])
    assert not torch.allclose(base[0, 2], got[0, 2], atol=1e-2)  # the adapters really change the output


@pytest.mark.compile
def test_one_compiled_graph_serves_every_batch_and_span():
    """After warm_up (which leaves the cache zeroed), base steps of 8, 5, 3 and 1 rows at growing spans all run in
    the one graph, equal eager decode, and a 1-row step's pad row (lane 1) leaves lane 1's cache as it was."""
    from torch._dynamo.utils import counters

    hf = tiny("Llama")
    comp, eager = CompactLlama(hf, compile=True), CompactLlama(hf)
    caches = [m.new_cache(max_lanes=8, max_len=32) for m in (comp, eager)]
    comp.warm_up(caches[0])
    assert comp.compiled and not any(t.any() for t in caches[0].k + caches[0].v)
    graphs = counters["stats"]["unique_graphs"]
    ids = torch.randint(3, 128, (8, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9 - b % 4 for b in range(8)])
    tokens = [m.prefill(ids, lengths, c, list(range(8))).argmax(-1) for m, c in zip((comp, eager), caches)]
    for step, n in enumerate((8, 5, 3, 1)):
        got, want = (m.decode(tok[:n], lengths[:n] + step, c) for m, tok, c in zip((comp, eager), tokens, caches))
        close(got, want)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert counters["stats"]["unique_graphs"] == graphs  # no graph compiled after the warm-up
    lane1 = [t[1].clone() for t in caches[0].k + caches[0].v]
    comp.decode(tokens[0][:1], lengths[:1] + 4, caches[0])
    assert all(torch.equal(t[1], was) for t, was in zip(caches[0].k + caches[0].v, lane1))


FALLBACK = """
import logging
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
inductor_config.fx_graph_cache = False  # cached graphs and kernels would need no compiler
functorch_config.enable_autograd_cache = False
inductor_config.cpp.cxx = ("/nonexistent/cc",)
from test_decoder import COMPILE_ROWS, CompactLlama, close, decode_steps, mixed_pool, tiny
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("loraplex.runtime.compiled").addHandler(handler)
hf = tiny("Llama")
comp = CompactLlama(hf, compile=True)
pool = mixed_pool(comp)
got, _ = decode_steps(comp, pool, COMPILE_ROWS, 5, steps=2)
assert not comp.compiled
ours = [r.getMessage() for r in records]
assert len(ours) == 1 and "decoding eagerly" in ours[0] and "C++ compiler" in ours[0], ours
want, _ = decode_steps(CompactLlama(hf), pool, COMPILE_ROWS, 5, steps=2)
close(got, want)
print("fell back")
"""


@pytest.mark.compile
def test_compile_failure_falls_back_to_eager(tmp_path):
    """No usable C compiler: one warning, then eager decode (the same logits as a model built without compile).
    In a subprocess: inductor remembers a failed compiler check for the life of the process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (root / "src", root / "tests", root / "tests" / "runtime"))}
    run = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "fell back" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


def test_compile_flag_is_checked(monkeypatch):
    hf = tiny("Llama")
    with pytest.raises(ConfigError, match="compile must be True, False or 'auto'"):
        CompactLlama(hf, compile="yes")
    comp = CompactLlama(hf, compile=True)  # refuses what the cache cannot hold before compiling anything
    cache = comp.new_cache(max_lanes=2, max_len=16)
    with pytest.raises(ConfigError, match="KV cache holds at most 2 lanes x 16 positions"):
        comp.decode(torch.tensor([1, 2]), torch.tensor([3, 16]), cache)
    with pytest.raises(ConfigError, match="KV cache holds at most 2 lanes x 16 positions"):
        comp.decode(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]), cache)
    assert comp.compiled
    monkeypatch.setenv("LORAPLEX_COMPILE", "0")
    assert not CompactLlama(hf, compile=True).compiled
