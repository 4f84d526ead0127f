"""Honour recorded ``ParamAttr``s with a torch optimizer: lr scales, weight decay, clipping.

Paddle's optimizer reads each parameter's attr at every step: the update uses
``lr · attr.learning_rate``, and the gradient gains the parameter's own
regularizer term if it has one, else the optimizer's ``weight_decay`` term.
Torch expresses the same with parameter groups::

    groups = optimizer_param_groups(model, base_lr=0.1, weight_decay=1e-4)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    loss = criterion(model(x), y) + l1_penalty(model)   # only if some attr has L1Decay
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clippable_parameters(model), max_norm=1.0)
    opt.step()

where, for each trainable parameter ``w`` with attr ``a`` (no attr: ``learning_rate=1``,
no regularizer):

- ``lr(w) = base_lr · a.learning_rate``;
- ``weight_decay(w) = c`` for ``L2Decay(c)``, ``0`` for ``L1Decay`` (see
  :func:`l1_penalty`), and the ``weight_decay`` argument when ``a.regularizer`` is None.

Torch's ``weight_decay`` adds ``weight_decay · w`` to the gradient, which is
Paddle's ``L2Decay``, in SGD, Momentum, Adam, RMSprop and the like. It is not so in
``torch.optim.AdamW``, whose decay is decoupled from the gradient. LR schedulers
that scale every group by a factor (StepLR, LambdaLR, cosine, …) keep the ratios;
ones that set absolute rates (OneCycleLR, CyclicLR) need one rate per group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._param_attr import L1Decay, L2Decay, finite_non_negative, named_param_attrs

__all__ = ["clippable_parameters", "l1_penalty", "optimizer_param_groups"]


def _non_negative(value: object, what: str) -> float:
    return finite_non_negative(value, "optimizer_param_groups", what, f"{what}=0.1")


def optimizer_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Torch optimizer parameter groups that apply each parameter's recorded ``ParamAttr``.

    Parameters with ``requires_grad=False`` (``trainable=False``) are left out.
    Parameters with equal ``(lr, weight_decay)`` share one group; groups come in the
    order their first parameter appears in ``model.named_parameters()``.

    Args:
        model: the model; attrs are read with ``named_param_attrs``.
        base_lr: the optimizer's learning rate (Paddle's ``learning_rate``).
        weight_decay: L2 coefficient for parameters whose attr has no regularizer
            (Paddle's optimizer ``weight_decay`` given as a float).

    Returns:
        A list of ``{"params": [...], "lr": float, "weight_decay": float}`` dicts, to
        pass as the first argument of any ``torch.optim`` optimizer.

    Raises:
        TypeError / ValueError: ``base_lr`` or ``weight_decay`` is not a finite real >= 0.
    """
    lr = _non_negative(base_lr, "base_lr")
    default_decay = _non_negative(weight_decay, "weight_decay")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for _, param, attr in named_param_attrs(model):
        if not param.requires_grad:
            continue
        scale = 1.0 if attr is None else attr.learning_rate
        regularizer = None if attr is None else attr.regularizer
        if isinstance(regularizer, L2Decay):
            decay = regularizer.coeff
        elif isinstance(regularizer, L1Decay):
            decay = 0.0
        else:
            decay = default_decay
        key = (lr * scale, decay)
        group = groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())


def l1_penalty(model: nn.Module) -> Tensor:
    """``Σ coeff · Σ|w|`` over trainable parameters whose recorded attr has ``L1Decay(coeff)``.

    Add it to the loss: its gradient is ``coeff · sign(w)``, which is what Paddle's
    ``L1Decay`` adds to the gradient before the optimizer update (``sign(0) = 0`` in
    both). It is scaled by the group's lr like every other gradient term. With
    gradient accumulation over ``k`` micro-batches, add ``l1_penalty(model) / k`` per
    micro-batch (as you scale the loss) to apply it once per step.

    Returns:
        A 0-d tensor: on the first such parameter's device and dtype, or a float32
        CPU zero (which adds to a loss on any device) when there are none.
    """
    total: Tensor | None = None
    for _, param, attr in named_param_attrs(model):
        if attr is None or not param.requires_grad:
            continue
        if isinstance(attr.regularizer, L1Decay) and attr.regularizer.coeff != 0.0:
            term = attr.regularizer.coeff * param.abs().sum()
            total = term if total is None else total + term.to(total.device, total.dtype)
    return torch.zeros(()) if total is None else total


def clippable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters whose attr does not say ``need_clip=False``.

    Pass them to ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` to clip as
    Paddle's ``grad_clip`` does, which skips parameters with ``need_clip=False``.
    """
    return [
        param
        for _, param, attr in named_param_attrs(model)
        if param.requires_grad and (attr is None or attr.need_clip)
    ]
