"""Paddle's ``act=`` activations (old ``paddle.nn.BatchNorm``), by name, in torch.

Paddle applies ``act`` by calling the operator of that name with its default
attributes (``_legacy_C_ops.<act>(x)``), so the names are operator names — ``hard_swish``,
not ``hardswish`` — and the constants are the operators' defaults, which differ from
``paddle.nn.functional`` in places (``leaky_relu``: slope 0.02, not 0.01;
``hard_sigmoid``: slope 0.2, not 1/6). Operator attributes are float32, so each
constant below is the float32 value (``0.02`` is ``0.0199999995529651641845703125``),
which makes float64 results match Paddle's too.

=================  ==========================================================  =========
name               definition                                                  constants
=================  ==========================================================  =========
relu               max(x, 0)
relu6              min(max(x, 0), t)                                           t = 6
brelu              min(max(x, t_min), t_max)                                   0, 24
leaky_relu         x if x ≥ 0 else α·x                                         α = 0.02
thresholded_relu   x if x > t else 0                                           t = 1
elu                x if x > 0 else α·(eˣ − 1)                                  α = 1
celu               max(0, x) + min(0, α·(e^(x/α) − 1))                          α = 1
selu               λ·x if x > 0 else λ·α·(eˣ − 1)                              λ, α (1)
gelu               x/2 · (1 + erf(x/√2))   (approximate=False)
sigmoid            1 / (1 + e⁻ˣ)
logsigmoid         log(1 / (1 + e⁻ˣ))
hard_sigmoid       min(max(s·x + o, 0), 1)                                     0.2, 0.5
silu, swish        x · sigmoid(β·x)                                            β = 1
hard_swish         x · min(max(x + o, 0), t) / s                               3, 6, 6
mish               x · tanh(softplus(x)), softplus(x) = x when x > t           t = 20
softplus           log(1 + e^(β·x)) / β, or x when β·x > t                     1, 20
soft_relu          log(1 + e^(min(max(x, −t), t)))                             t = 40
softsign           x / (1 + |x|)
softshrink         x − λ if x > λ, x + λ if x < −λ, else 0                     λ = 0.5
hard_shrink        x if |x| > t else 0                                         t = 0.5
tanh               tanh(x)
tanh_shrink        x − tanh(x)
stanh              b · tanh(a·x)                                               0.67, 1.7159
=================  ==========================================================  =========

(1) λ = 1.0507009873554804934193349852946, α = 1.6732632423543772848170429916717.

Element-wise math operators are accepted as well, as Paddle accepts them: ``abs``,
``ceil``, ``floor``, ``round`` (half away from zero, like C's ``round``), ``exp``,
``expm1``, ``log``, ``log1p``, ``log2``, ``log10``, ``sqrt``, ``rsqrt``, ``square``,
``reciprocal``, ``erf``, ``sin``, ``cos``, ``tan``, ``sinh``, ``cosh``, ``asin``,
``acos``, ``atan``, ``asinh``, ``acosh``, ``atanh``.

Invertible activations (:data:`INVERTIBLE_ACTIVATIONS`, :func:`is_invertible`) are
those that are continuous and strictly increasing on their domain, so the output
determines the input. In floating point the inverse is only as good as the slope:
exact up to rounding for ``leaky_relu`` (and ``None``), lossy where a function
saturates (``sigmoid``, ``tanh``, ``elu`` for x → −∞, …). ``softplus`` is left out:
its switch to ``x`` at ``x > 20`` is a downward jump of about 2e-9.
"""

from __future__ import annotations

import difflib
import struct
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATION_NAMES", "INVERTIBLE_ACTIVATIONS", "get_activation", "is_invertible"]

Activation = Callable[[Tensor], Tensor]


def _f32(value: float) -> float:
    """``value`` rounded to float32, as Paddle stores operator attributes."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


_LEAKY_SLOPE = _f32(0.02)
LEAKY_RELU_SLOPE = _LEAKY_SLOPE
"""Slope of Paddle's ``leaky_relu`` operator as ``act=`` applies it (float32 0.02)."""
_SELU_SCALE = _f32(1.0507009873554804934193349852946)
_SELU_ALPHA = _f32(1.6732632423543772848170429916717)
_HARD_SIGMOID_SLOPE = _f32(0.2)
_STANH_A = _f32(0.67)
_STANH_B = _f32(1.7159)


def _identity(x: Tensor) -> Tensor:
    return x


def _relu6(x: Tensor) -> Tensor:
    return torch.clamp(x, 0.0, 6.0)


def _brelu(x: Tensor) -> Tensor:
    return torch.clamp(x, 0.0, 24.0)


def _leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, _LEAKY_SLOPE)


def _thresholded_relu(x: Tensor) -> Tensor:
    return torch.where(x > 1.0, x, torch.zeros_like(x))


