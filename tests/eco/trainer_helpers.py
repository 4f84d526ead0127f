"""What the trainer tests share: one small net, one fixed data set, the single-process oracle.

Every trainer test trains :func:`build_net` on :func:`dataset` twice from the same
weights: on 2 ranks with syncbn (rank ``r`` reads ``DistributedSampler(shuffle=False)``'s
shard, ``PER_RANK`` samples a step), and in one process with plain BatchNorm on the
global batch of each step (both ranks' samples, :func:`global_batches`) — the oracle,
:func:`train_reference`. Parameters and running statistics must agree.

Torch only: the trainer packages are imported by the tests that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, TensorDataset

WORLD_SIZE = 2
N_SAMPLES = 16
PER_RANK = 4
"""Samples per rank per step: 16 samples, 2 ranks → 2 steps an epoch, global batch 8."""
LR = 0.1
SEED = 0
HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def build_net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Conv → BatchNorm2d → ReLU → pool → Linear → BatchNorm1d → ReLU → Linear, seeded."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
    ).to(dtype)


def dataset(dtype: torch.dtype = torch.float32) -> TensorDataset:
    """``N_SAMPLES`` images 3×6×6 (offset by 2, so the mean matters) and labels in 0..2."""
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(N_SAMPLES, 3, 6, 6, generator=generator, dtype=torch.float64) + 2.0
    labels = torch.randint(0, 3, (N_SAMPLES,), generator=generator)
    return TensorDataset(images.to(dtype), labels)


def rank_sampler(data: TensorDataset, rank: int) -> DistributedSampler[int]:
    """Rank ``rank``'s shard in a fixed order (the test pins it; trainers' defaults shuffle)."""
    return DistributedSampler(data, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)


def global_batches(data: TensorDataset, epochs: int) -> list[list[int]]:
    """The sample indices of each step's global batch: every rank's ``PER_RANK``, in rank order."""
    shards = [list(rank_sampler(data, rank)) for rank in range(WORLD_SIZE)]
    steps = len(shards[0]) // PER_RANK
    return [
        [index for shard in shards for index in shard[step * PER_RANK:(step + 1) * PER_RANK]]
        for _ in range(epochs) for step in range(steps)
    ]


def loss_of(net: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(net(images), labels)


def train_reference(net: nn.Module, data: TensorDataset,
                    batches: Sequence[Sequence[int]]) -> nn.Module:
    """The oracle: plain SGD in one process, one step on each global batch of indices."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    net.train()
    for batch in batches:
        images, labels = data[batch]
        optimizer.zero_grad()
        loss_of(net, images, labels).backward()
        optimizer.step()
    return net


def batchnorm_classes(net: nn.Module) -> list[str]:
    """The class names of ``net``'s BatchNorm layers, in tree order."""
    return [type(m).__name__ for m in net.modules() if "BatchNorm" in type(m).__name__]


def assert_same_state(got: Mapping[str, Tensor], want: Mapping[str, Tensor], *,
                      atol: float, rtol: float = 0.0, label: str = "") -> None:
    """Same keys, and every parameter and buffer equal within the tolerance."""
    assert sorted(got) == sorted(want), f"{label}: state_dict keys differ"
    for key, expected in want.items():
        actual = got[key].detach().to("cpu")
        assert actual.dtype == expected.dtype, f"{label}: {key}: {actual.dtype} != {expected.dtype}"
        torch.testing.assert_close(actual, expected.detach(), atol=atol, rtol=rtol,
                                   msg=lambda m, key=key: f"{label}: {key}: {m}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_env(**extra: str) -> dict[str, str]:
    """This environment plus a loopback rendezvous, this checkout's syncbn, and one thread."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), str(HERE)]),
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def run_script(args: Sequence[str], *, timeout_s: float, env: Mapping[str, str]) -> str:
    """Run ``python args...`` in its own session; kill the whole session if it overruns.

    Returns the output; a non-zero exit fails with the output in the message, so the
    failing rank's traceback is shown.
    """
    process = subprocess.Popen(
        [sys.executable, *args], env=dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = process.communicate()
        raise AssertionError(
            f"{' '.join(args)} did not finish in {timeout_s} s (a rank hangs?):\n{output[-6000:]}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
            os.killpg(process.pid, signal.SIGKILL)
    command = " ".join(args)
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{output[-6000:]}"
    return output
