"""The only module that calls ``torch.distributed``.

One sum-all-reduce per direction, named after its step: :func:`reduce_forward`
carries ``2C + 1`` float64 values, :func:`reduce_backward` ``2C`` values in the
accumulation dtype. Neither depends on the world size (unlike an all_gather).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any
"""``torch.distributed.ProcessGroup`` (kept ``Any``: its stubs differ between torch releases)."""


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default group is initialized."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: ProcessGroup | None) -> ProcessGroup | None:
    """The group to synchronize over, or ``None`` when no synchronization is possible.

    ``None`` resolves to the default (world) group when one is initialized.

    Raises:
        TypeError: ``process_group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: it names a group while no default group is initialized, or
            this rank is not a member of it.
    """
    if process_group is None:
        return dist.group.WORLD if is_distributed() else None
    if not dist.is_available():
        raise ValueError(
            "SyncBatchNorm got a process_group, but this build of torch has no "
            "torch.distributed; pass process_group=None to normalize locally"
        )
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "SyncBatchNorm's process_group does not include this rank "
            f"(global rank {dist.get_rank()}): torch.distributed.new_group() returns "
            "a placeholder on ranks outside the group; give each rank the group it "
            "belongs to"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "SyncBatchNorm expected process_group to be a torch.distributed.ProcessGroup "
            f"or None, got {type(process_group).__name__}; create one with "
            "torch.distributed.new_group(ranks)"
        )
    if not dist.is_initialized():
        raise ValueError(
            "SyncBatchNorm got a process_group, but the default process group is not "
            "initialized (or was destroyed); call torch.distributed.init_process_group() "
            "first, or pass process_group=None to normalize locally"
        )
    try:
        dist.get_rank(process_group)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            "SyncBatchNorm's process_group is not registered with torch.distributed (it "
            "was destroyed, or belongs to an earlier init_process_group); create it again "
            "with torch.distributed.new_group(ranks) and give it to the layer"
        ) from error
    return process_group


def group_size(process_group: ProcessGroup | None) -> int:
    """Number of ranks in the resolved group (1 without distributed)."""
    if process_group is None:
        return 1
    size: int = dist.get_world_size(process_group)
    return size


def _all_reduce_sum(tensor: Tensor, process_group: ProcessGroup) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def reduce_forward(packed_moments: Tensor, process_group: ProcessGroup) -> Tensor:
    """Sum the packed local moments ``[Σx, Σx², count]`` (float64, ``2C + 1``) over the group."""
    return _all_reduce_sum(packed_moments, process_group)


def reduce_backward(grad_sums: Tensor, process_group: ProcessGroup) -> Tensor:
    """Sum the packed gradient reductions ``[Σdy, Σdy·x̂]`` (``2C``) over the group."""
    return _all_reduce_sum(grad_sums, process_group)


def backend_name(process_group: ProcessGroup | None) -> str:
    """The group's backend name ('gloo', 'nccl', …), or 'none' without a group."""
    if process_group is None:
        return "none"
    return str(dist.get_backend(process_group))


__all__ = [
    "ProcessGroup",
    "backend_name",
    "group_size",
    "is_distributed",
    "reduce_backward",
    "reduce_forward",
    "resolve_group",
]
