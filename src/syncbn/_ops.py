"""How syncbn defines its operators in the ``syncbn`` namespace of ``torch.library``.

Compiled and traced code must see the collective and the state updates as single
opaque operators (see ``_comm`` and ``_autograd``). ``torch.library.custom_op``
would define them too, but every call of such an operator then runs several layers
of Python before and after its body (the autograd wrapper, the version bump of the
mutated arguments, argument checks): measured on CPU, 21 µs for ``count_step_``, 47 µs
for ``all_reduce``, 72 µs for ``update_running_stats_``, paid by every compiled step.
:func:`operator` registers the same schema (inferred from the annotations, as
``custom_op`` infers it, and with its ``pt2_compliant_tag``) with one
``CompositeExplicitAutograd`` kernel, the body itself: the dispatcher calls it directly
(4–7 µs a call). What differs from ``custom_op``, and why it does not matter here:

- no autograd formula, and no error if one were needed: ``custom_op`` raises when a
  backward reaches an operator without one, the dispatcher's fallback only warns. The
  inputs never require grad (the state buffers, or sums computed inside an autograd
  Function's forward or backward, double backward being refused before), so no
  gradient ever flows through these operators;
- a mutated argument is changed by in-place torch ops inside the body, which move
  its version counter as any in-place op does (``custom_op`` bumps it itself);
- the fake (meta) implementation is registered with ``torch.library.register_fake``.

``syncbn::checked_inplace_weight`` (``_autograd``) stays a ``custom_op``: it needs an
autograd formula (``register_autograd``) and runs only in the in-place mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

NAMESPACE = "syncbn"

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # type: ignore[no-untyped-call]
"""Holds the registrations for the process's lifetime (they end with this object)."""


def operator(name: str, mutates_args: tuple[str, ...] = ()
             ) -> Callable[[Callable[..., Any]], Any]:
    """Define ``syncbn::<name>`` with the decorated function as its kernel on every backend;
    returns the operator's default overload (call it like the function)."""

    def define(body: Callable[..., Any]) -> Any:
        schema = torch.library.infer_schema(body, mutates_args=mutates_args)
        _LIBRARY.define(name + schema,  # type: ignore[no-untyped-call]
                        tags=(torch.Tag.pt2_compliant_tag,))
        _LIBRARY.impl(name, body, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
        return getattr(getattr(torch.ops, NAMESPACE), name).default

    return define


def fake(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Register the shape-only implementation of ``syncbn::<name>`` (FakeTensor, meta)."""
    return torch.library.register_fake(f"{NAMESPACE}::{name}")  # type: ignore[no-any-return]
