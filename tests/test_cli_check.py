"""``syncbn check``: on 2 spawned ranks, under torchrun, its verdicts, and its bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import syncbn
from cli_helpers import listening_port, run_syncbn
from syncbn.cli import check as _check
from syncbn.cli import main

N_CASES = len(_check.cases())
CASE_ROW = re.compile(r"^\(N,[\d,]+\) float(32|64) \S+\s+[\d,]+\s+(?:\S+\s+){8}(pass|FAIL)$")


def _case_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if CASE_ROW.match(line)]


@pytest.mark.slow
def test_check_on_two_spawned_ranks(tmp_path: Path) -> None:
    run = run_syncbn("check", "--nproc", "2", "--iters", "3", cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr
    out = run.stdout
    assert "backend gloo, world size 2, launcher spawn" in out
    assert f"torch {torch.__version__}, syncbn {syncbn.__version__}" in out
    rows = _case_rows(out)
    assert len(rows) == N_CASES, out
    assert all(row.endswith("pass") for row in rows)
    assert any(" 0," in row or ",0 " in row for row in rows), "an empty rank is covered"
    assert "channels_last_3d" in out
    assert re.search(r"syncbn\.SyncBatchNorm\s+\d+\.\d+ ms", out)
    assert f"verdict: PASS — all {N_CASES} cases match" in out


@pytest.mark.slow
def test_check_under_torchrun(tmp_path: Path) -> None:
    run = run_syncbn(
        "--standalone", "--nproc-per-node", "2", "-m", "syncbn", "check", "--iters", "2",
        cwd=tmp_path, timeout=120, module="torch.distributed.run",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "world size 2, launcher torchrun" in run.stdout
    assert len(_case_rows(run.stdout)) == N_CASES
    assert "verdict: PASS" in run.stdout


@pytest.mark.usefixtures("fake_torchrun")
def test_check_one_rank_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "world size 1, launcher torchrun" in out
    assert len(_case_rows(out)) == N_CASES
    assert "verdict: PASS" in out


@pytest.mark.usefixtures("fake_torchrun")
def test_check_exits_1_on_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(_check.TOLERANCE, torch.float32, -1.0)  # every float32 case must fail
    assert main(["check", "--iters", "0"]) == 1
    captured = capsys.readouterr()
    rows = _case_rows(captured.out)
    assert [row.endswith("FAIL") for row in rows] == [" float32 " in row for row in rows]
    assert f"verdict: FAIL — {N_CASES // 2} of {N_CASES} cases differ" in captured.out
    assert "timing" not in captured.out  # --iters 0 skips it
    assert f"{N_CASES // 2} case(s) mismatch" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--nproc", "0"], r"--nproc must be at least 1, got 0", id="nproc-0"),
        pytest.param(["--iters", "-1"], r"--iters must be at least 0, got -1", id="iters"),
        pytest.param(
            ["--device", "cuda"], r"--device cuda was requested, but .*; run with --device cpu",
            id="cuda-missing",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        pytest.param(["--port", "{busy}"], r"port \d+ on 127\.0\.0\.1 is already in use",
                     id="port-busy"),
    ],
)
def test_check_bad_input_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with listening_port() as busy:
        assert main(["check", *(a.format(busy=busy) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("syncbn check: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shard_sizes_are_uneven_with_a_rotating_empty_rank(world_size: int) -> None:
    layouts = [_check.shard_sizes(world_size, i) for i in range(N_CASES)]
    for sizes in layouts:
        assert len(sizes) == world_size
        assert all(s == 0 or 2 <= s <= 4 for s in sizes)
        assert sum(sizes) >= 2  # BatchNorm needs two values per channel
        assert sizes.count(0) <= 1
    if world_size == 1:
        assert all(sizes[0] > 0 for sizes in layouts)
    else:
        empty_ranks = {sizes.index(0) for sizes in layouts if 0 in sizes}
        assert len(empty_ranks) == min(world_size, 4)
        assert any(0 not in sizes and len(set(sizes)) > 1 for sizes in layouts)


def test_cases_cover_ranks_dtypes_and_formats() -> None:
    cases = _check.cases()
    assert {len(c.tail) + 1 for c in cases} == {2, 3, 4, 5}
    assert {c.dtype for c in cases} == {torch.float32, torch.float64}
    assert {c.memory_format for c in cases} == {
        torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
    }
    assert len({c.name for c in cases}) == len(cases)


# ---------------------------------------------------------------------------
# --nproc under torchrun, and what the timing lines say
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("fake_torchrun")
def test_nproc_under_torchrun_other_than_world_size_names_nproc_per_node(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--nproc", "2", "--iters", "0"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 2 disagrees with torchrun's WORLD_SIZE=1" in err
    assert "`torchrun --nproc-per-node 2 -m syncbn ...`" in err
    assert "leave --nproc out" in err


@pytest.mark.usefixtures("fake_torchrun")
def test_nproc_equal_to_torchrun_world_size_is_accepted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--nproc", "1", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "world size 1, launcher torchrun" in out


def test_torchrun_itself_refuses_nproc_as_ambiguous(tmp_path: Path) -> None:
    """Why the docs say ``--nproc-per-node``: torchrun's parser does not take ``--nproc``."""
    run = run_syncbn(
        "--standalone", "--nproc", "2", "-m", "syncbn", "check",
        cwd=tmp_path, timeout=60, module="torch.distributed.run",
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ambiguous option: --nproc" in run.stderr


@pytest.mark.usefixtures("fake_torchrun")
def test_timing_says_what_is_measured_and_against_what(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--iters", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("timing:"))
    shape = str(_check.TIMING_SHAPE)
    for part in (
        "wall ms of one training forward+backward of one layer", f"input {shape} float32",
        "median of 2", "slowest rank",
        "×local = that time / unsynchronized torch.nn.BatchNorm2d's on cpu",
        "mostly collective latency",
    ):
        assert part in header, header
    rows = lines[lines.index(header) + 1:][:2]
    local_row = r"  torch\.nn\.BatchNorm2d \(local\)\s+\d+\.\d{3} ms\s+1\.00×local"
    assert re.fullmatch(local_row, rows[0])
    assert re.fullmatch(r"  syncbn\.SyncBatchNorm\s+\d+\.\d{3} ms\s+\d+\.\d{2}×local", rows[1])
