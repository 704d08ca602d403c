"""Packaging: the core API works without the optional extras (serve, plot); commands that need one say which
to install; pyproject declares ranges, the extras and the license."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.errors import LoraplexError, MissingDependencyError
from loraplex.extras import EXTRAS, require

ROOT = Path(__file__).parents[2]
OPTIONAL = sorted(m for modules in EXTRAS.values() for m in modules)  # fastapi, matplotlib, uvicorn
SERVE_ONLY = {"loraplex.serve.answers", "loraplex.serve.app", "loraplex.serve.bodylimit",  # the HTTP layer itself
              "loraplex.serve.errors", "loraplex.serve.ui"}

# Run with the optional modules absent (None in sys.modules: `import x` raises ImportError, find_spec is None).
WITHOUT_EXTRAS = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import importlib, json, pkgutil
import loraplex as lp
from loraplex.cli import main
from loraplex.models import tiny_llama

imported = []
for info in pkgutil.walk_packages(lp.__path__, "loraplex."):
    if info.name not in {sorted(SERVE_ONLY)!r} and info.name != "loraplex.__main__":
        importlib.import_module(info.name)
        imported.append(info.name)
model = tiny_llama()
lp.inject(model, lp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
lp.save_adapter(model, "a", sys.argv[1] + "/adapter")
other = tiny_llama()
lp.load_adapter(other, sys.argv[1] + "/adapter", "a")
lp.merge_and_unload(other, "a")
codes = {{}}
for name, argv in json.loads(sys.argv[2]).items():
    try:
        codes[name] = main(argv)
    except SystemExit as exc:
        codes[name] = exc.code
print(json.dumps({{"imported": imported, "codes": codes,
                  "leaked": [m for m in {OPTIONAL!r} if sys.modules.get(m) is not None]}}))
"""


def test_core_api_and_commands_without_the_extras(tmp_path):
    from train_helpers import make_tiny_base, write_data  # tiny Llama + character tokenizer

    base, data = make_tiny_base(tmp_path / "base"), write_data(tmp_path / "data")["a"]
    argv = {
        "serve_help": ["serve", "--help"],
        "serve": ["serve", "--base", "tiny-llama"],
        "train": ["train", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                  "--max-steps", "1", "--batch-size", "4", "--max-length", "32", "--no-progress"],
        "eval_plot": ["eval", "--base", str(base), "--adapters", str(tmp_path / "run"), "--data", str(data),
                      "--plot", str(tmp_path / "chart.png")],
    }  # fmt: skip
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, str(tmp_path), json.dumps(argv)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "loraplex.cli.serve" in result["imported"] and "loraplex.train.plot" in result["imported"]
    assert result["leaked"] == []
    assert result["codes"] == {"serve_help": 0, "serve": 1, "train": 0, "eval_plot": 1}
    assert "loraplex serve: error: loraplex serve needs 'fastapi'" in run.stderr
    assert "pip install 'loraplex[serve]'" in run.stderr and "pip install 'loraplex[plot]'" in run.stderr
    assert "loss.png not drawn: matplotlib is not installed" in run.stderr  # train itself succeeded
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file() and not (tmp_path / "run" / "loss.png").exists()
    assert not (tmp_path / "chart.png").exists()


def test_require_raises_a_typed_error_naming_the_extra(monkeypatch):
    for extra in EXTRAS:
        require(extra, "this test")  # installed here (make installs .[test,serve,plot])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    want = r"drawing needs 'matplotlib'.*pip install 'loraplex\[plot\]'"
    with pytest.raises(MissingDependencyError, match=want) as info:
        require("plot", "drawing")
    assert isinstance(info.value, (LoraplexError, ImportError))


def test_pyproject_ranges_extras_and_license():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in project["dependencies"]}
    assert not set(OPTIONAL) & set(deps)  # the core does not drag a web server or a plotting library
    assert all("==" not in d for d in project["dependencies"])  # ranges; exact pins live in constraints.txt
    assert deps["transformers"] == "transformers>=5.23,<6"  # 4.x misreads 5.x checkpoints
    extras = project["optional-dependencies"]
    assert {k: sorted(v.split(">")[0] for v in extras[k]) for k in EXTRAS} == {k: sorted(v) for k, v in EXTRAS.items()}
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    pins = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert set(deps) <= pins and set(OPTIONAL) <= pins  # `make` installs tested versions of all of them
    assert ".[test,serve,plot]" in (ROOT / "Makefile").read_text()
