"""The oracle for the Paddle-flavour layers: Paddle's formulas written out, in float64.

Per channel over every value of the batch (C at dim 1)::

    μ = mean(x),  σ² = mean((x − μ)²)                  (biased)
    y = w·(x − μ)/√(σ² + float32(ε)) + b
    _mean ← d·_mean + (1 − d)·μ,  _variance ← d·_variance + (1 − d)·σ²,  d = float32(momentum)

Autograd through these lines gives the exact gradients the layers must match.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor


def f32(value: float) -> float:
    """``value`` rounded to float32, as Paddle stores ``momentum`` and ``epsilon``."""
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


def reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    batch_stats: bool = True,
    rounded: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, new_mean, new_var)`` for a channels-first ``x``; running stats as given when
    ``batch_stats`` is False. ``rounded=False`` uses the constants unrounded (what a
    float64 implementation that ignores Paddle's float32 attributes would do)."""
    shape = (1, x.size(1)) + (1,) * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    eps = f32(epsilon) if rounded else epsilon
    decay = f32(momentum) if rounded else momentum
    if batch_stats:
        mu = x.mean(dims)
        sigma2 = (x - mu.view(shape)).square().mean(dims)
    else:
        mu, sigma2 = mean, var
    y = (x - mu.view(shape)) / torch.sqrt(sigma2.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if not batch_stats:
        return y, mean.clone(), var.clone()
    new_mean = decay * mean + (1.0 - decay) * mu.detach()
    new_var = decay * var + (1.0 - decay) * sigma2.detach()
    return y, new_mean, new_var
