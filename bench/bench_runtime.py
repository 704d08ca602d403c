"""The multi-adapter runtime (loraplex.runtime.MultiLoraModel) beside PEFT 0.21, both against the bare base.

Base: a random Llama (hidden 512, 4 layers, vocab 32000; loraplex.models.random_llama), float32, 2 CPU
threads; 64 adapters, r=8 (alpha 16) on every linear layer, random non-zero A and B, saved once in PEFT's
layout and loaded by both libraries from the same directories. Scenarios:
    single        16x128 prefill, every row the same adapter (PEFT: set_adapter, plain forward)
    16 distinct   16x128 prefill, row b adapter b (PEFT: forward(adapter_names=...))
    64 prefill    64x32 prefill, row b adapter b
    64 decode     one decode step, 64 sequences, row b adapter b, KV cache of 32 tokens (cropped back
                  after every step; loraplex runs the step inside an open Batch, as generate does)
    merged        16x128 prefill with one adapter merged into the weights (PEFT: merge_adapter)
    generate      MultiLoraModel.generate, 16 prompts x 32 tokens, row b adapter a(b % 16), 32 greedy new
                  tokens: backend="decoder" (the compact decoder the server runs) vs backend="hf" (the HF
                  model with RuntimeLinear wrappers and a DynamicCache); "hf / decoder" is the median over
                  repeats of t_hf / t_decoder within a repeat (both give the same tokens: checked first)
Prefills compute the logits of the last position only (logits_to_keep=1, as generation does), so the
vocab-32000 head does not dilute the cost of the adapters. Times are
medians of interleaved repeats (base, PEFT and loraplex take turns); "x base" is the median over repeats
of t_base / t_variant within a repeat, so 1.00 is as fast as the bare model. Also timed: loading the 64th adapter (and the 2nd, to show the cost is
flat), and switching the adapter of a one-row request (loraplex: opening a Batch whose plan is not cached;
PEFT: set_adapter). `--smollm2` repeats every scenario on SmolLM2-135M (loraplex.models.load_base("smollm2"))
with shorter single / 16-distinct / merged prefills (16x32) to keep the run short.

    .venv/bin/python bench/bench_runtime.py [--reps 9] [--smollm2] [--no-llama] [--only switch,load,generate]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import loraplex as lp
from loraplex.models import load_base, random_llama
from loraplex.report import format_table
from loraplex.runtime import MultiLoraModel

from bench_runtime_ops import interleaved_times  # sibling script: bench/ is on sys.path

R, ALPHA, N_ADAPTERS = 8, 16, 64
LAST = {"logits_to_keep": 1}  # prefill as in generation: logits of the last position only
GENERATE = (16, 32, 32, 16)  # prompts, prompt tokens, new tokens, distinct adapters
TARGETS = {"single": 0.92, "16 distinct": 0.90, "64 prefill": 0.85, "64 decode": 0.65, "merged": 0.98}


class Timing(dict):
    """Median seconds per call of each variant, plus `ratio[k]`: the median over repeats of t_base / t_k
    measured within the same repeat (robust to load that drifts during the run)."""

    ratio: dict[str, float]


def interleaved_medians(fns: dict, reps: int, budget_s: float = 0.05) -> Timing:
    """Every repeat runs each variant once, in turn; see Timing."""
    times = interleaved_times(fns, reps, budget_s)
    out = Timing({k: statistics.median(v) for k, v in times.items()})
    if "base" in times:
        out.ratio = {k: statistics.median(b / t for b, t in zip(times["base"], v)) for k, v in times.items()}
    return out


def write_adapters(base: torch.nn.Module, root: Path, n: int, use_dora: bool = False) -> list[Path]:
    """n random r=8 all-linear adapters for `base`, in PEFT's layout (loraplex.save_adapter); DoRA ones keep
    their initial magnitude m = ||W||_row, so with random A, B their row scale g is not 1."""
    model = copy.deepcopy(base)
    lp.inject(model, lp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=use_dora), "x")
    gen = torch.Generator().manual_seed(0)
    dirs = []
    with torch.no_grad():
        for i in range(n):
            for _, layer in lp.lora_layers(model):
                A, B = layer.adapter_tensors("x")
                A.copy_(torch.randn(A.shape, generator=gen) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=gen) * 0.01)
            dirs.append(root / f"a{i}")
            lp.save_adapter(model, "x", dirs[-1])
    return dirs


def peft_model(base: torch.nn.Module, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0").eval()
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    return model


class Setup:
    """The three models over copies of one base: bare, PEFT with the adapters, loraplex with the adapters."""

    def __init__(self, base: torch.nn.Module, dirs: list[Path]) -> None:
        self.base = base
        self.dirs = dirs
        self.lp = MultiLoraModel(copy.deepcopy(base))
        for i, d in enumerate(dirs):
            self.lp.load(f"a{i}", d)
        self.vocab = base.config.vocab_size

    @functools.cached_property
    def peft(self):
        return peft_model(self.base, self.dirs)  # built when a scenario first needs it (not for generate)

    def ids(self, B: int, T: int) -> torch.Tensor:
        return torch.randint(3, self.vocab, (B, T), generator=torch.Generator().manual_seed(B * T))

    @torch.inference_mode()
    def prefill(self, B: int, T: int, n: int, reps: int) -> dict[str, float]:
        """n = 1: every row adapter a0; else row b adapter a(b % n)."""
        ids = self.ids(B, T)
        names = [f"a{b % n}" for b in range(B)]
        if n == 1:
            self.peft.set_adapter("a0")
            fns = {"base": lambda: self.base(ids, **LAST), "peft": lambda: self.peft(input_ids=ids, **LAST),
                   "lp": lambda: self.lp.forward(ids, adapters=names, **LAST)}
        else:
            fns = {"base": lambda: self.base(ids, **LAST),
                   "peft": lambda: self.peft(input_ids=ids, adapter_names=names, **LAST),
                   "lp": lambda: self.lp.forward(ids, adapters=names, **LAST)}
        return interleaved_medians(fns, reps)

    @torch.inference_mode()
    def decode(self, B: int, T: int, n: int, reps: int) -> dict[str, float]:
        from transformers import DynamicCache

        ids, step = self.ids(B, T), self.ids(B, 1)
        names = [f"a{b % n}" for b in range(B)]
        caches = {k: DynamicCache(config=self.base.config) for k in ("base", "peft", "lp")}
        batch = self.lp.batch(names)
        self.base(ids, past_key_values=caches["base"], use_cache=True)
        self.peft(input_ids=ids, past_key_values=caches["peft"], use_cache=True, adapter_names=names)
        batch(input_ids=ids, past_key_values=caches["lp"], use_cache=True)

        def run(call, cache, **kw):
            def f():
                call(input_ids=step, past_key_values=cache, use_cache=True, **kw)
                cache.crop(-1)  # back to T cached tokens
            return f

        fns = {"base": run(self.base, caches["base"]),
               "peft": run(self.peft, caches["peft"], adapter_names=names),
               "lp": run(batch, caches["lp"])}
        try:
            return interleaved_medians(fns, reps)
        finally:
            batch.close()

    @torch.inference_mode()
    def merged(self, B: int, T: int, reps: int) -> dict[str, float]:
        ids = self.ids(B, T)
        names = ["a0"] * B
        self.peft.set_adapter("a0")
        self.peft.merge_adapter()
        self.lp.merge("a0")
        try:
            fns = {"base": lambda: self.base(ids, **LAST), "peft": lambda: self.peft(input_ids=ids, **LAST),
                   "lp": lambda: self.lp.forward(ids, adapters=names, **LAST)}
            return interleaved_medians(fns, reps)
        finally:
            self.peft.unmerge_adapter()
            self.lp.unmerge()

    def load(self, reps: int) -> dict[str, float]:
        """Seconds to load one more adapter with 63 loaded (and with 1 loaded: 'lp@1', 'peft@1')."""
        few_lp = MultiLoraModel(copy.deepcopy(self.base))
        few_lp.load("a0", self.dirs[0])
        few_peft = peft_model(self.base, self.dirs[:1])
        d = self.dirs[-1]

        def lp_cycle(engine):
            def f():
                engine.load("new", d)
                engine.unload("new")
            return f

        def peft_cycle(model):
            def f():
                model.load_adapter(str(d), adapter_name="new")
                model.delete_adapter("new")
            return f

        self.lp.unload(f"a{N_ADAPTERS - 1}")  # 63 loaded: "new" is the 64th
        self.peft.delete_adapter(f"a{N_ADAPTERS - 1}")
        try:
            return interleaved_medians({"lp": lp_cycle(self.lp), "lp@1": lp_cycle(few_lp),
                                        "peft": peft_cycle(self.peft), "peft@1": peft_cycle(few_peft)}, reps)
        finally:
            self.lp.load(f"a{N_ADAPTERS - 1}", d)
            self.peft.load_adapter(str(d), adapter_name=f"a{N_ADAPTERS - 1}")

    def generate(self, reps: int) -> dict[str, list[float]]:
        """Seconds per generate() call on each backend, interleaved (see the module docstring)."""
        B, T, new, n = GENERATE
        prompts = self.ids(B, T).tolist()
        names = [f"a{b % n}" for b in range(B)]
        kw = dict(max_new_tokens=new, eos_token_id=[])
        fns = {k: functools.partial(self.lp.generate, prompts, names, backend=k, **kw) for k in ("hf", "decoder")}
        if [g.token_ids for g in fns["hf"]()] != [g.token_ids for g in fns["decoder"]()]:  # builds the decoder too
            raise AssertionError("generate's backends gave different tokens")
        return interleaved_times(fns, reps, budget_s=0.0)

    @torch.inference_mode()
    def switch(self, reps: int) -> dict[str, float]:
        """One-row request switching to the next of the 64 adapters (more than the plan cache holds)."""
        state = {"lp": 0, "peft": 0}

        def lp_switch():
            state["lp"] = (state["lp"] + 1) % N_ADAPTERS
            self.lp.batch([f"a{state['lp']}"]).close()

        def peft_switch():
            state["peft"] = (state["peft"] + 1) % N_ADAPTERS
            self.peft.set_adapter(f"a{state['peft']}")

        return interleaved_medians({"lp": lp_switch, "peft": peft_switch}, reps)


def ratio_row(label: str, t: Timing, target: float | None) -> list[str]:
    print(f"  {label}: " + ", ".join(f"{k} {v * 1e3:.2f} ms ({t.ratio[k]:.2f}x)" for k, v in t.items()),
          file=sys.stderr, flush=True)
    return [label, f"{t['base'] * 1e3:.1f}", f"{t['peft'] * 1e3:.1f}", f"{t.ratio['peft']:.2f}x",
            f"{t['lp'] * 1e3:.1f}", f"{t.ratio['lp']:.2f}x", "-" if target is None else f">= {target:.2f}x"]


HEADERS = ["scenario", "base ms", "PEFT ms", "PEFT x base", "loraplex ms", "loraplex x base", "target"]


SCENARIOS = ("single", "16", "64prefill", "decode", "merged", "load", "switch", "generate")


def scenario_table(s: Setup, reps: int, prefill: tuple[int, int], only: frozenset[str] = frozenset(SCENARIOS)) -> str:
    """The scenarios of the module docstring named in `only` over one Setup; `prefill` = (rows, tokens) of
    the single, 16-distinct and merged prefills (the 64-distinct prefill is always 64x32)."""
    B, T = prefill
    rows = []
    if "single" in only:
        rows.append(ratio_row(f"single {B}x{T}", s.prefill(B, T, 1, reps), TARGETS["single"]))
    if "16" in only:
        rows.append(ratio_row(f"16 distinct {B}x{T}", s.prefill(B, T, 16, reps), TARGETS["16 distinct"]))
    if "64prefill" in only:
        rows.append(ratio_row("64 distinct prefill 64x32", s.prefill(64, 32, 64, reps), TARGETS["64 prefill"]))
    if "decode" in only:
        rows.append(ratio_row("64 distinct decode 64x1 (+32 cached)", s.decode(64, 32, 64, reps * 3),
                              TARGETS["64 decode"]))
    if "merged" in only:
        rows.append(ratio_row(f"merged {B}x{T}", s.merged(B, T, reps), TARGETS["merged"]))
    if "load" in only:
        ld = s.load(reps)
        rows.append(["load 64th adapter (2nd)", "-", f"{ld['peft'] * 1e3:.1f} ({ld['peft@1'] * 1e3:.1f})", "-",
                     f"{ld['lp'] * 1e3:.2f} ({ld['lp@1'] * 1e3:.2f})", "-", "flat"])
    if "switch" in only:
        sw = s.switch(reps)
        rows.append(["switch adapter", "-", f"{sw['peft'] * 1e3:.2f}", "-", f"{sw['lp'] * 1e3:.3f}", "-", "< 1 ms"])
    table = format_table(rows, HEADERS, align="lrrrrrl") if rows else ""
    if "generate" in only:
        t = s.generate(reps)
        B, T, new, n = GENERATE
        med = {k: statistics.median(v) for k, v in t.items()}
        ratio = statistics.median(h / d for h, d in zip(t["hf"], t["decoder"]))
        table += "\n" + format_table(
            [[f"generate {B}x{T} + {new} new, {n} adapters", f"{med['hf'] * 1e3:.0f}", f"{med['decoder'] * 1e3:.0f}",
              f"{ratio:.2f}x"]], ["scenario", "hf ms", "decoder ms", "hf / decoder"], align="lrrr")
    return table


def bench_random_llama(reps: int, root: Path, only: frozenset[str]) -> str:
    base = random_llama(hidden=512, layers=4).eval()
    return scenario_table(Setup(base, write_adapters(base, root / "llama", N_ADAPTERS)), reps, (16, 128), only)


def bench_smollm2(reps: int, root: Path, only: frozenset[str]) -> str:
    base, _ = load_base("smollm2")
    base.eval()
    return scenario_table(Setup(base, write_adapters(base, root / "smollm2", N_ADAPTERS)), reps, (16, 32), only)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--smollm2", action="store_true", help="also run the SmolLM2-135M table")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})")
    ap.add_argument("--no-llama", action="store_true", help="skip the random-Llama table")
    args = ap.parse_args()
    only = frozenset(args.only.split(","))
    if not only <= set(SCENARIOS):
        ap.error(f"--only: unknown scenario(s) {sorted(only - set(SCENARIOS))}; choose from {','.join(SCENARIOS)}")
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import peft

    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.reps} interleaved repeats\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_llama:
            print("random Llama (hidden 512, 4 layers, vocab 32000), 64 adapters r=8 on all linear layers, float32")
            print(bench_random_llama(args.reps, Path(tmp), only), flush=True)
        if args.smollm2:
            print("\nSmolLM2-135M-Instruct (hidden 576, 30 layers, vocab 49152), 64 adapters r=8 all-linear, float32")
            print(bench_smollm2(args.reps, Path(tmp), only), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
