"""One rank of the multi-host tests' training run; started by ``torchrun``.

    torchrun --nproc-per-node 4 tests/multihost/train.py --out DIR --steps 8 --ddp

A small CNN with three BatchNorm layers (2-D and 1-D), converted with
``syncbn.convert_sync_batchnorm``, trained with SGD on synthetic batches that
depend only on ``(seed, RANK, step)``: the same global rank sees the same data
whatever host it runs on, so a run over two hosts can be compared with the same
run on one host, rank by rank.

The default process group keeps torch's default timeout (30 min): the tests
check what ``SYNCBN_TIMEOUT`` alone achieves. Without ``--ddp`` the only
collectives are syncbn's (each rank keeps its own parameters; the statistics
are still those of the global batch); with ``--ddp`` the model is wrapped in
``DistributedDataParallel`` and its gradient all-reduces run on the same group.

Files written to ``--out`` (``R`` = global rank):

- ``rankR.json`` at start (rank, host, pid, times; rewritten at the end with the
  times of the group's rendezvous and of the end);
- ``rankR.progress``: the number of finished steps, rewritten after every step;
- ``rankR.pt``: at the end, every parameter and buffer (``state_dict``);
- ``rankR.error`` if anything raises: the exception's type, the time
  (``time.time()``) and the traceback; the exception then propagates, through the
  usual clean-up of a training script (``destroy_process_group()`` in ``finally``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

STARTED = time.time()

import torch  # noqa: E402 - STARTED must be taken before the imports
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import syncbn  # noqa: E402

CLASSES = 4


def build_model() -> nn.Module:
    """(N, 3, 8, 8) -> (N, CLASSES), with BatchNorm2d(8), BatchNorm2d(8) and BatchNorm1d(16)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # (N, 8, 8, 8)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),  # (N, 8, 8, 8)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # (N, 8, 2, 2)
        nn.Flatten(),  # (N, 32)
        nn.Linear(32, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, CLASSES),
    )


def batch(seed: int, rank: int, step: int, size: int) -> tuple[Tensor, Tensor]:
    """This rank's batch of ``step``: inputs with a per-channel offset and scale, and labels."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    x = torch.randn(size, 3, 8, 8, generator=generator)
    x = x * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.5, -1.0, 3.0]).view(
        1, 3, 1, 1
    )
    y = torch.randint(0, CLASSES, (size,), generator=generator)
    return x, y


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (readers never see half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def train(args: argparse.Namespace, rank: int, record: dict[str, object], out: Path) -> None:
    dist.init_process_group("gloo")  # env:// from torchrun; torch's default timeout
    record["joined"] = time.time()
    record["world_size"] = dist.get_world_size()
    _write(out / f"rank{rank}.json", json.dumps(record))

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model: nn.Module = syncbn.convert_sync_batchnorm(build_model())
    if args.ddp:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        x, y = batch(args.seed, rank, step, args.batch_per_rank)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _write(out / f"rank{rank}.progress", str(step + 1))

    state = (model.module if args.ddp else model).state_dict()
    torch.save({name: value.detach().clone() for name, value in state.items()},
               out / f"rank{rank}.pt")
    record["finished"] = time.time()
    _write(out / f"rank{rank}.json", json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="wrap the model in DDP")
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    out: Path = args.out
    record: dict[str, object] = {
        "rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
        "host": os.environ.get("SYNCBN_TEST_HOST", ""), "pid": os.getpid(), "started": STARTED,
    }
    _write(out / f"rank{rank}.json", json.dumps(record))
    torch.set_num_threads(1)
    try:
        train(args, rank, record, out)
    except BaseException as exc:
        _write(out / f"rank{rank}.error", json.dumps({
            "type": type(exc).__name__, "time": time.time(), "traceback": traceback.format_exc(),
        }))
        raise
    finally:  # the usual clean-up of a torch training script, also after an error
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
