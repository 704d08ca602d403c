"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) for serving with continuous batching.

It reads the weights of a loaded transformers `*ForCausalLM` and runs the same math with a KV cache that has
one *lane* per running sequence (runtime.kvcache), so sequences can join and leave the batch at any step. LoRA
is applied on the seven projections of every layer through a `runtime.BatchPlan`:

    y = x @ W.T (+ b);  plan.apply_(key, x, y)   # y[i] += sum_k w_k * scale_k * (x[i] @ A_k.T) @ B_k.T

Projections run through `kernels.Projection` (the kernel picked once; "aten" shares the model's tensors, "onednn"
keeps a reordered copy). With `fused=True` (the default) q/k/v and gate/up are each one GEMM over weights
concatenated once at load, whose output is split into the per-projection views that LoRA updates in place;
`fused=False` runs the seven projections one by one (the reference the fused path is tested against).

Layer keys are the transformers module names, the same keys as in adapter files with the PEFT prefix and
the `.lora_A.weight` suffix removed, e.g. "model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj".

Two entry points share one layer loop:
  - `prefill(ids (n, L), lengths, cache, lanes, plan)`: n new sequences, right-padded to L, written into
    cache lanes lanes[0..n-1] at positions 0..L-1; returns the logits of each one's last real token.
  - `decode(tokens (B,), positions (B,), cache, plan)`: one token for each of lanes 0..B-1 at its position;
    attention reads that lane's cache up to and including the position.
    With compile=True it runs as one torch.compile graph of dynamic shapes (runtime.compiled; `warm_up` compiles it).
`logits(ids (B, L), plan)` is the plain full-sequence forward (no cache), used to check parity with
transformers.

modules_to_save copies (runtime.saved_modules) are served per row for the modules this decoder runs as modules:
lm_head and the RMS norms (`saved_places`); a row whose adapter holds a copy runs it, the other rows the base's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedFeatureError
from . import compiled
from .kernels import Projection, pick_kernel, projection
from .kvcache import KVCache
from .ops import BatchPlan

ARCHITECTURES = ("llama", "mistral", "qwen2")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
EMBED_KEY, HEAD_KEY = "model.embed_tokens", "lm_head"  # pool keys of the input embedding and the output head
# rope variants whose frequencies depend on the sequence length at run time: not reproduced here
_DYNAMIC_ROPE = ("dynamic", "longrope")
# decode attention as two fp32 matmuls up to this span, per dtype (bf16 upcast first), SDPA beyond or for other
# dtypes: crossovers measured at 16 lanes x 9 heads (bf16: 1.5x faster than SDPA at span 17, equal at 256)
MATMUL_ATTENTION_MAX_SPAN = {torch.float32: 2048, torch.bfloat16: 128}


@dataclass(frozen=True)
class _Group:
    """Projections sharing one input, computed as one GEMM: out = cat(y_1, ..., y_k) split by `sizes`."""

    proj: Projection  # (in) -> (sum(sizes))
    keys: tuple[str, ...]  # layer key of each part, e.g. ("model.layers.0.self_attn.q_proj", ...)
    sizes: tuple[int, ...]  # out_features of each part


@dataclass
class _Layer:
    ln_attn: torch.Tensor  # (H,) input_layernorm weight
    ln_mlp: torch.Tensor  # (H,) post_attention_layernorm weight
    qkv: tuple[_Group, ...]  # yields q, k, v (one group when fused, three otherwise)
    o: tuple[_Group, ...]
    gate_up: tuple[_Group, ...]  # yields gate, up
    down: tuple[_Group, ...]


