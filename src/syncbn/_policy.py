"""The device policy: where the core may read device values on the host.

A device→host read (``.item()``, ``.tolist()``, ``.cpu()``, a CRC of device data,
``work.wait(timeout)`` polling) costs nothing on CPU tensors but stalls the
stream on an accelerator, so the steady-state training step follows one rule,
decided here and nowhere else:

- **CPU** (gloo): the core reads the 2 tail values of each collective (the global
  count and the summed step key) with ``tolist()`` (no kernel): the out-of-step
  check runs on every step and the global count is a host number in the merge;
  a timeout is enforced by ``work.wait(timeout)``.
- **accelerators** (NCCL, …): no host read per step. The global count stays on
  the device (the merge and the running-statistics update use it as a tensor),
  the out-of-step check runs in debug mode only, and collectives are waited on
  with plain ``wait()`` (stream ordering); a timeout is the process group's own
  (NCCL's watchdog aborts a collective that exceeds the group's timeout, see
  ``docs/reliability.md``). The rare one-value-per-channel check (a rank whose
  own count is at most 1) still reads the global count.

Tests run the accelerator branch on CPU tensors with :func:`force_accelerator_policy`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

_forced_accelerator = False


def host_reads(device: torch.device) -> bool:
    """Whether a training step may read device values on the host (CPU tensors only)."""
    return device.type == "cpu" and not _forced_accelerator


@contextlib.contextmanager
def force_accelerator_policy() -> Iterator[None]:
    """Run CPU tensors through the accelerator branch (for tests: it must read nothing)."""
    global _forced_accelerator
    previous, _forced_accelerator = _forced_accelerator, True
    try:
        yield
    finally:
        _forced_accelerator = previous


def host_bytes(tensor: torch.Tensor) -> Any:
    """The raw bytes of a CPU tensor as a buffer (for a CRC): a NumPy view when NumPy is
    installed (no kernel, no copy for a contiguous tensor), else the bytes of its ``tolist``."""
    data = tensor.detach()
    try:
        try:
            array = data.numpy()
        except TypeError:  # bfloat16 has no NumPy dtype: its raw bytes
            array = data.contiguous().view(torch.uint8).numpy()
        return array if array.flags.c_contiguous else array.copy()
    except (ImportError, RuntimeError, TypeError):
        return repr(data.tolist()).encode()


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of some small CPU tensors is finite, read on the host (no kernel).

    Through the sum of every value: an inf or NaN anywhere makes it non-finite; a sum that
    overflows although every value is finite answers False too (callers then take their
    exact path for non-finite values, which is right for finite ones as well).
    """
    try:
        total = 0.0
        for tensor in tensors:
            total += float(tensor.detach().numpy().sum(dtype="float64"))
        return math.isfinite(total)
    except (ImportError, RuntimeError, TypeError):
        return all(math.isfinite(v) for t in tensors for v in t.detach().double().flatten()
                   .tolist())


def host_int(tensor: torch.Tensor) -> int:
    """A one-value CPU tensor as a Python int, read through NumPy (no kernel; ``tolist`` of
    a 0-d tensor copies it first), else with ``tolist``."""
    try:
        return int(tensor.detach().numpy().reshape(-1)[0])
    except (ImportError, RuntimeError, TypeError):
        value = tensor.tolist()
        return int(value if not isinstance(value, list) else value[0])
