"""``syncbn.join``'s error paths, each rank its own process: prompt errors and exit code 1.

Every rank runs ``tests/join_rank.py`` (gloo over 127.0.0.1, file rendezvous)
with the group's own timeout at 60 s and ``SYNCBN_TIMEOUT=4``, so an error that
comes within ``SYNCBN_TIMEOUT + 5`` s comes from syncbn, not from gloo's
timeout. Where the others must learn of an error without the failing rank's
exit (a closed connection), that rank stays alive 10 s after its error. Every
rank destroys the default group on its way out, as training scripts do. The
test's own limit (180 s) kills whatever is left, so nothing hangs the suite.
Measured in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

GROUP_TIMEOUT_S = 60.0
SYNCBN_TIMEOUT_S = 4.0  # 11 ranks of 5 scenarios start at once on 2 cores: 3 s was tight
PROMPT_S = SYNCBN_TIMEOUT_S + 5.0  # under the failing rank's 10 s linger
LINGER_S = 10.0
EXIT_S = 20.0
"""Bound on a process's exit after its error: the interpreter's teardown, on a loaded machine."""
LIMIT_S = 180.0
SCRIPT = Path(__file__).with_name("join_rank.py")


class _Run:
    """One scenario on ``world`` processes, started at once; finished by :func:`_finish`."""

    def __init__(self, scenario: str, world: int, linger_rank: int, folder: Path) -> None:
        folder.mkdir()
        env = {**os.environ, "SYNCBN_TIMEOUT": f"{SYNCBN_TIMEOUT_S:g}",
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exited: dict[int, float] = {}
        for rank in range(world):
            with (folder / f"rank{rank}.out").open("w") as out, \
                    (folder / f"rank{rank}.err").open("w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(SCRIPT), scenario, str(rank), str(world),
                     str(folder / "rendezvous"), f"{GROUP_TIMEOUT_S:g}", str(linger_rank),
                     f"{LINGER_S:g}"],
                    stdout=out, stderr=err, env=env))

    def poll(self) -> bool:
        """Note the ranks that exited; True when all have."""
        for rank, proc in enumerate(self.procs):
            if rank not in self.exited and proc.poll() is not None:
                self.exited[rank] = time.time()
        return len(self.exited) == len(self.procs)

    def results(self) -> list[dict[str, Any]]:
        """Each rank's exit code (or "killed"), error, message and times."""
        out = []
        for rank, proc in enumerate(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            text = (self.folder / f"rank{rank}.out").read_text()
            line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
            result: dict[str, Any] = json.loads(line[len("RESULT "):]) if line else {}
            result.update(rank=rank, code=proc.returncode if rank in self.exited else "killed",
                          exited=self.exited.get(rank),
                          stderr=(self.folder / f"rank{rank}.err").read_text())
            result.setdefault("error", None)
            out.append(result)
        return out


def _finish(runs: dict[str, _Run]) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + LIMIT_S
    try:
        while not all([run.poll() for run in runs.values()]) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        results = {name: run.results() for name, run in runs.items()}  # kills what is left
    return results


SCENARIOS = {  # name: ranks, the rank that stays alive LINGER_S after its error
    "extra-call-plain": (2, 0), "extra-call-ddp": (2, 0),
    "skipped-branch-plain": (2, -1), "skipped-branch-ddp": (2, -1),
    "subgroups": (3, -1),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every scenario at once (the time is mostly starting Python and torch)."""
    root = tmp_path_factory.mktemp("join-faults")
    return _finish({name: _Run(name, world, linger_rank, root / name)
                    for name, (world, linger_rank) in SCENARIOS.items()})


def _figures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = min((r["at"] for r in results if r.get("at")), default=0.0)
    return [{"rank": r["rank"], "error": r["error"], "code": r["code"],
             "error_after_first_s": None if not r.get("at") else round(r["at"] - first, 2),
             "exit_after_own_error_s": None if not (r.get("at") and r["exited"])
             else round(r["exited"] - r["at"], 2)} for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["extra-call-plain", "extra-call-ddp"])
def test_a_collective_after_the_recorded_iteration_stops_every_rank_promptly(
        scenario: str, outcomes: dict[str, list[dict[str, Any]]], record_property: Any) -> None:
    # rank 0 calls a layer after backward in its 3rd step; rank 1 ran out after 1 step and
    # waits for rank 0's next iteration; rank 0 then stays alive 10 s
    results = outcomes[scenario]
    record_property("figures", _figures(results))
    for r in results:
        assert r["error"] == "SyncBatchNormError", (r["rank"], r["error"], r["stderr"][-2000:])
        assert r["code"] == 1, (r["rank"], r["code"], r["stderr"][-2000:])
    assert "SyncBatchNorm '1' forward (C=5) is SyncBatchNorm collective 5" in results[0]["message"]
    assert "rank 0 left syncbn.join with an error" in results[1]["message"]
    waited = results[1]["at"] - results[0]["at"]
    assert waited < PROMPT_S, f"rank 1 raised {waited:.1f} s after rank 0"
    assert results[1]["exited"] < results[0]["exited"], "rank 1 waited for rank 0's exit"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["skipped-branch-plain", "skipped-branch-ddp"])
def test_a_replay_that_cannot_match_exits_every_rank_with_code_1(
        scenario: str, outcomes: dict[str, list[dict[str, Any]]], record_property: Any) -> None:
    # rank 0 ran out after 2 steps (its last skipped a layer); rank 1's 3rd step runs it;
    # both exit at once (before: rank 0, the joined one, died of SIGABRT 4 times in 4)
    results = outcomes[scenario]
    record_property("figures", _figures(results))
    for r in results:
        assert r["error"] == "SyncBatchNormError", (r["rank"], r["error"], r["stderr"][-2000:])
        assert r["code"] == 1, (r["rank"], r["code"], r["stderr"][-2000:])
        assert "terminate called" not in r["stderr"], r["stderr"][-2000:]
        assert r["exited"] - r["at"] < EXIT_S, (r["rank"], r["exited"] - r["at"])
    assert "rank 0 has run out of batches and replays" in results[0]["message"]
    assert "'extra' forward (C=4) is SyncBatchNorm collective 2" in results[1]["message"]
    assert abs(results[1]["at"] - results[0]["at"]) < PROMPT_S


@pytest.mark.slow
def test_layers_on_subgroups_enter_and_leave_join(
        outcomes: dict[str, list[dict[str, Any]]], record_property: Any) -> None:
    # layers on [0, 1] on ranks 0 and 1, on [2] on rank 2; rank 1 runs 2 steps, the others 1
    # (exactness on subgroups: tests/test_join.py; here fresh processes, where creating the
    # join's groups rank by rank hung)
    results = outcomes["subgroups"]
    record_property("codes", [r["code"] for r in results])
    for r in results:
        assert r["code"] == 0 and r["error"] is None, (r["rank"], r["code"], r["stderr"][-2000:])


REPEATS = 5


@pytest.mark.slow
def test_a_failed_join_exits_with_code_1_every_time(tmp_path: Path) -> None:
    # the skipped-branch case with DDP, alone on the machine, REPEATS times in a row: before
    # _comm.keep_work a rank died of SIGABRT at exit in 4 of 6 such runs (a control message
    # still pending when it failed finished on gloo's thread during the interpreter's
    # shutdown, and freeing it there needs the GIL); under the load of the test above it
    # rarely showed
    for attempt in range(REPEATS):
        results = _finish({"run": _Run("skipped-branch-ddp", 2, -1, tmp_path / f"run{attempt}")})
        for r in results["run"]:
            assert r["error"] == "SyncBatchNormError", (attempt, r["rank"], r["stderr"][-2000:])
            assert r["code"] == 1 and "terminate called" not in r["stderr"], (
                attempt, r["rank"], r["code"], r["stderr"][-2000:])
