"""``syncbn.cli.launch``: spawned ranks report, fail fast, never hang; torchrun and port checks."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from cli_helpers import listening_port
from syncbn.cli import launch as _launch
from syncbn.cli.launch import DistEnv, LaunchError, UsageError

# Rank bodies: module level, so the spawned ranks import them by name.


def _rank_code(env: DistEnv, offset: int) -> int:
    dist.barrier()
    loopback = os.environ.get("GLOO_SOCKET_IFNAME") == "lo"
    return offset + env.rank + (100 if loopback else 0)


def _rank1_raises(env: DistEnv, _: None) -> int:
    if env.rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits here for a rank that never comes
    return 0


def _payload_sum(env: DistEnv, payload: bytes) -> int:
    dist.barrier()
    return len(payload) + sum(payload[::4096]) + env.rank


def _rank_makes_a_semaphore(env: DistEnv, _: None) -> int:
    # as tqdm does when torch.compile traces an autograd Function in a spawned rank
    _LOCKS.append(multiprocessing.RLock())
    dist.barrier()
    return 0


_LOCKS: list[object] = []


def _rank1_dies(env: DistEnv, _: None) -> int:
    if env.rank == 1:
        os._exit(3)
    dist.barrier()
    return 0


@pytest.mark.slow
def test_spawn_returns_each_ranks_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    codes = _launch.spawn(
        _rank_code, 10, nproc=2, backend="gloo", device="cpu", port=_launch.free_port(),
        timeout_s=60,
    )
    expected_bonus = 100 if sys.platform.startswith("linux") else 0
    assert codes == [10 + expected_bonus, 11 + expected_bonus]


@pytest.mark.slow
def test_a_payload_larger_than_a_pipe_reaches_every_rank_whole() -> None:
    # each rank's payload has a pipe and a sending thread of its own: 4 MiB is far beyond
    # a pipe's buffer, and no rank waits for another to read first
    payload = bytes(range(256)) * (4 * 4096)
    expected = len(payload) + sum(payload[::4096])
    codes = _launch.spawn(
        _payload_sum, payload, nproc=2, backend="gloo", device="cpu",
        port=_launch.free_port(), timeout_s=60,
    )
    assert codes == [expected, expected + 1]


@pytest.mark.slow
def test_a_rank_that_made_a_semaphore_leaves_no_leak_warning() -> None:
    # ranks leave by os._exit; the named semaphores they made must be unlinked first, or
    # the resource tracker the parent shares warns of leaked semaphores at its exit
    script = (
        "from syncbn.cli import launch\n"
        "import test_launch\n"
        "print(launch.spawn(test_launch._rank_makes_a_semaphore, None, nproc=2,"
        " backend='gloo', device='cpu', port=launch.free_port(), timeout_s=60))\n"
    )
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[0, 0]", run.stdout + run.stderr
    assert "leaked semaphore" not in run.stderr, run.stderr


@pytest.mark.slow
def test_a_raising_rank_fails_fast_with_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 failed: ValueError: boom on purpose") as info:
        _launch.spawn(
            _rank1_raises, None, nproc=2, backend="gloo", device="cpu",
            port=_launch.free_port(), timeout_s=300,
        )
    assert "Traceback" in str(info.value)
    # rank 0 sat in a barrier with a 300 s timeout: it was stopped, not waited for
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_silently_dying_rank_is_reported() -> None:
    # rank 0 then fails in its barrier; the message leads with the root cause
    with pytest.raises(LaunchError, match=r"^rank 1 exited with code 3 without reporting"):
        _launch.spawn(
            _rank1_dies, None, nproc=2, backend="gloo", device="cpu",
            port=_launch.free_port(), timeout_s=300, grace_s=1.0,
        )


def test_torchrun_env_absent_complete_partial_and_malformed() -> None:
    assert _launch.torchrun_env({}) is None
    full = {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
    }
    found = _launch.torchrun_env(full)
    assert found is not None
    assert (found.rank, found.world_size, found.local_rank) == (1, 4, 1)
    assert (found.master_addr, found.master_port) == ("node0", 29500)
    with pytest.raises(UsageError, match=r"found torchrun variables RANK but not WORLD_SIZE"):
        _launch.torchrun_env({"RANK": "0"})
    with pytest.raises(UsageError, match=r"must be integers"):
        _launch.torchrun_env(full | {"RANK": "zero"})


def test_port_checks() -> None:
    port = _launch.check_port(None)
    assert 1 <= port <= 65535
    assert not _launch.port_in_use(port)
    with listening_port() as busy:
        assert _launch.port_in_use(busy)
        with pytest.raises(UsageError, match=rf"port {busy} on 127\.0\.0\.1 is already in use"):
            _launch.check_port(busy)
    with pytest.raises(UsageError, match=r"--port must be in 1\.\.65535, got 0"):
        _launch.check_port(0)
