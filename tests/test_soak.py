"""The soak script runs: ``benchmarks/soak.py`` for 100 steps, with a loose RSS limit.

The real soak (2000 steps, RSS flat within 5 % after 200) is a manual run,
documented in benchmarks/README.md and docs/reliability.md; this keeps the
script from rotting: its options, its ranks, its JSON and its checks.
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
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc/self/statm")
def test_soak_script_runs_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--steps", "60", "--warmup", "20",
         "--sample-every", "10", "--tolerance", "0.5", "--timeout", "30", "--wall-limit", "150",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == "syncbn-soak/1" and report["passed"] is True
    assert report["environment"]["torch"] and report["options"]["steps"] == 60
    for rank in ("0", "1"):
        steps = [s["step"] for s in report["ranks"][rank]["samples"]]
        assert steps == [0, 10, 20, 30, 40, 50, 60]
        assert all(s["rss_bytes"] > 10 * 2**20 for s in report["ranks"][rank]["samples"])
        check = report["rss"][rank]
        assert check["samples_after_warmup"] == 5 and 0 <= check["spread"] <= 0.5
    agreement = report["agreement"]
    assert agreement["running_stats_identical"] and agreement["parameters_identical"]
    assert agreement["num_batches_tracked"] == {"1.num_batches_tracked": 60,
                                                "5.num_batches_tracked": 60,
                                                "10.num_batches_tracked": 60}


def test_soak_script_rejects_bad_options(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--steps", "10", "--warmup", "10",
         "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--warmup must be in [0, --steps)" in done.stderr
    assert not (tmp_path / "x.json").exists()
