"""``syncbn demo``: end to end in a subprocess, its failure modes, and its pieces."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import syncbn
from cli_helpers import listening_port, png_size, run_syncbn
from syncbn.cli import demo as _demo
from syncbn.cli import main

DEMO_EXTRAS = ("sklearn", "matplotlib", "tqdm")


@pytest.fixture
def demo_extras() -> None:
    for name in DEMO_EXTRAS:
        pytest.importorskip(name)


# ---------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("demo_extras")
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = run_syncbn(
        "demo", "--nproc", "2", "--steps", "30", "--eval-every", "10", "--seed", "3",
        "--out", str(out), cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "Warning" not in run.stderr, run.stderr  # nothing leaks from DDP, tqdm, matplotlib
    assert "training" in run.stderr  # the progress bar
    assert f"wrote {out / 'results.json'}" in run.stdout
    assert f"wrote {out / 'curves.png'}" in run.stdout
    assert "PASS" in run.stdout
    row = re.compile(r"\s+\d+\s+\d\.\d{4}")
    rows = [line.split() for line in run.stdout.splitlines() if row.match(line)]
    assert [int(row[0]) for row in rows] == [10, 20, 30]

    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "pass"
    assert results["config"] | {"steps": 30, "nproc": 2, "batch_per_rank": 2, "seed": 3} == (
        results["config"]
    )
    environment = results["environment"]
    assert environment["world_size"] == 2
    assert environment["backend"] == "gloo"
    assert environment["device"] == "cpu"
    assert environment["launcher"] == "spawn"
    assert environment["torch"] == torch.__version__
    assert environment["syncbn"] == syncbn.__version__
    assert [p["step"] for p in results["eval_points"]] == [10, 20, 30]
    for point in results["eval_points"]:
        assert set(point["train_loss"]) == set(point["test_accuracy"]) == {"a", "b", "c"}
        assert all(0.0 <= acc <= 1.0 for acc in point["test_accuracy"].values())
    assert all(len(v) == 30 for v in results["train_loss_per_step"].values())
    final = results["final"]["max_param_diff"]
    assert final["b_vs_c"] <= results["tolerance"] == _demo.PROOF_TOLERANCE
    # the proof can fail: per-rank BatchNorm (a) is far from the reference
    assert final["a_vs_c"] > 100 * max(final["b_vs_c"], 1e-7)

    png = out / "curves.png"
    width, height = png_size(png)
    assert (width, height) == (results["plot"]["width"], results["plot"]["height"])
    assert width > 400 and height > 200
    from matplotlib import image

    assert image.imread(png).shape[:2] == (height, width)


# ---------------------------------------------------------------------------
# Bad input: a clear message and exit code 2, never a traceback or a hang
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--nproc", "0"], r"--nproc must be at least 1, got 0", id="nproc-0"),
        pytest.param(
            ["--nproc", "2", "--batch-per-rank", "1000"],
            r"global batch of 2000 samples, but the training split has only \d+; "
            r"pass --batch-per-rank \d+ or less",
            id="batch-larger-than-data",
        ),
        pytest.param(
            ["--device", "cuda"],
            r"--device cuda was requested, but .*; run with --device cpu",
            id="cuda-missing",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        pytest.param(
            ["--out", "{file}/results"],
            r"cannot write the results to --out '.*file.txt/results': .*; "
            r"pass a folder you can write to",
            id="out-unwritable",
        ),
        pytest.param(
            ["--port", "{busy}"],
            r"port \d+ on 127\.0\.0\.1 is already in use; pass another --port",
            id="port-busy",
        ),
    ],
)
@pytest.mark.usefixtures("demo_extras")
def test_demo_bad_input_exits_2_with_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where --out wants a folder\n")
    with listening_port() as busy:
        args = [a.format(file=blocker, busy=busy) for a in args]
        run = run_syncbn("demo", "--steps", "2", *args, cwd=tmp_path, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(message, run.stderr), run.stderr
    assert run.stderr.startswith("syncbn demo: error: ")
    assert not list(tmp_path.glob("syncbn-demo-*")), "nothing is created for a bad run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], r"--steps must be at least 1, got 0"),
        (["--batch-per-rank", "-1"], r"--batch-per-rank must be at least 1, got -1"),
        (["--eval-every", "0"], r"--eval-every must be at least 1, got 0"),
        (["--lr", "-0.1"], r"--lr must be a positive number, got -0.1"),
        (["--timeout", "0"], r"--timeout must be a positive number of seconds, got 0.0"),
        (["--port", "70000"], r"--port must be in 1\.\.65535, got 70000"),
        (["--backend", "nccl"], r"--backend nccl carries only CUDA tensors.*--backend gloo"),
        (["--backend", "carrier-pigeon"], r"--backend 'carrier-pigeon' is not available.*gloo"),
    ],
    ids=["steps", "batch", "eval-every", "lr", "timeout", "port-range", "nccl-cpu", "backend"],
)
def test_demo_rejects_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_demo_missing_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if missing
    assert main(["demo", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs sklearn, which is not installed" in err
    assert "pip install 'syncbn[demo]'" in err


def test_library_imports_without_demo_extras(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for name in ('sklearn', 'matplotlib', 'tqdm'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "import syncbn, syncbn.cli, syncbn.cli.demo, syncbn.cli.check, syncbn.cli.launch\n"
        "sys.exit(syncbn.cli.main(['demo', '--help']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "--batch-per-rank" in run.stdout


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for option in (
        "--nproc", "--steps", "--batch-per-rank", "--backend", "--device", "--seed", "--out",
        "--no-plot", "--port", "--eval-every", "--lr", "--timeout", "--no-progress",
    ):
        assert re.search(rf"{option}\b.*\n?.*\w", text), option
    assert "exit codes" in text


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nproc", "four"]) == 2
    assert "invalid int value: 'four'" in capsys.readouterr().err


def test_nproc_under_torchrun_must_match(
    fake_torchrun: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--nproc", "3"]) == 2
    assert "--nproc 3 disagrees with torchrun's WORLD_SIZE=1" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The torchrun path, in this process (a one-rank group)
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("demo_extras", "fake_torchrun")
def test_demo_under_torchrun_joins_its_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "demo", "--steps", "6", "--eval-every", "3", "--out", str(tmp_path), "--no-plot",
        "--no-progress",
    ])
    assert code == 0, capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["launcher"] == "torchrun"
    assert results["environment"]["world_size"] == 1
    assert "plot" not in results and not (tmp_path / "curves.png").exists()
    assert [p["step"] for p in results["eval_points"]] == [3, 6]


@pytest.mark.usefixtures("demo_extras", "fake_torchrun")
def test_demo_fails_when_b_departs_from_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_demo, "PROOF_TOLERANCE", -1.0)  # no difference can pass
    code = main(["demo", "--steps", "2", "--out", str(tmp_path), "--no-plot", "--no-progress"])
    assert code == 1
    assert "FAIL: (b) syncbn departs from (c)" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["verdict"] == "fail"


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------


def test_sample_order_is_seeded_and_batches_are_distinct() -> None:
    order = _demo.sample_order(seed=5, n_train=100, global_batch=8, steps=30)
    assert order.shape == (30, 8)
    assert torch.equal(order, _demo.sample_order(seed=5, n_train=100, global_batch=8, steps=30))
    assert not torch.equal(order, _demo.sample_order(seed=6, n_train=100, global_batch=8, steps=30))
    assert all(len(set(row.tolist())) == 8 for row in order)
    first_epoch = order[:12].flatten()  # 100 // 8 = 12 batches per epoch
    assert len(set(first_epoch.tolist())) == 96


def test_build_net_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first, second = _demo.build_net(1), _demo.build_net(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(next(_demo.build_net(2).parameters()), next(first.parameters()))


def test_non_finite_numbers_become_null() -> None:
    assert _demo._finite({"a": [1.0, float("nan")], "b": float("inf")}) == {
        "a": [1.0, None], "b": None,
    }


def test_max_difference_does_not_hide_nan() -> None:
    assert math.isnan(_demo._nan_max([0.1, math.nan]))
    assert _demo._nan_max([0.1, 0.3]) == 0.3
    assert _demo._nan_max([]) == 0.0
