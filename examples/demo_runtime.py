"""Demo step: one batch served by several adapters at once (loraplex.runtime.MultiLoraModel).

`demo_runtime(model, tok, adapter_dirs)` loads the adapters into an engine over `model`, runs ONE batched
generate in which every row has its own adapter (one row the bare base, one a weighted mix), prints each
row's adapter and answer, checks that row 0 gets the same answer when run alone, and hands the model back
unwrapped. Called from examples/demo.py; standalone:

    .venv/bin/python examples/demo_runtime.py ADAPTER_DIR [ADAPTER_DIR ...]     (on SmolLM2-135M)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch

from loraplex.runtime import MultiLoraModel

PROMPTS = ["What is a computer virus?", "Tell me a joke about programmers.", "Name three colours.",
           "What is the capital of France?", "Why is the sky blue?"]


def _prompt_ids(tok, prompt: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text).input_ids
    return tok.encode(prompt)


def _label(spec) -> str:
    if spec is None:
        return "(base)"
    if isinstance(spec, Mapping):
        return " + ".join(f"{w:g}*{n}" for n, w in spec.items())
    return str(spec)


def demo_runtime(model: torch.nn.Module, tok, adapter_dirs: Union[Mapping[str, Path], Sequence[Path]],
                 max_new_tokens: int = 24) -> None:
    """Serve one batch with a different adapter per row and print each row's adapter and answer."""
    dirs = dict(adapter_dirs) if isinstance(adapter_dirs, Mapping) else {Path(d).name: d for d in adapter_dirs}
    engine = MultiLoraModel(model, tokenizer=tok)
    try:
        t0 = time.perf_counter()
        for name, d in dirs.items():
            engine.load(name, d)
        names = list(dirs)
        print(f"loaded {len(names)} adapter(s) {names} in {(time.perf_counter() - t0) * 1e3:.0f} ms; "
              f"{len(engine.wrapped)} layers wrapped, {engine.stats.resident_bytes / 2**20:.1f} MiB of adapters")
        rows: list = names + [None]
        if len(names) >= 2:
            rows.append({names[0]: 0.5, names[1]: 0.5})
        prompts = [_prompt_ids(tok, PROMPTS[i % len(PROMPTS)]) for i in range(len(rows))]
        t0 = time.perf_counter()
        out = engine.generate(prompts, adapters=rows, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        tokens = sum(len(g.token_ids) for g in out)
        print(f"one batch of {len(rows)} rows, {tokens} tokens in {dt:.1f} s:")
        for i, (spec, g) in enumerate(zip(rows, out)):
            print(f"  [{i}] adapter {_label(spec):<22} Q: {PROMPTS[i % len(PROMPTS)]}")
            print(f"      A: {g.text.strip().replace(chr(10), ' ')!r} ({g.finish_reason})")
        alone = engine.generate(prompts[:1], adapters=rows[:1], max_new_tokens=max_new_tokens)[0]
        print(f"row 0 run alone gives the same tokens as in the batch: {alone.token_ids == out[0].token_ids}")
    finally:
        engine.unwrap()


def main(argv: list[str]) -> int:
    from loraplex.models import load_base

    if not argv:
        print(__doc__)
        return 2
    model, tok = load_base("smollm2")
    demo_runtime(model, tok, [Path(a) for a in argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
