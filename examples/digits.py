"""What the examples share: the digits data, the model, and joining the process group.

Not part of syncbn; plain PyTorch you would write yourself. Needs scikit-learn
(``pip install 'syncbn[demo]'``), whose handwritten digits ship with the package,
so nothing is downloaded.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def load_digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x_train, y_train, x_test, y_test``: images ``(n, 1, 8, 8)`` in [0, 1]; 20% held out."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install 'syncbn[demo]'")
    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    return images[train], labels[train], images[test], labels[test]


def build_model() -> nn.Sequential:
    """A small CNN with ordinary ``torch.nn.BatchNorm2d`` layers: (N, 1, 8, 8) -> (N, 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),  # (N, 16, 8, 8)
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 16, 4, 4)
        nn.Conv2d(16, 32, 3, padding=1, bias=False),  # (N, 32, 4, 4)
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # (N, 32, 1, 1)
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a one-process group); ``rank, world_size, device``.

    gloo on CPU, NCCL when each local rank has a GPU.
    """
    if "RANK" not in os.environ:  # plain `python example.py`: a group of one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and torch.cuda.device_count() > local_rank:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    return dist.get_rank(), dist.get_world_size(), device


Batches = tuple[Tensor, ...]


def rank_loader(x: Tensor, y: Tensor, batch_per_rank: int, world_size: int, rank: int,
                seed: int) -> tuple[DataLoader[Batches], DistributedSampler[Batches]]:
    """This rank's slice of every epoch's shuffled training set (call set_epoch per epoch)."""
    train_set = TensorDataset(x, y)
    sampler: DistributedSampler[Batches] = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch_per_rank, sampler=sampler, drop_last=True)
    return loader, sampler


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of ``x`` classified as ``y``, in eval mode (running statistics)."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())
