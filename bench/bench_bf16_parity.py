"""bf16 against fp32 in the serving decoder: how far `loraplex serve --dtype bf16` answers from fp32.

SmolLM2-135M-Instruct as the compact decoder (CompactLlama, the server's default kernels) in fp32 and in bf16
(the same weights rounded), over --prompts chat prompts from chatterbot-corpus (coding, science, trivia;
the chat template applied), batched, greedy, --tokens new tokens each; once for the base alone and once with
16 random r=8 adapters on all 7 projections (row b gets adapter b % 16, A ~ N(0, 1/in), B ~ N(0, 0.02^2),
scale 2; its own effect on fp32 logits is printed so the parity can be read against it).

Measured per configuration:
  greedy identical     prompts whose whole bf16 greedy continuation equals fp32's
  first divergence     median index of the first differing token over the prompts that differ
  teacher-forced agreement   over every position of fp32's continuation, bf16 fed the same tokens: the share
                       of positions where bf16's argmax equals fp32's
  max / mean |dlogit|  over those positions and the whole vocabulary, bf16 vs fp32 logits
  adapter effect       max / mean |dlogit| of fp32 with the adapters vs fp32 base (the size of what LoRA adds)

    .venv/bin/python bench/bench_bf16_parity.py [--prompts 32] [--tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from loraplex import models
from loraplex.report import format_table
from loraplex.runtime import AdapterPool
from loraplex.runtime.decoder import CompactLlama
from loraplex.train.sources import load_records

TOPICS = ("coding", "science", "trivia")
ADAPTERS, RANK, SCALE = 16, 8, 2.0


def prompts(tokenizer, n: int) -> list[list[int]]:
    """The first n user turns (round robin over TOPICS) as chat-template token ids, generation prompt added."""
    per_topic = [list(load_records(f"chatterbot:{t}", skip_bad=True)) for t in TOPICS]
    out = []
    for i in range(n):
        rec = per_topic[i % len(TOPICS)][i // len(TOPICS)]
        user = [m for m in rec.chat() if m["role"] == "user"][:1]
        text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def adapter_pool(model: CompactLlama, dtype: torch.dtype) -> AdapterPool:
    """ADAPTERS random adapters (seeded: the same values for every dtype, rounded to it by the pool)."""
    gen = torch.Generator().manual_seed(0)
    pool = AdapterPool(model.layer_shapes(), dtype=dtype, max_plans=0)
    for a in range(ADAPTERS):
        t = {k: (torch.randn(RANK, i, generator=gen) / i ** 0.5, torch.randn(o, RANK, generator=gen) * 0.02)
             for k, (i, o) in model.layer_shapes().items()}
        pool.add(f"a{a}", f"h{a}", t, {k: SCALE for k in t})
    return pool


@torch.no_grad()
def greedy(model: CompactLlama, ids: list[list[int]], steps: int, plan) -> torch.Tensor:
    """Greedy continuations (n, steps) of every prompt in one batch (prompts right-padded, one lane each)."""
    n, L = len(ids), max(map(len, ids))
    batch = torch.zeros(n, L, dtype=torch.long)
    for j, row in enumerate(ids):
        batch[j, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    cache = model.new_cache(max_lanes=n, max_len=L + steps + 1)
    logits = model.prefill(batch, lengths, cache, list(range(n)), plan)
    out = []
    for s in range(steps):
        tok = logits.float().argmax(-1)
        out.append(tok)
        if s + 1 < steps:
            logits = model.decode(tok, lengths + s, cache, plan)
    return torch.stack(out, 1)  # (n, steps)


@torch.no_grad()
def forced_logits(model: CompactLlama, ids: list[list[int]], cont: torch.Tensor, plan) -> torch.Tensor:
    """Logits (n, steps, V) in fp32 predicting each token of `cont`, the model fed prompt + cont (teacher forced)."""
    rows = []
    for j, row in enumerate(ids):  # one row at a time: full causal forward, no padding to reason about
        full = torch.tensor(row + cont[j].tolist())[None]
        sub = plan_row(plan, j)
        lg = model.logits(full, sub)[0].float()  # (L, V)
        rows.append(lg[len(row) - 1: len(row) - 1 + cont.shape[1]])
    return torch.stack(rows)


def plan_row(plan, j: int):
    """The one-row plan of row j of `plan` (None stays None)."""
    if plan is None:
        return None
    pool, assign = plan
    return pool.plan([assign[j]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf32, tok = models.load_base("smollm2", dtype=torch.float32)
    hf16, _ = models.load_base("smollm2", dtype=torch.bfloat16)
    m = {"fp32": CompactLlama(hf32), "bf16": CompactLlama(hf16)}
    ids = prompts(tok, args.prompts)
    assign = [b % ADAPTERS for b in range(len(ids))]
    pools = {d: adapter_pool(m[d], dt) for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    rows = []
    for label, use in (("base", False), (f"{ADAPTERS} adapters", True)):
        plans = {d: (pools[d].plan(assign) if use else None) for d in m}
        cont = {d: greedy(m[d], ids, args.tokens, plans[d]) for d in m}
        same = (cont["fp32"] == cont["bf16"]).all(1)
        firsts = [int((cont["fp32"][j] != cont["bf16"][j]).nonzero()[0]) for j in range(len(ids)) if not same[j]]
        lg = {d: forced_logits(m[d], ids, cont["fp32"], (pools[d], assign) if use else None) for d in m}
        diff = (lg["bf16"] - lg["fp32"]).abs()
        agree = (lg["bf16"].argmax(-1) == cont["fp32"]).float().mean().item()
        effect = "-"
        if use:
            e = (lg["fp32"] - forced_logits(m["fp32"], ids, cont["fp32"], None)).abs()
            effect = f"{e.max():.2f} / {e.mean():.3f}"
        rows.append([label, f"{int(same.sum())}/{len(ids)}",
                     f"{statistics.median(firsts):.0f}" if firsts else "-", f"{100 * agree:.1f}%",
                     f"{diff.max():.3f} / {diff.mean():.4f}", effect])
    print(f"SmolLM2-135M-Instruct, compact decoder bf16 vs fp32: {len(ids)} chatterbot prompts x {args.tokens} "
          f"greedy tokens, {args.threads} threads")
    print(format_table(rows, ["config", "greedy identical", "first divergence", "teacher-forced agreement",
                              "max / mean |dlogit|", "adapter effect max / mean"]))


if __name__ == "__main__":
    main()
