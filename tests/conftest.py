"""Shared fixtures: the multi-process harness and deterministic defaults; the quick set."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import harness
from quick_set import FULL_ONLY, MATRIX_ALSO, QUICK_ALSO, matches

# --- the quick set: tests/quick_set.py says which tests are `full` (only under --all) ----


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if matches(item.nodeid, MATRIX_ALSO):
            item.add_marker(pytest.mark.matrix)
        if matches(item.nodeid, QUICK_ALSO):
            continue
        if item.get_closest_marker("slow") is not None or matches(item.nodeid, FULL_ONLY):
            item.add_marker(pytest.mark.full)


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools() -> Iterator[None]:
    yield
    harness.close_all()


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """An initialized gloo group with a single rank, in this process."""
    fd, path = tempfile.mkstemp(prefix="syncbn-rdzv-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        Path(path).unlink(missing_ok=True)


@pytest.fixture
def fake_torchrun(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as rank 0 of a one-rank torchrun job; the group is gone afterwards."""
    from syncbn.cli import launch as _launch

    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    for name, value in {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_launch.free_port()),
    }.items():
        monkeypatch.setenv(name, value)
    yield
    assert not dist.is_initialized(), "the command left its process group behind"
