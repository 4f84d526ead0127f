"""Shared fixtures: the multi-process harness and deterministic defaults."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import harness


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
