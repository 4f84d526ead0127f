"""Count the ops that do work in a step: what a layer costs the host, one launch per op.

A kernel here is a profiler event of an ``aten::`` or ``c10d::`` op that is not a
view, an allocation or a wrapper, and has no such event below it (so a composite
op counts as the kernels it runs, and a syncbn operator's body is opened up). On an
accelerator each such op is (at least) one launch; on CPU each costs its dispatch.
``python -m syncbn bench --chain`` reports kernels per layer-step with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

__all__ = ["count_kernels", "is_work"]

NOT_WORK = frozenset({
    # views and metadata
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::select", "aten::slice",
    "aten::narrow", "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::transpose", "aten::t", "aten::detach", "aten::detach_",
    "aten::alias", "aten::lift_fresh", "aten::chunk", "aten::split", "aten::unbind",
    "aten::view_as", "aten::expand_as", "aten::movedim", "aten::numpy_T", "aten::result_type",
    "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous",
    "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type",
    # allocations
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::new_empty", "aten::new_empty_strided",
    # wrappers whose work shows as a child (or that do none when nothing is converted)
    "aten::to", "aten::_to_copy", "aten::batch_norm", "aten::_batch_norm_impl_index",
    "aten::type_as", "aten::lift", "aten::_local_scalar_dense_wrapper",
})
"""Events that do no work of their own (a wrapper with no worker below does none at all:
``aten::to`` to the same dtype)."""


def is_work(name: str) -> bool:
    """Whether an event name is an op that may do work (before looking at its children)."""
    return (name.startswith(("aten::", "c10d::", "syncbn::"))
            and name not in NOT_WORK)


def count_kernels(step: Callable[[], Any], steps: int = 1) -> tuple[float, Counter[str]]:
    """Kernels per call of ``step`` (averaged over ``steps`` calls) and their names.

    The ``syncbn::`` operators themselves are wrappers of their bodies (opened up).
    """
    try:  # torch 2.10 warns unless events are kept (acc_events) past the cycle
        prof = profile(activities=[ProfilerActivity.CPU], acc_events=True)
    except TypeError:  # a torch without acc_events
        prof = profile(activities=[ProfilerActivity.CPU])
    with prof:
        for _ in range(steps):
            step()
    events = prof.events()  # type: ignore[no-untyped-call]
    counted: Counter[str] = Counter()
    for event in events:
        if not _counts(event):
            continue
        counted[event.name] += 1
    total = sum(counted.values())
    return total / steps, counted


def _counts(event: Any) -> bool:
    name: str = event.name
    if not is_work(name) or name.startswith("syncbn::"):
        return False
    return not any(_has_work_below(child) for child in event.cpu_children)


def _has_work_below(event: Any) -> bool:
    if is_work(event.name) and not event.name.startswith("syncbn::"):
        return True
    return any(_has_work_below(child) for child in event.cpu_children)
