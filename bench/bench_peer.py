"""Issue 17's protocol: `loraplex serve` against vLLM's CPU server, fp32 and bf16, in interleaved rounds.

    flock /tmp/loraplex-bench.lock .venv/bin/python bench/bench_peer.py --rounds 3
    flock /tmp/loraplex-bench.lock .venv/bin/python bench/bench_peer.py --rounds 3 --clients 64 --max-batch 64 \\
        --adapters 64 --requests 128
    .venv/bin/python bench/bench_peer.py --num-layers 2 --rounds 1 --requests 4 --out /tmp/peer.json   # smoke

Servers (--servers; default all six), each over the same base directory and the same K random r=8 adapters on
all 7 projections (PEFT files, bench/serve_load.py):
    loraplex-fp32, loraplex-bf16   `loraplex serve --dtype fp32|bf16 --threads T --max-batch B`
    loraplex-fp32-compile, ...     the same with --compile (not in the default: it compiles for minutes at start)
    vllm-fp32-lora, vllm-bf16-lora vLLM (bench/vllm_env.py) --dtype float32|bfloat16 --enable-lora
                                   --max-loras min(K, B) --max-cpu-loras K --max-num-seqs B
    vllm-fp32, vllm-bf16           vLLM without --enable-lora (its compiled path): the no-adapter workload only
vLLM gets OpenMP on cores 0..T-1 (VLLM_CPU_OMP_THREADS_BIND); loraplex T torch threads.
Workloads: "base" (no adapter) and each K of --adapters: request i names adapter a{i % K}. Every request: the
same 16 random prompt token ids per i for every server, greedy (or --temperature/--top-p sampling), ignore_eos,
exactly --max-tokens generated,
streamed (TTFT = time to the first chunk with text) unless --no-stream, --clients in flight.

Each round starts every server fresh, one at a time (they never compete), in an order rotated by one per round;
a server runs a warm-up (every model once, a batch of --clients 4-token requests), then each workload. Measured
per (server, workload, round): output tokens/s, p50 latency, p50 TTFT, CPU seconds (the server's process tree,
/proc) per 1000 tokens; per (server, round): startup seconds (process start to GET /v1/models = 200). Printed:
medians over rounds [min-max], then the issue's ratios (median of the per-round ratios [min-max]) with PASS/FAIL,
then greedy token identity (round 1, the first --check requests of each workload, non-streamed) of every
server against loraplex-fp32. A server that fails to start is reported with its log's tail and skipped after.
Everything also goes to a JSON file (--out; default bench/results/peer_vllm-<clients>c-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
from safetensors.torch import load_file, save_file

from loraplex.models import smollm2_path
from loraplex.outputs import check_output, write_json
from loraplex.report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_env  # noqa: E402  (bench/ is not a package)
from check_vllm import complete, first_difference, token_texts  # noqa: E402
from serve_load import (add_sampling_flags, free_port, load, loraplex_command, sampling, stop,  # noqa: E402
                        token_prompts, tree_cpu_seconds, wait_ready, write_adapters)


@dataclass(frozen=True)
class Spec:
    name: str
    engine: str  # "loraplex" | "vllm"
    dtype: str  # "fp32" | "bf16"
    lora: bool  # serves adapters (else the no-adapter workload only)
    compile: bool = False  # loraplex --compile


SPECS = {s.name: s for s in [
    Spec("loraplex-fp32", "loraplex", "fp32", True), Spec("loraplex-bf16", "loraplex", "bf16", True),
    Spec("vllm-fp32-lora", "vllm", "fp32", True), Spec("vllm-fp32", "vllm", "fp32", False),
    Spec("vllm-bf16-lora", "vllm", "bf16", True), Spec("vllm-bf16", "vllm", "bf16", False),
    Spec("loraplex-fp32-compile", "loraplex", "fp32", True, compile=True),
    Spec("loraplex-bf16-compile", "loraplex", "bf16", True, compile=True)]}
DEFAULT_SERVERS = ",".join(s.name for s in SPECS.values() if not s.compile)
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
# (what, dtype, target): throughput vs the best vLLM server of the dtype for the workload
TPS_TARGETS = {"fp32": 1.2, "bf16": 1.0}
OWN_BASE_TARGET = 0.85  # fp32, K > 1 adapters vs loraplex's own no-adapter
STARTUP_LIMIT_S = 10.0


def base_directory(base: str, num_layers: Optional[int], tmp: Path) -> Path:
    """A transformers directory (with tokenizer) both servers load: `base` ('smollm2' or a directory), cut to
    its first `num_layers` decoder layers in a copy under `tmp` when asked."""
    src = smollm2_path() if base == "smollm2" else Path(base)
    if not (src / "config.json").is_file():
        raise SystemExit(f"--base must be 'smollm2' or a transformers directory with a tokenizer (vLLM loads it "
                         f"too); got {base!r}")
    if not num_layers:
        return src
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"--num-layers needs {src}/model.safetensors (one file, not shards)")
    dst = tmp / "base"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    keep = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def start(spec: Spec, args: argparse.Namespace, base: Path, folder: Path, ks: list[int],
          log: Path) -> tuple[subprocess.Popen, str, float]:
    """Start `spec`'s server; return (process, url, seconds from start to GET /v1/models = 200)."""
    port, maxk = free_port(), max(ks, default=1)
    if spec.engine == "loraplex":
        cmd = loraplex_command(str(base), folder, port, max_batch=args.max_batch, max_tokens=args.max_tokens,
                               prompt_tokens=args.prompt_tokens, queue_size=args.requests + args.clients + maxk + 8,
                               threads=args.threads, dtype=spec.dtype, extra=["--compile"] if spec.compile else [])
        env = dict(os.environ)
    else:
        adapters = {f"a{i}": folder / f"a{i}" for i in range(maxk)} if spec.lora and ks else {}
        cmd = vllm_env.server_command(base, adapters, port, args.vllm_venv, args.rank, dtype=VLLM_DTYPE[spec.dtype])
        cmd += ["--served-model-name", "base", "--max-num-seqs", str(args.max_batch),
                "--max-model-len", str(args.prompt_tokens + args.max_tokens + 64)]
        if adapters:
            cmd += ["--max-loras", str(min(maxk, args.max_batch)), "--max-cpu-loras", str(maxk)]
        env = vllm_env.server_env(args.vllm_venv, cores=f"0-{args.threads - 1}")
    with open(log, "wb") as fh:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, "/v1/models", args.startup_timeout, poll=0.1)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url, time.monotonic() - t0


