"""serve/app.py's imports: starting the server loads the serving stack, not the training or eval code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
import loraplex.serve.app
print(json.dumps(sorted(m for m in sys.modules if m.startswith("loraplex."))))
"""


def test_server_app_does_not_import_training_or_evaluate():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert "loraplex.serve.ui" in loaded and "loraplex.workflows.results" in loaded  # /ui reads eval results
    assert "loraplex.train.loop" not in loaded
    assert not {m for m in loaded if m.startswith("loraplex.train")}, loaded
    assert "loraplex.workflows.evaluate" not in loaded
