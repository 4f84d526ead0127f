"""The README's one-command scripts: the demo command runs end to end through its set-up.

(The test command, scripts/test.sh, is what CI runs, so it is exercised on every
submission.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run inside a virtualenv")
def test_demo_script_sets_up_and_runs_the_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # reuse this test run's virtualenv: the script then only checks what is installed
    env = {**os.environ, "SYNCBN_VENV": sys.prefix}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--nproc", "2", "--steps", "10",
         "--eval-every", "5", "--no-plot", "--no-progress", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["nproc"] == 2