class CompactLlama:
    """Inference-only Llama-family forward over a transformers model's weights (see module docstring)."""

    def __init__(self, hf_model: nn.Module, *, fused: bool = True, kernel: str = "auto",
                 compile: bool | str = False) -> None:
        """fused: one GEMM for q/k/v and one for gate/up (see the module docstring); kernel: see runtime.kernels;
        compile: True / False / "auto", the decode step as a compiled graph (see runtime.compiled)."""
        if not isinstance(fused, bool):
            raise ConfigError(f"fused must be a bool, got {fused!r}")
        use_compiled = compiled.resolve(compile)
        config = hf_model.config
        mtype = getattr(config, "model_type", None)
        if mtype not in ARCHITECTURES:
            raise UnsupportedFeatureError(
                f"the serving engine runs the Llama family {ARCHITECTURES}; got model_type {mtype!r} "
                f"({type(hf_model).__name__})")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedFeatureError(f"hidden_act must be 'silu' for the compact Llama, got {act!r}")
        rotary = hf_model.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in _DYNAMIC_ROPE:
            raise UnsupportedFeatureError(f"rope_type {rope_type!r} changes with sequence length; not supported")
        self.config = config
        self.model_type = mtype
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.vocab = config.vocab_size
        self.eps = float(config.rms_norm_eps)
        self.max_positions = int(config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        if window and (mtype != "qwen2" or getattr(config, "use_sliding_window", False)):
            # attention inside the window equals full attention: serve contexts that fit it
            self.max_positions = min(self.max_positions, int(window))
        self.scale = self.head_dim ** -0.5
        self.inv_freq = rotary.inv_freq.detach().float()  # (hd / 2,)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        base = hf_model.model
        self.embed = base.embed_tokens.weight.detach()  # (V, H)
        self.norm = base.norm.weight.detach()  # (H,)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.fused = fused
        self.kernel = pick_kernel(kernel, self.device, self.dtype)
        self.lm_head = projection(hf_model.lm_head.weight.detach(), None, self.kernel)  # (V, H), tied or not
        self._shapes: dict[str, tuple[int, int]] = {}  # layer key -> (in, out)
        none = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        self._rope_tables = (none, none)  # cos, sin (P, hd); replaced together, never written in place
        self.layers: list[_Layer] = []
        for i, layer in enumerate(base.layers):
            mods = {**{p: getattr(layer.self_attn, p) for p in ATTN_PROJ}, **{p: getattr(layer.mlp, p) for p in MLP_PROJ}}
            for p, m in mods.items():
                if type(m) is not nn.Linear:
                    raise UnsupportedFeatureError(
                        f"model.layers.{i} {p} is {type(m).__name__}; the compact Llama needs plain nn.Linear "
                        "projections (load the base without adapters, quantization or other wrappers)")
            self._shapes.update({self.key(i, p): (m.in_features, m.out_features) for p, m in mods.items()})
            groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
            qkv, o, gate_up, down = (self._groups(i, [(p, mods[p]) for p in names]) for names in groups)
            self.layers.append(_Layer(layer.input_layernorm.weight.detach(),
                                      layer.post_attention_layernorm.weight.detach(), qkv, o, gate_up, down))
        self._static = compiled.StaticDecode(self) if use_compiled else None

    def _groups(self, layer: int, mods: list[tuple[str, nn.Linear]]) -> tuple[_Group, ...]:
        """The projections `mods` (same input) as one fused group, or one group each when not fused."""
        parts = [mods] if self.fused else [[m] for m in mods]
        out = []
        for part in parts:
            ws = [m.weight.detach() for _, m in part]
            bs = [m.bias.detach() if m.bias is not None else None for _, m in part]
            if any(b is not None for b in bs):
                bs = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)  # (sum out, in)
            b = bs[0] if len(bs) == 1 or bs[0] is None else torch.cat(bs)
            out.append(_Group(projection(w, b, self.kernel), tuple(self.key(layer, p) for p, _ in part),
                              tuple(m.out_features for _, m in part)))
        return tuple(out)

    # ---- description ------------------------------------------------------------------------------------
    @staticmethod
    def key(layer: int, proj: str) -> str:
        """The layer key of projection `proj` in decoder layer `layer` (the transformers module name)."""
        return f"model.layers.{layer}.{'self_attn' if proj in ATTN_PROJ else 'mlp'}.{proj}"

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{layer key: (in_features, out_features)} of every LoRA-able projection and the output head, for
        AdapterPool (register `embedding_shapes` too)."""
        return {**self._shapes, HEAD_KEY: (self.hidden, self.vocab)}

    def embedding_shapes(self) -> dict[str, tuple[int, int]]:
        """{EMBED_KEY: (vocab, hidden)}: the input embedding, an embedding layer of AdapterPool (embedding LoRA and
        trainable tokens per row, loraplex.runtime.embedding)."""
        return {EMBED_KEY: (self.vocab, self.hidden)}

    @property
    def compiled(self) -> bool:
        """Whether decode runs through compiled graphs (False when off, or after a failure to compile)."""
        return self._static is not None

    def new_cache(self, *, max_lanes: int, max_len: int) -> KVCache:
        return KVCache(len(self.layers), self.n_kv, self.head_dim, max_lanes=max_lanes,
                       max_len=min(max_len, self.max_positions), dtype=self.dtype, device=self.device)

    # ---- entry points -----------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, ids: torch.Tensor, plan: BatchPlan | None = None) -> torch.Tensor:
        """Full causal forward without a cache: ids (B, L) -> logits (B, L, V)."""
        B, L = ids.shape
        pos = torch.arange(L, device=self.device).expand(B, L)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        h = self._forward(ids, pos, L, plan, attend)  # (B, L, H)
        return self.head(h, plan)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache, lanes: list[int],
                plan: BatchPlan | None = None, *, hidden: bool = False):
        """ids (n, L) right-padded, lengths (n,) -> logits (n, V) at each row's last real token; with
        hidden=True, (those logits, final-norm hidden states (n, L, H) of every position) (`head` makes
        logits of them).

        Writes keys/values of positions 0..L-1 of row j into lane lanes[j] (pads included; they lie past
        the lane's length and are masked until overwritten).
        """
        n, L = ids.shape
        cache.reserve(max(lanes) + 1, L)
        pos = torch.arange(L, device=self.device).expand(n, L)
        rows = torch.tensor(lanes, device=self.device)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i][rows, :, :L] = k  # (n, n_kv, L, hd) into the rows' lanes
            cache.v[i][rows, :, :L] = v
            # right padding: a real token only sees earlier positions, all real, so causal is enough
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        h = self._forward(ids, pos, L, plan, attend)  # (n, L, H)
        last = h[torch.arange(n, device=self.device), lengths.to(self.device) - 1]  # (n, H)
        logits = self.head(last, plan)  # (n, V)
        return (logits, h) if hidden else logits

    def head(self, h: torch.Tensor, plan: BatchPlan | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, [L,] H) -> logits (B, [L,] V) for the B rows of `plan`: a row whose adapter
        holds a modules_to_save copy of lm_head runs it (the others the base head), then each row's LoRA on the
        head (e.g. a tied head's trainable tokens) is added."""
        lay = plan.saved.get(HEAD_KEY) if plan is not None and plan.saved else None
        if lay is None:
            y = self.lm_head(h)
        else:
            y = lay.run(lambda hs, copy: self.lm_head(hs) if copy is None else _linear_copy(hs, copy), h)
        if plan is not None and HEAD_KEY in plan.layers:
            plan.apply_(HEAD_KEY, h, y)
        return y

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               plan: BatchPlan | None = None) -> torch.Tensor:
        """tokens (B,), positions (B,) for lanes 0..B-1 -> next-token logits (B, V). With compile on, the step
        runs as a compiled graph (runtime.compiled; eager when it cannot be compiled)."""
        if self._static is not None and graph_ready(plan) and self._static.runs(tokens.shape[0], positions, cache):
            return self._static.decode(tokens, positions, cache, plan)
        span = int(positions.max()) + 1
        cache.reserve(tokens.shape[0], span)
        return self.step(tokens.to(self.device), positions.to(self.device), cache.k, cache.v, span, plan)

    def warm_up(self, cache: KVCache) -> None:
        """With compile on, compile the base-only decode graph for `cache` now (runtime.compiled.StaticDecode)."""
        if self._static is not None:
            self._static.warm_up(cache)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
             span: int, plan, real: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step over cache tensors ks[l], vs[l] (lanes >= B, n_kv, >= span, hd) -> logits (B, V);
        `plan` has BatchPlan's apply_. real (B,) bool, when given: rows where it is False write back the cache
        entries they read (their writes are no-ops; the compiled path's pad rows)."""
        B = tokens.shape[0]
        lanes = torch.arange(B, device=self.device)
        hide = torch.arange(span, device=self.device) > positions[:, None]  # (B, S) past each lane's position
        # additive mask (B, 1, 1, S), made once per step: SDPA would convert a boolean one at every layer
        mask = torch.zeros(B, 1, 1, span, dtype=self.dtype, device=self.device)
        mask.masked_fill_(hide[:, None, None], -math.inf)
        group = self.n_heads // self.n_kv

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = ks[i], vs[i]
            k, v = k[:, :, 0], v[:, :, 0]  # (B, n_kv, hd)
            if real is not None:
                keep = real[:, None, None]
                k, v = torch.where(keep, k, kc[lanes, :, positions]), torch.where(keep, v, vc[lanes, :, positions])
            kc[lanes, :, positions] = k  # into each lane at its position
            vc[lanes, :, positions] = v
            # the heads sharing a kv head as `group` query positions of it (B, n_kv, group, hd): the same math
            # as enable_gqa, and in bf16 ~4x faster on CPU than one query position per head
            q = q.reshape(B, self.n_kv, group, self.head_dim)
            out = decode_attention(q, kc[:B, :, :span], vc[:B, :, :span], mask, self.scale)  # (B, n_kv, group, hd)
            return out.view(B, self.n_heads, 1, self.head_dim)

        h = self._forward(tokens[:, None], positions[:, None], span, plan, attend)  # (B, 1, H)
        return self.head(h[:, 0], plan)  # (B, V)

    # ---- the layer loop ---------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, span: int, plan: BatchPlan | None,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """ids (B, L), pos (B, L) with every position < span -> final-norm hidden states (B, L, H)."""
        B, L = ids.shape
        x = F.embedding(ids, self.embed)  # (B, L, H)
        if plan is not None and EMBED_KEY in plan.embeddings:
            plan.embeddings[EMBED_KEY].apply_(ids, x)  # each row's embedding LoRA / trainable tokens
        cos, sin = self._rope(pos, span)  # (B, L, 1, hd) each
        for i, lay in enumerate(self.layers):
            h = self._norm(x, lay.ln_attn, plan, f"model.layers.{i}.input_layernorm")
            q, k, v = self._proj(lay.qkv, h, plan)  # (B, L, nh * hd), (B, L, n_kv * hd) x 2
            q, k = self._rotary(q, k, cos, sin)  # (B, nh | n_kv, L, hd)
            v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
            a = attend(i, q, k, v).transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
            x = x + self._proj(lay.o, a, plan)[0]
            h = self._norm(x, lay.ln_mlp, plan, f"model.layers.{i}.post_attention_layernorm")
            g, u = self._proj(lay.gate_up, h, plan)  # (B, L, I) each
            x = x + self._proj(lay.down, F.silu(g) * u, plan)[0]
        return self._norm(x, self.norm, plan, "model.norm")

    def _rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, L, nh * hd), k (B, L, n_kv * hd), cos/sin from `_rope` -> rotated q (B, nh, L, hd) and
        k (B, n_kv, L, hd). Eagerly as one tensor when k follows q in memory (the fused q/k/v GEMM): half the ops.
        A compiled graph has no addresses to compare and rotates each (inductor fuses each chain anyway)."""
        B, L, nh, hd = *q.shape[:2], self.n_heads, self.head_dim
        if not torch.compiler.is_compiling() and _follows(q, k):
            joined = q.as_strided((B, L, q.shape[-1] + k.shape[-1]), q.stride())
            qk = _rotate(joined.view(B, L, nh + self.n_kv, hd), cos, sin).transpose(1, 2)
            return qk[:, :nh], qk[:, nh:]
        return (_rotate(q.view(B, L, nh, hd), cos, sin).transpose(1, 2),
                _rotate(k.view(B, L, self.n_kv, hd), cos, sin).transpose(1, 2))

    def _norm(self, x: torch.Tensor, w: torch.Tensor, plan: BatchPlan | None, key: str) -> torch.Tensor:
        """RMS norm `key` of x (B, L, H): rows whose adapter holds a modules_to_save copy of it use its weight."""
        lay = plan.saved.get(key) if plan is not None and plan.saved else None
        if lay is None:
            return self._rms(x, w)
        return lay.run(lambda xs, copy: self._rms(xs, w if copy is None else copy["weight"]), x)

    @staticmethod
    def _proj(groups: tuple[_Group, ...], x: torch.Tensor, plan: BatchPlan | None) -> list[torch.Tensor]:
        """x (B, L, in) -> each projection's output (B, L, out_j), LoRA added in place (views of a fused GEMM)."""
        out: list[torch.Tensor] = []
        for grp in groups:
            y = grp.proj(x)
            parts = y.split(grp.sizes, dim=-1) if len(grp.sizes) > 1 else (y,)
            if plan is not None:
                for key, part in zip(grp.keys, parts):
                    plan.apply_(key, x, part)
            out.extend(parts)
        return out

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _rope(self, pos: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, L), every position < span -> cos, sin (B, L, 1, hd) for `_rotate`: rows of tables of the angle
        p * inv_freq, cos of the half-size table repeated twice and sin with the first half negated, computed once
        for positions 0..P-1 (P doubles when outgrown)."""
        cos, sin = self._rope_tables
        if span > cos.shape[0]:
            n = max(span, min(self.max_positions, max(2 * cos.shape[0], 64)))
            ang = torch.arange(n, device=self.device).float()[:, None] * self.inv_freq.to(self.device)  # (P, hd/2)
            c, s = ang.cos() * self.rope_scaling, ang.sin() * self.rope_scaling
            cos = torch.cat((c, c), dim=-1).to(self.dtype)  # (P, hd)
            sin = torch.cat((-s, s), dim=-1).to(self.dtype)
            self._rope_tables = (cos, sin)
        return cos[pos][:, :, None], sin[pos][:, :, None]


def saved_places(hf_model: nn.Module | CompactLlama) -> frozenset[str]:
    """The module keys of `hf_model` (or of the CompactLlama built from it) whose modules_to_save copies the compact
    decoder serves per row: lm_head, the final norm and every layer's two norms (embed_tokens is not among them)."""
    n = hf_model.config.num_hidden_layers
    norms = [f"model.layers.{i}.{p}" for i in range(n) for p in ("input_layernorm", "post_attention_layernorm")]
    return frozenset(["lm_head", "model.norm", *norms])


