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
    """The raw bytes of a CPU tensor as a buffer (for a CRC), through a copy of our own: a
    NumPy view of the caller's tensor would make its storage unresizable for good (FSDP2
    frees parameters by resizing theirs)."""
    data = tensor.detach().clone(memory_format=torch.contiguous_format)
    try:
        try:
            return data.numpy()
        except TypeError:  # bfloat16 has no NumPy dtype: its raw bytes
            return data.view(torch.uint8).numpy()
    except (ImportError, RuntimeError, TypeError):
        return repr(data.tolist()).encode()


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of some small CPU tensors is finite (the rare paths' check: CPU
    layers whose parameters NumPy cannot view)."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def host_int(tensor: torch.Tensor) -> int:
    """A one-value tensor as a Python int (on an accelerator: one device read)."""
    return int(tensor.detach().reshape(-1)[0].item())
