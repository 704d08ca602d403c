"""`loraplex serve`: serve many adapters over an OpenAI-compatible HTTP API.

Continuous batching across adapters on one base (Llama family). model = base id, adapter name, or a mix
'a:0.7+b:0.3'.

    loraplex serve --base smollm2 --adapters ./adapters --port 8000 --api-key "$KEY"

Every adapter directory in --adapters is loaded at start (a broken one is skipped and listed by /health);
more can be loaded or uploaded while serving (POST /v1/adapters, needs the API key). The web page is at
/ui; `--results FILE` (from `loraplex eval --out FILE`) adds each adapter's eval metrics to it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from ..device import DEVICE_HELP, parse_device, resolve_device
from ..errors import ConfigError, UsageError
from ..extras import require
from ..serve.engine import EngineConfig
from .flags import add_base, add_command, add_num_layers

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '1.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"expected a byte size like 268435456, 256MiB or 1GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def register(sub: argparse._SubParsersAction) -> list[str]:
    p = add_command(sub, __doc__, run_serve)
    add_base(p, note="Llama family")
    p.add_argument("--adapters", help="folder of adapter directories (PEFT format); uploads are installed here")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the name(s) the base answers to instead of its id (as vLLM); the first is the one "
                        "answers and /v1/models carry; 'base' always works too")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    add_num_layers(p)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--memory-budget", type=parse_bytes, help="adapter pool budget, e.g. 256MiB (default: none); "
                   "least recently used adapters are evicted and reloaded from disk")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="bearer key for the admin routes (default $LORAPLEX_API_KEY; unset = admin disabled)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prefill-tokens", type=int, default=EngineConfig.max_prefill_tokens,
                   help="prompt tokens (admitted requests x their longest prompt) prefilled in one step; a wave of "
                        "requests beyond it is prefilled over several steps, decoding in between (default "
                        f"{EngineConfig.max_prefill_tokens}; a longer single prompt is still prefilled alone)")
    p.add_argument("--queue-size", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queue wait included")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest adapter upload (zip) in MB")
    p.add_argument("--no-check-base", action="store_true", help="skip the adapters' base fingerprint check")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="run the decode step as torch.compile graphs (default: off; see docs/serving.md)")
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype the base and the adapters are served in (default fp32; bf16 on GPUs)")
    p.add_argument("--results", help="eval results JSON written by `loraplex eval --out`: per-adapter metrics on "
                   "the /ui page (default: ADAPTERS/eval_results.json when it exists)")
    p.add_argument("--single-adapter-batches", action="store_true",
                   help="naive baseline: batch only requests of one model at a time (for benchmarks)")
    return ["serve"]


def build_server(args: argparse.Namespace):
    """The Server for parsed `serve` arguments (flags -> the Server constructor; tests build servers with it)."""
    require("serve", "serving")
    from ..workflows.export import DTYPES
    from ..models import base_id, load_base
    from ..serve.app import Server

    model, tokenizer = load_base(args.base, num_layers=args.num_layers)
    model.to(device=resolve_device(args.device), dtype=DTYPES[args.dtype])
    config = EngineConfig(max_batch=args.max_batch, max_queue=args.queue_size,
                          max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                          max_prefill_tokens=args.max_prefill_tokens, timeout_s=args.timeout,
                          single_adapter=args.single_adapter_batches)
    names = args.served_model_name or [base_id(args.base)]
    return Server(model, tokenizer, base_id=names[0], aliases=names[1:], adapters_dir=args.adapters, config=config,
                  memory_budget=args.memory_budget, api_key=args.api_key,
                  max_upload_bytes=int(args.max_upload_mb * 1e6), check_base_model=not args.no_check_base,
                  shutdown_timeout=args.timeout, compile=args.compile)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that argparse's types let through but the server cannot use (UsageError, exit 2)."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    for flag, value in (("--timeout", args.timeout), ("--max-upload-mb", args.max_upload_mb)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a finite number > 0, got {value}")
    for name in args.served_model_name or ():
        if not name.strip() or len(name) > 256:
            raise UsageError(f"--served-model-name: names must be 1-256 characters, not blank; got {name!r}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def run_serve(args: argparse.Namespace) -> int:
    require("serve", "loraplex serve")
    import uvicorn

    from ..serve.app import create_app
    from ..serve.threads import in_fresh_thread

    check_args(args)
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters!r} is not a directory")
    if args.results is not None and not Path(args.results).is_file():
        raise ConfigError(f"--results {args.results!r} is not a file; write one with `loraplex eval --out FILE`")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    server = in_fresh_thread(build_server, args)  # the engine thread's OpenMP team alone: serve/threads.py
    uvicorn.run(create_app(server, results=args.results), host=args.host, port=args.port,
                log_level=args.log_level or "info", timeout_graceful_shutdown=int(args.timeout))
    return 0
