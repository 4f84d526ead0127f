"""The multi-process harness itself: results by rank, errors and hangs surface fast."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import harness


def _rank_and_sum() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return dist.get_rank()


def _hang_on_rank_zero() -> int:
    if dist.get_rank() == 0:
        time.sleep(60)
    return dist.get_rank()


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_runs_in_one_group(world_size: int) -> None:
    results = harness.run_ranks(world_size, _rank_and_sum)
    total = world_size * (world_size + 1) / 2
    assert results == [(r, world_size, total) for r in range(world_size)]


def test_pool_is_reused_between_tasks() -> None:
    harness.run_ranks(2, _rank_and_sum)
    pool = harness.get_pool(2)
    harness.run_ranks(2, _rank_and_sum)
    assert harness.get_pool(2) is pool


def test_rank_error_is_reraised_with_its_traceback() -> None:
    with pytest.raises(harness.RankError, match=r"(?s)rank 1.*ValueError: boom from rank one"):
        harness.run_ranks(2, _fail_on_rank_one)
    # the next task gets a fresh, working pool
    assert [r[0] for r in harness.run_ranks(2, _rank_and_sum)] == [0, 1]


def test_hang_fails_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(harness.RankTimeoutError, match=r"ranks \[0\] of 2 did not finish"):
        harness.run_ranks(2, _hang_on_rank_zero, timeout=3.0)
    assert time.monotonic() - start < 15.0
    assert [r[0] for r in harness.run_ranks(2, _rank_and_sum)] == [0, 1]
