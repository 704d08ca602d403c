"""vLLM as the peer: it serves loraplex-written adapters unchanged and gives the same greedy tokens as
`loraplex serve` (bench/check_vllm.py). Skips unless the vLLM venv exists and imports vllm (at once when it is absent) (bench/vllm_env.py creates
it, a few GB); never installs anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import vllm_env  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.smollm2,
              pytest.mark.skipif(not vllm_env.ready(),
                                 reason=f"no vLLM venv at {vllm_env.DEFAULT_VENV} (python bench/vllm_env.py makes it)")]


def test_vllm_gives_loraplex_serve_s_greedy_tokens(capsys):
    import check_vllm

    assert check_vllm.main(["--no-install"]) == 0, capsys.readouterr().out