def tail(log: Path, lines: int = 15) -> str:
    return "\n    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-lines:])


def workloads(spec: Spec, ks: list[int]) -> list[str]:
    return ["base"] + ([str(k) for k in ks] if spec.lora else [])


def models_of(workload: str, n: int) -> list[str]:
    return ["base"] * n if workload == "base" else [f"a{i % int(workload)}" for i in range(n)]


def run_server(spec: Spec, args: argparse.Namespace, url: str, pid: int, ks: list[int], prompts: list[list[int]],
               round_: int, check: bool) -> tuple[list[dict], dict]:
    """Warm-up, then every workload of `spec` timed; with `check`, the greedy outputs of the first --check
    requests per workload. Returns (records, {workload: [(texts, logprobs, ids)]})."""
    warm = ["base"] + ([f"a{i}" for i in range(max(ks))] if spec.lora and ks else [])
    warm = (warm * (args.clients // len(warm) + 1))[:max(args.clients, len(warm))]
    asyncio.run(load(url, warm, token_prompts(len(warm), args.prompt_tokens, args.vocab, seed=1), args.clients, 4,
                     args.timeout))
    records = []
    for w in workloads(spec, ks):
        cpu0 = tree_cpu_seconds(pid)
        res = asyncio.run(load(url, models_of(w, args.requests), prompts, args.clients, args.max_tokens,
                               args.timeout, stream=not args.no_stream, sampling=args.sampling))
        cpu = tree_cpu_seconds(pid) - cpu0
        rec = {"round": round_, "server": spec.name, "workload": w, "tokens": res.tokens, "wall_s": res.wall,
               "tok_s": res.tokens / res.wall, "p50_s": statistics.median(res.latencies),
               "ttft_p50_s": statistics.median(res.ttfts) if res.ttfts else None,
               "cpu_s_per_1k_tokens": 1000 * cpu / res.tokens, "loadavg": os.getloadavg()[0]}
        ttft = f"{rec['ttft_p50_s']:.2f}" if rec["ttft_p50_s"] is not None else "-"
        print(f"  {spec.name:<15} K={w:<5} {rec['tok_s']:8.1f} tok/s  p50 {rec['p50_s']:.2f} s  TTFT {ttft} s  "
              f"{rec['cpu_s_per_1k_tokens']:.1f} CPU s/1k tok", flush=True)
        records.append(rec)
    outputs = {}
    if check:
        for w in workloads(spec, ks):
            outputs[w] = [complete(url, m, prompts[i], args.max_tokens, vllm=spec.engine == "vllm")
                          for i, m in enumerate(models_of(w, args.check))]
    return records, outputs


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def series(records: list[dict], server: str, workload: str, key: str) -> dict[int, float]:
    return {r["round"]: r[key] for r in records
            if r["server"] == server and r["workload"] == workload and r[key] is not None}


def ratio(records: list[dict], num: str, den: str, workload: str, key: str, den_workload: Optional[str] = None,
          invert: bool = False) -> list[float]:
    """Per-round num/den of `key` (den/num with invert: for times, where lower is better)."""
    a, b = series(records, num, workload, key), series(records, den, den_workload or workload, key)
    return [(b[r] / a[r]) if invert else (a[r] / b[r]) for r in sorted(a.keys() & b.keys())]


def best_vllm(records: list[dict], dtype: str, workload: str) -> Optional[str]:
    """The vLLM server of `dtype` with the highest median tokens/s on `workload` (None when none ran)."""
    tps = {s.name: statistics.median(v.values()) for s in SPECS.values()
           if s.engine == "vllm" and s.dtype == dtype and (v := series(records, s.name, workload, "tok_s"))}
    return max(tps, key=tps.get) if tps else None


def target_rows(records: list[dict], startups: dict[str, list[float]], ks: list[int]) -> list[list[str]]:
    rows = []

    def add(what: str, values: list[float], target: float, fmt: str = "{:.2f}x") -> None:
        verdict = "-" if not values else ("PASS" if statistics.median(values) >= target else "FAIL")
        rows.append([what, spread(values, fmt), f">= {fmt.format(target)}", verdict])

    runs = [(dtype, target, lp) for dtype, target in TPS_TARGETS.items()
            for lp in (f"loraplex-{dtype}", f"loraplex-{dtype}-compile")]
    for dtype, target, lp in runs:
        for w in ["base"] + [str(k) for k in ks]:
            peer, ran = best_vllm(records, dtype, w), series(records, lp, w, "tok_s")
            if SPECS[lp].compile and not ran:
                continue  # the opt-in compiled server did not run
            if peer is None or not ran:
                rows.append([f"{dtype} K={w}: {lp} vs vLLM", "-", "", "n/a (a server did not run)"])
                continue
            add(f"{dtype} K={w}: tok/s {lp} / {peer}", ratio(records, lp, peer, w, "tok_s"), target)
            add(f"{dtype} K={w}: p50 latency {peer} / {lp}", ratio(records, lp, peer, w, "p50_s", invert=True), 1.0)
            add(f"{dtype} K={w}: p50 TTFT {peer} / {lp}", ratio(records, lp, peer, w, "ttft_p50_s", invert=True), 1.0)
    for k in (k for k in ks if k > 1):
        add(f"fp32 K={k} / K=base: tok/s loraplex-fp32",
            ratio(records, "loraplex-fp32", "loraplex-fp32", str(k), "tok_s", den_workload="base"), OWN_BASE_TARGET)
    for name in ("loraplex-fp32", "loraplex-bf16"):  # the default (uncompiled) servers
        if startups.get(name):
            s = startups[name]
            rows.append([f"startup s {name}", spread(s), f"< {STARTUP_LIMIT_S:.0f} s",
                         "PASS" if statistics.median(s) < STARTUP_LIMIT_S else "FAIL"])
    return rows


def identity_rows(outputs: dict[str, dict], tok) -> tuple[list[list[str]], Optional[bool]]:
    """Every server's greedy tokens against loraplex-fp32's; returns (rows, whether vLLM fp32 agrees fully)."""
    ref = outputs.get("loraplex-fp32")
    if ref is None:
        return [], None
    rows, fp32_ok = [], None
    for name, per_w in outputs.items():
        if name == "loraplex-fp32":
            continue
        for w, outs in per_w.items():
            firsts, dlp = [], 0.0
            for (rt, rlp, rids), (t, lp, ids) in zip(ref[w], outs):
                d = first_difference(token_texts(tok, rt, rids), token_texts(tok, t, ids))
                firsts.append(d)
                upto = len(rt) if d is None else d
                dlp = max([dlp] + [abs(a - b) for a, b in zip(rlp[:upto], lp[:upto])])
            agree = sum(d is None for d in firsts)
            if SPECS[name].engine == "vllm" and SPECS[name].dtype == "fp32":
                fp32_ok = (fp32_ok is not False) and agree == len(firsts)
            parted = sorted(d for d in firsts if d is not None)
            rows.append([name, w, f"{agree}/{len(firsts)}", ",".join(map(str, parted)) or "-", f"{dlp:.2g}"])
    return rows, fp32_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default=DEFAULT_SERVERS, help=f"some of {','.join(SPECS)} (default {DEFAULT_SERVERS})")
    ap.add_argument("--base", default="smollm2", help="'smollm2' or a transformers directory with a tokenizer")
    ap.add_argument("--num-layers", type=int, help="serve a copy of the base cut to its first N layers (smoke runs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="requests per workload")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="loraplex --max-batch = vLLM --max-num-seqs")
    ap.add_argument("--adapters", default="1,16", help="K values (distinct adapters per workload); '' = base only")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="loraplex --threads; vLLM's OpenMP on cores 0..N-1")
    ap.add_argument("--no-stream", action="store_true", help="plain JSON answers (no TTFT)")
    add_sampling_flags(ap)
    ap.add_argument("--check", type=int, default=3, help="greedy identity: first N requests per workload")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per workload before giving up")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--vllm-venv", type=Path, default=vllm_env.DEFAULT_VENV)
    ap.add_argument("--install", action="store_true", help="create the vLLM venv when absent (a few GB)")
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    ap.add_argument("--logs", type=Path, help="keep the servers' logs in this directory (default: discarded)")
    args = ap.parse_args()
    names = [n for n in args.servers.split(",") if n]
    if unknown := [n for n in names if n not in SPECS]:
        ap.error(f"unknown server(s) {unknown}; expected some of {list(SPECS)}")
    ks = [int(k) for k in args.adapters.split(",") if k]
    args.sampling = sampling(ap, args)
    if args.requests < args.check:
        ap.error(f"--requests {args.requests} < --check {args.check}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results = Path(__file__).resolve().parent / "results"
    out = check_output(args.out or results / f"peer_vllm-{args.clients}c-{stamp}.json",  # refused now, not at the end
                       overwrite=args.overwrite)
    skipped: dict[str, str] = {}
    if any(SPECS[n].engine == "vllm" for n in names):
        if args.install:
            vllm_env.ensure(args.vllm_venv)
        if not vllm_env.ready(args.vllm_venv):
            for n in names:
                if SPECS[n].engine == "vllm":
                    skipped[n] = f"no vLLM venv at {args.vllm_venv} (bench/vllm_env.py or --install creates it)"
    records: list[dict] = []
    startups: dict[str, list[float]] = {}
    outputs: dict[str, dict] = {}
    load0, t_run = os.getloadavg(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraplex-peer-") as tmp:
        base = base_directory(args.base, args.num_layers, Path(tmp))
        folder = Path(tmp) / "adapters"
        folder.mkdir()
        args.vocab = write_adapters(str(base), None, args.rank,
                                    {folder / f"a{i}": 0.02 for i in range(max(ks, default=0))})
        prompts = token_prompts(args.requests, args.prompt_tokens, args.vocab)
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            if r == 1:
                took = time.monotonic() - t_run
                print(f"round 1 took {took / 60:.1f} min (with the identity check); the other {args.rounds - 1} "
                      f"should take about {(args.rounds - 1) * took / 60:.1f} min", flush=True)
            order = names[r % len(names):] + names[:r % len(names)]
            print(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f}): {', '.join(order)}",
                  flush=True)
            for name in order:
                if name in skipped:
                    continue
                spec, log = SPECS[name], logs / f"{name}-{r + 1}.log"
                try:
                    proc, url, startup = start(spec, args, base, folder, ks, log)
                except RuntimeError as exc:
                    skipped[name] = f"did not start: {exc}; its log ends: {tail(log)}"
                    print(f"  {name}: {skipped[name]}", flush=True)
                    continue
                print(f"  {name:<15} started in {startup:.1f} s", flush=True)
                startups.setdefault(name, []).append(startup)
                try:
                    recs, outs = run_server(spec, args, url, proc.pid, ks, prompts, r, check=name not in outputs)
                except (httpx.HTTPError, RuntimeError, asyncio.TimeoutError) as exc:
                    skipped[name] = f"failed under load in round {r + 1}: {exc!r}; its log ends: {tail(log)}"
                    print(f"  {name}: {skipped[name]}", flush=True)
                    continue
                finally:
                    stop(proc)
                records += recs
                if outs:
                    outputs[name] = outs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path() if args.base == "smollm2" else args.base)
    ran = [n for n in names if n in startups]
    summary = [[n, w, spread(list(series(records, n, w, "tok_s").values())),
                spread(list(series(records, n, w, "p50_s").values()), "{:.2f}"),
                spread(list(series(records, n, w, "ttft_p50_s").values()), "{:.2f}"),
                spread(list(series(records, n, w, "cpu_s_per_1k_tokens").values()))]
               for n in ran for w in workloads(SPECS[n], ks)]
    targets = target_rows(records, startups, ks)
    ident, fp32_ok = identity_rows(outputs, tok)
    ref = outputs.get("loraplex-fp32", {})  # request i of every workload has prompt i: adapter vs base, same prompt
    moved = [first_difference(a[0], b[0]) is not None for w in ref if w != "base" for a, b in zip(ref[w], ref["base"])]
    wall, load1 = time.monotonic() - t_run, os.getloadavg()
    print(f"\nbase {args.base}{f' ({args.num_layers} layers)' if args.num_layers else ''}, {args.clients} clients, "
          f"{args.requests} requests x {args.max_tokens} tokens per workload, {args.prompt_tokens}-token prompts, "
          f"r={args.rank} adapters on 7 projections, --max-batch {args.max_batch}, {args.threads} threads each, "
          f"{'streamed' if not args.no_stream else 'not streamed'}, "
          f"{f'temperature {args.temperature}, top_p {args.top_p}' if args.sampling else 'greedy'}; "
          f"{args.rounds} rounds, {wall / 60:.1f} min; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end ({os.cpu_count()} CPUs)")
    print(format_table(summary, ["server", "K", "tok/s", "p50 s", "TTFT p50 s", "CPU s / 1k tok"], align="llrrrr"))
    print("\nstartup s: " + ", ".join(f"{n} {spread(startups[n])}" for n in ran))
    print("\nissue 17 targets (median of per-round ratios [min-max]; latency and TTFT as vLLM / loraplex):")
    print(format_table(targets, ["ratio", "measured", "target", "verdict"], align="lrll"))
    if ident:
        print(f"\ngreedy tokens against loraplex-fp32 (first {args.check} requests per workload, {args.max_tokens} "
              f"tokens): vLLM fp32 {'identical' if fp32_ok else 'DIFFERS' if fp32_ok is False else 'not run'}; "
              f"the adapters changed {sum(moved)}/{len(moved)} of loraplex-fp32's completions from the base's")
        print(format_table(ident, ["server", "K", "identical", "parted at", "max |dlogprob| before"], align="llrlr"))
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    write_json(out, {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "vllm": vllm_env.VLLM, "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": load1,
                     "wall_s": wall, "records": records, "startup_s": startups, "skipped": skipped,
                     "summary": summary, "targets": targets, "identity": ident, "vllm_fp32_identical": fp32_ok,
                     "adapters_moved": [sum(moved), len(moved)]},
               overwrite=args.overwrite)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
