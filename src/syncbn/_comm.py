"""The only module that calls ``torch.distributed``.

One sum-all-reduce per direction, named after its step: :func:`reduce_forward`
carries ``2C + 2`` float64 values (the moments and a step key),
:func:`reduce_backward` ``2C`` float64 values: ``8·(4C + 2)`` bytes per step.
Neither depends on the world size (unlike an all_gather), and since both are
float64 whatever the input dtype, ranks that disagree on the dtype still exchange
buffers of the same size (and the merged statistics stay correct).

Every collective knows its :class:`CallSite`; a failure or a timeout becomes a
:class:`SyncBatchNormError` that names the layer, the call, the phase and the
shape. Debug mode (``SYNCBN_DEBUG=1`` or ``debug=True`` on the layer) first
all-gathers a 5-value fingerprint, so that ranks that disagree on the layer, the
call count, the channels, the dtype or the phase raise a readable error instead
of exchanging mismatched buffers.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any
"""``torch.distributed.ProcessGroup`` (kept ``Any``: its stubs differ between torch releases)."""


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default group is initialized."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: ProcessGroup | None,
                  who: str = "SyncBatchNorm") -> ProcessGroup | None:
    """The group to synchronize over, or ``None`` when no synchronization is possible.

    ``None`` resolves to the default (world) group when one is initialized.
    ``who`` names the layer in error messages.

    Raises:
        TypeError: ``process_group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: it names a group while no default group is initialized, or
            this rank is not a member of it.
    """
    if process_group is None:
        return dist.group.WORLD if is_distributed() else None
    if not dist.is_available():
        raise ValueError(
            f"{who} got a process_group, but this build of torch has no "
            "torch.distributed; pass process_group=None to normalize locally"
        )
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{who}'s process_group does not include this rank "
            f"(global rank {dist.get_rank()}): torch.distributed.new_group() returns "
            "a placeholder on ranks outside the group; give each rank the group it "
            "belongs to"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who} expected process_group to be a torch.distributed.ProcessGroup "
            f"or None, got {type(process_group).__name__}; create one with "
            "torch.distributed.new_group(ranks)"
        )
    if not dist.is_initialized():
        raise ValueError(
            f"{who} got a process_group, but the default process group is not "
            "initialized (or was destroyed); call torch.distributed.init_process_group() "
            "first, or pass process_group=None to normalize locally"
        )
    try:
        dist.get_rank(process_group)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"{who}'s process_group is not registered with torch.distributed (it "
            "was destroyed, or belongs to an earlier init_process_group); create it again "
            "with torch.distributed.new_group(ranks) and give it to the layer"
        ) from error
    return process_group


def check_group_arg(process_group: object) -> None:
    """At construction: ``None`` or a ProcessGroup (it may be initialized later).

    Anything else raises the error :func:`resolve_group` gives for it.
    """
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        resolve_group(process_group)


def group_size(process_group: ProcessGroup | None) -> int:
    """Number of ranks in the resolved group (1 without distributed)."""
    if process_group is None:
        return 1
    size: int = dist.get_world_size(process_group)
    return size


class SyncBatchNormError(RuntimeError):
    """A collective of a SyncBatchNorm layer failed, timed out, or ranks disagreed."""


DEBUG_ENV = "SYNCBN_DEBUG"
"""Set to 1 to exchange a fingerprint before every collective (see :func:`check_fingerprint`)."""
TIMEOUT_ENV = "SYNCBN_TIMEOUT"
"""Seconds a rank waits for one collective of a layer (default: the group's own timeout)."""

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CallSite:
    """Where a collective comes from, for error messages and debug checks."""

    layer: str  # e.g. "backbone.layer1.0.bn1" (set by convert_sync_batchnorm) or a repr
    call: int  # how many times this layer has run forward before, on this rank
    channels: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    timeout_s: float | None  # None: the group's own timeout
    debug: bool

    def describe(self, phase: str) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{layer_label(self.layer)} ({phase}, call {self.call}, C={self.channels}, "
                f"{dtype}, input {self.shape})")


def layer_label(layer: str) -> str:
    """``SyncBatchNorm 'backbone.bn1'`` for a named layer, the name itself for a repr."""
    return layer if layer.endswith(")") and "(" in layer else f"SyncBatchNorm '{layer}'"


def env_debug() -> bool:
    """Whether :data:`DEBUG_ENV` asks for debug checks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def env_timeout() -> float | None:
    """The timeout from :data:`TIMEOUT_ENV`, or ``None`` when unset.

    Raises:
        ValueError: it is set but not a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _hint(site: CallSite) -> str:
    causes = ("a rank may have skipped this layer (a data-dependent branch), run it in eval "
              "mode while the others train, called it a different number of times, or died")
    if site.debug:
        return causes
    return f"{causes}; run with {DEBUG_ENV}=1 to find the rank and the layer"


STEP_KEY_BITS = 20
"""The forward buffer carries one extra value, a key < 2**20 of (layer, call)."""


def step_key(site: CallSite) -> int:
    """A number every rank computes alike at the same layer and call: ``1 ≤ key ≤ 2**20``."""
    return zlib.crc32(f"{site.layer}#{site.call}".encode()) % (1 << STEP_KEY_BITS) + 1


def _all_reduce_sum(tensor: Tensor, process_group: ProcessGroup, site: CallSite,
                    phase: str) -> Tensor:
    """Sum over the group, waiting at most ``site.timeout_s``; failures name the layer."""
    start = time.monotonic()
    try:
        if site.timeout_s is None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
        else:
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group,
                                   async_op=True)
            work.wait(timedelta(seconds=site.timeout_s))
    except RuntimeError as error:
        elapsed = time.monotonic() - start
        if site.timeout_s is not None and elapsed >= 0.9 * site.timeout_s:
            what = f"did not complete within {site.timeout_s:g} s"
        else:
            what = f"failed after {elapsed:.2f} s"
        raise SyncBatchNormError(
            f"{site.describe(phase)}: the all_reduce over {group_size(process_group)} ranks "
            f"{what} ({str(error).strip()[:300]}); {_hint(site)}"
        ) from error
    return tensor


