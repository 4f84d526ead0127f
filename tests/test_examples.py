"""The examples run as documented: torchrun + DDP training, export, and the Paddle flavour."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import SRC

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_sklearn() -> None:
    pytest.importorskip("sklearn")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=150, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    return run


def test_torchrun_ddp_training_then_export(tmp_path: Path) -> None:
    checkpoint = tmp_path / "digits-syncbn.pt"
    train = _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 str(EXAMPLES / "ddp_train.py"), "--epochs", "1", "--batch-per-rank", "8",
                 "--out", str(checkpoint),
                 cwd=tmp_path)
    assert re.search(r"epoch 1: train loss \d\.\d+, test accuracy .*global batch 16", train.stdout)
    assert checkpoint.is_file()

    program = tmp_path / "digits.pt2"
    export = _run(str(EXAMPLES / "export_eval_model.py"), "--checkpoint", str(checkpoint),
                  "--out", str(program), cwd=tmp_path)
    assert "normalization layers after revert: BatchNorm2d" in export.stdout
    assert "2 of them batch_norm" in export.stdout
    gap = re.search(r"max \|diff\| (\S+)", export.stdout)
    assert gap is not None and float(gap.group(1)) <= 1e-5
    assert program.is_file()


def test_paddle_flavour_trains(tmp_path: Path) -> None:
    run = _run(str(EXAMPLES / "paddle_flavour.py"), "--epochs", "1", "--batch-per-rank", "16",
               cwd=tmp_path)
    assert re.search(r"epoch 1: last loss \d\.\d+, test accuracy", run.stdout)
    assert "first norm layer: SyncBatchNorm" in run.stdout
    assert "'1._mean', '1._variance'" in run.stdout