def _elu(x: Tensor) -> Tensor:
    return F.elu(x, alpha=1.0)


def _celu(x: Tensor) -> Tensor:
    return F.celu(x, alpha=1.0)


def _selu(x: Tensor) -> Tensor:
    return _SELU_SCALE * torch.where(x > 0, x, _SELU_ALPHA * torch.expm1(x))


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="none")


def _hard_sigmoid(x: Tensor) -> Tensor:
    return torch.clamp(_HARD_SIGMOID_SLOPE * x + 0.5, 0.0, 1.0)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _hard_swish(x: Tensor) -> Tensor:
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def _softplus(x: Tensor) -> Tensor:
    return F.softplus(x, beta=1.0, threshold=20.0)


def _mish(x: Tensor) -> Tensor:
    return x * torch.tanh(F.softplus(x, beta=1.0, threshold=20.0))


def _soft_relu(x: Tensor) -> Tensor:
    return torch.log1p(torch.exp(torch.clamp(x, -40.0, 40.0)))


def _softshrink(x: Tensor) -> Tensor:
    return F.softshrink(x, 0.5)


def _hard_shrink(x: Tensor) -> Tensor:
    return F.hardshrink(x, 0.5)


def _stanh(x: Tensor) -> Tensor:
    return _STANH_B * torch.tanh(_STANH_A * x)


def _round(x: Tensor) -> Tensor:
    # Half away from zero (C's round), not torch.round's half to even. x - trunc(x)
    # is exact, unlike floor(|x| + 0.5), which rounds 0.49999997 up in float32.
    whole = torch.trunc(x)
    fraction = x - whole
    return whole + torch.where(fraction.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


_ACTIVATIONS: dict[str, Activation] = {
    "relu": F.relu,
    "relu6": _relu6,
    "brelu": _brelu,
    "leaky_relu": _leaky_relu,
    "thresholded_relu": _thresholded_relu,
    "elu": _elu,
    "celu": _celu,
    "selu": _selu,
    "gelu": _gelu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "silu": _swish,
    "swish": _swish,
    "hard_swish": _hard_swish,
    "mish": _mish,
    "softplus": _softplus,
    "soft_relu": _soft_relu,
    "softsign": F.softsign,
    "softshrink": _softshrink,
    "hard_shrink": _hard_shrink,
    "tanh": torch.tanh,
    "tanh_shrink": F.tanhshrink,
    "stanh": _stanh,
    # element-wise math operators
    "abs": torch.abs,
    "ceil": torch.ceil,
    "floor": torch.floor,
    "round": _round,
    "exp": torch.exp,
    "expm1": torch.expm1,
    "log": torch.log,
    "log1p": torch.log1p,
    "log2": torch.log2,
    "log10": torch.log10,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "square": torch.square,
    "reciprocal": torch.reciprocal,
    "erf": torch.erf,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "asin": torch.asin,
    "acos": torch.acos,
    "atan": torch.atan,
    "asinh": torch.asinh,
    "acosh": torch.acosh,
    "atanh": torch.atanh,
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(sorted(_ACTIVATIONS))
"""Every name ``get_activation`` accepts (besides None), sorted."""

INVERTIBLE_ACTIVATIONS: frozenset[str] = frozenset(
    {
        "leaky_relu", "elu", "celu", "selu", "sigmoid", "logsigmoid", "tanh",
        "tanh_shrink", "stanh", "softsign", "exp", "expm1", "log", "log1p", "log2",
        "log10", "sqrt", "erf", "sinh", "asin", "atan", "asinh", "acosh", "atanh",
    }
)  # fmt: skip
"""Names of the continuous, strictly increasing activations (module docstring)."""


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(
            f"act: expected None or an activation name (str), got {type(name).__name__} "
            f"({name!r}). Fix: pass e.g. act='relu'."
        )
    if name not in _ACTIVATIONS:
        close = difflib.get_close_matches(name, ACTIVATION_NAMES, n=3)
        hint = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"act: unknown activation {name!r}. {hint}Fix: pass None or one of "
            f"{', '.join(ACTIVATION_NAMES)}."
        )
    return name


def get_activation(name: str | None) -> Activation:
    """The Paddle activation ``name`` as a function ``Tensor -> Tensor``; None is the identity.

    Raises:
        TypeError: ``name`` is neither None nor a str.
        ValueError: ``name`` is not in :data:`ACTIVATION_NAMES` (the message lists them).
    """
    checked = _check_name(name)
    return _identity if checked is None else _ACTIVATIONS[checked]


def is_invertible(name: str | None) -> bool:
    """Whether activation ``name`` is continuous and strictly increasing (None: identity, True).

    Raises:
        TypeError / ValueError: as :func:`get_activation`.
    """
    checked = _check_name(name)
    return checked is None or checked in INVERTIBLE_ACTIVATIONS