def _fingerprint(site: CallSite, phase: str) -> list[float]:
    layer_key = zlib.crc32(site.layer.encode())
    dtype_code = _DTYPE_CODES.index(site.dtype) if site.dtype in _DTYPE_CODES else -1
    return [float(layer_key), float(site.call), float(site.channels), float(dtype_code),
            float(phase == "backward")]


_FIELDS = ("layer", "call", "channels", "dtype", "phase")


def check_fingerprint(site: CallSite, phase: str, process_group: ProcessGroup,
                      device: torch.device) -> None:
    """Debug mode: all ranks compare (layer, call, C, dtype, phase) before the collective.

    A fixed-size all_gather of 5 float64 values per rank; on a mismatch every rank
    sees the same table, so all of them also gather the readable descriptions and
    raise the same :class:`SyncBatchNormError` naming the ranks that differ.
    """
    mine = torch.tensor(_fingerprint(site, phase), dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(group_size(process_group))]
    try:
        if site.timeout_s is None:
            dist.all_gather(table, mine, group=process_group)
        else:
            work = dist.all_gather(table, mine, group=process_group, async_op=True)
            work.wait(timedelta(seconds=site.timeout_s))
    except RuntimeError as error:
        raise SyncBatchNormError(
            f"{site.describe(phase)}: the debug fingerprint exchange failed or timed out "
            f"({str(error).strip()[:300]}); {_hint(site)}"
        ) from error
    rows = torch.stack(table).cpu()
    differing = [name for j, name in enumerate(_FIELDS)
                 if not bool((rows[:, j] == rows[0, j]).all())]
    if not differing:
        return
    described: list[object] = [None] * len(table)
    dist.all_gather_object(described, site.describe(phase), group=process_group)
    lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(described))
    raise SyncBatchNormError(
        f"ranks disagree on {', '.join(differing)} at a SyncBatchNorm collective: {lines}. "
        "Every rank must run the same SyncBatchNorm layers, in the same order and mode, "
        "with the same channels and dtype"
    )


def reduce_forward(packed_moments: Tensor, process_group: ProcessGroup, site: CallSite) -> Tensor:
    """Sum the packed local moments ``[Σx, Σx², count]`` (float64, ``2C + 1``) over the group.

    One more value travels: the :func:`step_key` of (layer, call). If every rank
    is at the same layer and call, the keys sum to ``W·key``; otherwise the
    buffers of different layers (or steps) were paired and the statistics are
    garbage. On CPU every rank checks this (reading the sum costs nothing) and
    raises; on accelerators reading it would stall the stream, so the check runs
    in debug mode only (whose fingerprint exchange names the ranks).
    """
    if site.debug:
        check_fingerprint(site, "forward", process_group, packed_moments.device)
    key = step_key(site)
    buffer = torch.cat([packed_moments, packed_moments.new_full((1,), float(key))])
    buffer = _all_reduce_sum(buffer, process_group, site, "forward")  # 2C + 2 float64
    if buffer.device.type == "cpu":
        size = group_size(process_group)
        total = int(buffer[-1].item())
        if total != size * key:
            raise SyncBatchNormError(
                f"{site.describe('forward')}: the ranks are out of step: this rank's "
                f"all_reduce was paired with another layer or call on some rank (step keys "
                f"sum to {total}, not {size}×{key}), so these statistics are wrong; "
                f"{_hint(site)}"
            )
    return buffer[:-1]


def reduce_backward(grad_sums: Tensor, process_group: ProcessGroup, site: CallSite) -> Tensor:
    """Sum the packed gradient reductions ``[Σdy, Σdy·x̂]`` (float64, ``2C``) over the group."""
    if site.debug:
        check_fingerprint(site, "backward", process_group, grad_sums.device)
    return _all_reduce_sum(grad_sums, process_group, site, "backward")


def backend_name(process_group: ProcessGroup | None) -> str:
    """The group's backend name ('gloo', 'nccl', …), or 'none' without a group."""
    if process_group is None:
        return "none"
    return str(dist.get_backend(process_group))


__all__ = [
    "CallSite",
    "ProcessGroup",
    "SyncBatchNormError",
    "backend_name",
    "group_size",
    "is_distributed",
    "reduce_backward",
    "reduce_forward",
    "resolve_group",
]
