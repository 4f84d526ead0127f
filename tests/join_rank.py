"""One rank of a ``syncbn.join`` fault, run as its own process by ``tests/test_join_faults.py``.

``python join_rank.py SCENARIO RANK WORLD INIT_FILE GROUP_TIMEOUT_S LINGER_RANK LINGER_S``

Prints one line ``RESULT {json}`` (the error it got, if any, and when),
destroys the default group (as a training script's ``finally`` does) and then
lets the error propagate, so the process exits as a script that fails
with it would: code 1, or whatever the interpreter's exit makes of it. Rank
``LINGER_RANK`` first stays alive ``LINGER_S`` seconds after its error, so that
no other rank can learn of the error from its exit (a closed connection), and
the others' exits happen while it is still there.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncbn


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2),
    ).double()


def _batch(rank: int, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 3, generator=gen, dtype=torch.float64) + step


class _Branchy(nn.Module):
    """A SyncBatchNorm that only runs at even steps (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.extra = nn.BatchNorm1d(4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.double()

    def forward(self, x: Tensor, step: int) -> Tensor:
        h = self.body(x)
        if step % 2 == 0:
            h = self.extra(h)
        return self.head(h)


def _extra_call(rank: int, use_ddp: bool) -> None:
    """Rank 0 runs 3 steps, rank 1 one; rank 0's last step calls a layer after backward."""
    model = syncbn.convert_sync_batchnorm(_model())
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    steps = 3 if rank == 0 else 1
    with syncbn.join(net):
        for step in range(steps):
            net(_batch(rank, step)).sum().backward()
            if rank == 0 and step == steps - 1:
                model[1](torch.randn(4, 5, dtype=torch.float64))  # not in the last iteration


def _skipped_branch(rank: int, use_ddp: bool) -> None:
    """Rank 0 stops after step 1 (the extra layer skipped); rank 1's step 2 runs it."""
    model = syncbn.convert_sync_batchnorm(_Branchy())
    net: nn.Module = model
    if use_ddp:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    with syncbn.join(net):
        for step in range(2 + rank):
            net(_batch(rank, step), step).sum().backward()


def _subgroups(rank: int) -> None:
    """Layers on [0, 1] and on [2] (every rank creates both groups); 1, 2 and 1 steps."""
    groups = [[0, 1], [2]]
    made = [dist.new_group(ranks) for ranks in groups]
    group = next(g for g, ranks in zip(made, groups, strict=True) if rank in ranks)
    model = syncbn.convert_sync_batchnorm(_model(), process_group=group)
    with syncbn.join(model):
        for step in range(1 + rank % 2):
            model(_batch(rank, step)).sum().backward()


SCENARIOS = {
    "subgroups": _subgroups,
    "extra-call-plain": lambda rank: _extra_call(rank, False),
    "extra-call-ddp": lambda rank: _extra_call(rank, True),
    "skipped-branch-plain": lambda rank: _skipped_branch(rank, False),
    "skipped-branch-ddp": lambda rank: _skipped_branch(rank, True),
}


def main() -> None:
    scenario, rank, world, init_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    group_timeout_s, linger_rank, linger_s = float(sys.argv[5]), int(sys.argv[6]), \
        float(sys.argv[7])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=group_timeout_s))
    dist.barrier()
    # a process's first collective is slow (lazy imports): not under the scenario's timeout
    warm = syncbn.SyncBatchNorm(2, timeout=group_timeout_s).double()
    warm(torch.randn(3, 2, dtype=torch.float64)).sum().backward()
    dist.barrier()  # connected and warm: the time below is the scenario's
    start = time.time()
    try:
        SCENARIOS[scenario](rank)
    except BaseException as error:
        print("RESULT " + json.dumps({"error": type(error).__name__, "message": str(error),
                                      "start": start, "at": time.time()}), flush=True)
        if rank == linger_rank:
            time.sleep(linger_s)
        raise
    finally:  # what a training script does on its way out
        dist.destroy_process_group()
    print("RESULT " + json.dumps({"error": None, "message": "", "start": start,
                                  "at": time.time()}), flush=True)


if __name__ == "__main__":
    main()