def _linear_copy(h: torch.Tensor, copy: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(h, copy["weight"], copy.get("bias"))  # a modules_to_save copy of a Linear (lm_head) on h


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q (B, n_kv, g, hd) against k, v (B, n_kv, S, hd) with an additive mask (B, 1, 1, S) -> (B, n_kv, g, hd):
    softmax(q k^T * scale + mask) v. Up to MATMUL_ATTENTION_MAX_SPAN[dtype] as two fp32 matmuls (bf16 inputs
    upcast, the result rounded back once): with a few query positions per lane this is ~2.5x faster on CPU than
    SDPA's flash kernel at span 32 in fp32 and ~1.5x at span 17 in bf16 (same math; fp32 rounding ~5e-7, bf16
    within one bf16 step of SDPA, whose scores are fp32 as well). Longer spans and other dtypes keep SDPA, except in
    a compiled graph (one graph for every span: runtime.compiled)."""
    if not torch.compiler.is_compiling() and k.shape[-2] > MATMUL_ATTENTION_MAX_SPAN.get(q.dtype, 0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v, mask = q.float(), k.float(), v.float(), mask.float()
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask)  # (B, n_kv, g, S)
    return torch.matmul(torch.softmax(s, dim=-1), v).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., hd) in the HF checkpoints' pairing, x * cos + (-x2, x1) * sin over the halves
    (x1, x2) of the last dim, as x * cos + (x2, x1) * (-sin, sin) with `sin` given so (`_rope`): the same values
    bit for bit, in four ops."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (x2, x1)
    return (x * cos).add_(swapped.mul_(sin))


def _follows(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether k (..., b) directly follows q (..., a) in memory with q's strides, so (..., a + b) views both (the
    parts of one fused GEMM's output)."""
    return (q.stride() == k.stride() and q.stride(-1) == 1 and q.shape[:-1] == k.shape[:-1]
            and k.data_ptr() == q.data_ptr() + q.shape[-1] * q.element_size())


def graph_ready(plan: BatchPlan | None) -> bool:
    """Whether the compiled step computes `plan` exactly: its graphs hold the projections' LoRA and DoRA rows
    only; a plan with LoRA-B biases, modules_to_save copies, embedding rows or head LoRA runs eagerly."""
    return plan is None or not (plan.bias or plan.saved or plan.embeddings or plan.layers.get(HEAD_KEY) is not None)
