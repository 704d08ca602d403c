"""`make bench`: every benchmark in bench/, one after another (never two at once: they time on the same cores).

Each script prints its own table of ratios (variants interleaved in one run, medians); docs/benchmarks.md
collects the results with the command that made them. Pass names to run a subset:

    .venv/bin/python bench/run_all.py                 # all
    .venv/bin/python bench/run_all.py runtime serve   # bench_runtime.py and bench_serve.py only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> extra arguments; the order is the order of docs/benchmarks.md
SCRIPTS: dict[str, list[str]] = {
    "runtime_ops": [],
    "runtime": ["--smollm2"],
    "train": [],
    "dora": [],
    "quant": [],
    "serve": [],
    "sampling": [],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(SCRIPTS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; expected some of {list(SCRIPTS)}")
    failed = []
    for name in args.names or SCRIPTS:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *SCRIPTS[name]]
        print(f"\n### {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.call(cmd) != 0:
            failed.append(name)
        print(f"### {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
