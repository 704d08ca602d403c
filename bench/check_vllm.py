"""vLLM serves loraplex adapters unchanged: same greedy tokens as `loraplex serve` (a check, not a timing).

    python bench/check_vllm.py              # creates/reuses the vLLM venv (bench/vllm_env.py; a few GB once)
    python bench/check_vllm.py --no-install # exit 2 when the venv is absent

Writes two r=8 adapters on every linear layer of SmolLM2-135M with `loraplex.save_adapter` (random A, small
random B: they move greedy output without derailing it), starts vLLM (CPU, fp32) with them as
`--lora-modules a0=DIR a1=DIR` and `loraplex serve` on the same folder, then asks both for the same greedy
completions (token-id prompts, 16 tokens, ignore_eos) from the base and from each adapter. vLLM returns its
token ids (`return_token_ids`); loraplex returns each token's text (`logprobs: 1`), so the ids are compared as
the tokenizer's text of each id, position by position, and the chosen tokens' logprobs side by side.
Exit 0 when every completion agrees at every position; the table shows where they part otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_env  # noqa: E402  (bench/ is not a package)
from serve_load import free_port, stop, wait_ready  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(folder: Path, names: Sequence[str], rank: int = 8, b_std: float = 0.02) -> None:
    """One loraplex adapter per name under `folder`: A as PEFT's init_lora_weights=False draws it, B ~ N(0, b_std)."""
    import torch

    import loraplex as lp
    from loraplex.models import load_base

    for seed, name in enumerate(names):
        model, _ = load_base("smollm2")
        lp.inject(model, lp.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                       init_lora_weights=False), name, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
        lp.save_adapter(model, name, folder / name)


def complete(url: str, model: str, prompt: list[int], tokens: int, vllm: bool) -> tuple[list[str], list[float], list[int]]:
    """Greedy completion: (token texts, chosen logprobs, token ids or [] where the server gives none)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}
    if vllm:
        body["return_token_ids"] = True
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], choice.get("token_ids") or []


def token_texts(tok, texts: list[str], ids: list[int]) -> list[str]:
    """Each generated token's text: the tokenizer's text of each id where the server gave ids (vLLM), else its
    own per-token texts (loraplex's logprobs tokens)."""
    return [tok.decode([i], skip_special_tokens=False) for i in ids] if ids else texts


def first_difference(a: list[str], b: list[str]) -> Optional[int]:
    """The first position where the two token sequences differ (a length difference counts); None if equal."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run(venv: Path, tokens: int, install: bool) -> int:
    from transformers import AutoTokenizer

    from loraplex.models import smollm2_path
    from loraplex.report import format_table

    if not install and not vllm_env.ready(venv):
        print(f"no vLLM venv at {venv}; run bench/vllm_env.py (a few GB) or drop --no-install", file=sys.stderr)
        return 2
    if install:
        vllm_env.ensure(venv)
    base_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(base_dir)
    names = ["a0", "a1"]
    with tempfile.TemporaryDirectory(prefix="loraplex-vllm-") as tmp:
        folder = Path(tmp) / "adapters"
        write_adapters(folder, names)
        vport, lport = free_port(), free_port()
        vcmd = vllm_env.server_command(base_dir, {n: folder / n for n in names}, vport, venv) + [
            "--served-model-name", "base", "--max-model-len", "512", "--max-num-seqs", "4"]
        lcmd = [sys.executable, "-m", "loraplex", "serve", "--base", "smollm2", "--adapters", str(folder),
                "--port", str(lport), "--device", "cpu", "--log-level", "warning"]
        vlog = open(Path(tmp) / "vllm.log", "wb")
        procs = [subprocess.Popen(vcmd, env=vllm_env.server_env(venv), stdout=vlog, stderr=subprocess.STDOUT),
                 subprocess.Popen(lcmd)]
        vurl, lurl = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{lport}"
        try:
            wait_ready(procs[1], lurl, "/health", 600)
            try:
                wait_ready(procs[0], vurl, "/health", 900)
            except RuntimeError:
                print("".join((Path(tmp) / "vllm.log").read_text().splitlines(True)[-30:]), file=sys.stderr)
                raise
            rows, bad, base_out, moved = [], 0, {}, 0
            for model in ["base", *names]:
                for text in PROMPTS:
                    prompt = tok(text)["input_ids"]
                    vt, vlp, vids = complete(vurl, model, prompt, tokens, vllm=True)
                    lt, llp, _ = complete(lurl, model, prompt, tokens, vllm=False)
                    vtexts = token_texts(tok, vt, vids)
                    moved += model != "base" and vids != base_out.setdefault(text, vids)
                    same = first_difference(vtexts, lt)
                    agree = len(vids) == len(lt) == tokens and same is None and vtexts == vt
                    bad += not agree
                    dlp = max((abs(a - b) for a, b in zip(vlp, llp)), default=float("nan"))
                    rows.append([model, text[:28], len(lt), "yes" if agree else f"no (from {same})",
                                 f"{dlp:.2g}", " ".join(map(str, vids[:6])) + " ...",
                                 repr("".join(lt))[:40]])
        finally:
            for p in procs:
                stop(p)
            vlog.close()
    print(format_table(rows, ["model", "prompt", "tokens", "same ids", "max |dlogprob|", "vLLM ids", "loraplex text"]))
    print(f"{len(rows) - bad}/{len(rows)} completions agree token for token (vLLM {vllm_env.VLLM}, fp32, greedy, "
          f"{tokens} tokens, ignore_eos; adapters r=8 on {len(TARGETS)} projections, written by loraplex.save_adapter); "
          f"the adapters changed {moved}/{len(names) * len(PROMPTS)} completions from the base's")
    return 0 if bad == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=vllm_env.DEFAULT_VENV)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--no-install", action="store_true", help="exit 2 instead of creating the vLLM venv")
    args = ap.parse_args(argv)
    return run(args.venv, args.tokens, not args.no_install)


if __name__ == "__main__":
    sys.exit(main())
