"""Paddle's parameter initializers, as callables that fill a torch tensor in place.

In Paddle an initializer appends an op to a program; here each one is a plain
callable ``init(tensor) -> tensor`` that fills ``tensor`` in place under
``torch.no_grad()`` and returns it. Random ones draw from torch's global RNG
(seed with ``torch.manual_seed``): the numbers differ from Paddle's, the
distributions are Paddle's.

Fans follow Paddle's ``Initializer._compute_fans``, for a tensor of shape ``s``:

========================  ======================  ======================
rank                      fan_in                  fan_out
========================  ======================  ======================
0                         1                       1
1 (a BatchNorm weight)    s[0]                    s[0]
2                         s[0]                    s[1]
≥ 3 (a conv kernel)       s[1] · prod(s[2:])      s[0] · prod(s[2:])
========================  ======================  ======================

So for a BatchNorm parameter of ``C`` channels both fans are ``C``:
``XavierNormal`` has std ``gain · sqrt(2 / (C + C)) = gain / sqrt(C)`` and
``KaimingNormal`` has std ``gain / sqrt(C)``. ``torch.nn.init`` refuses tensors
of rank < 2; these do not. The rank-2 row is Paddle's (in, out) Linear layout: on
a torch Linear weight, which is (out, in), the two fans come out swapped, so pass
``fan_in=`` / ``fan_out=`` explicitly there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "Constant",
    "Initializer",
    "KaimingNormal",
    "KaimingUniform",
    "Normal",
    "TruncatedNormal",
    "Uniform",
    "XavierNormal",
    "XavierUniform",
    "calculate_gain",
]

# Paddle's ``calculate_gain`` table; ``leaky_relu`` is computed from its slope.
_GAINS: dict[str, float] = {
    "sigmoid": 1.0,
    "linear": 1.0,
    "conv1d": 1.0,
    "conv2d": 1.0,
    "conv3d": 1.0,
    "conv1d_transpose": 1.0,
    "conv2d_transpose": 1.0,
    "conv3d_transpose": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "selu": 3.0 / 4.0,
}
_GAIN_NAMES = (*sorted(_GAINS), "leaky_relu")


def _real(value: object, what: str, owner: str) -> float:
    """``value`` as a finite float; TypeError / ValueError naming ``owner(what=...)``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{owner}: expected {what} to be a real number, got {type(value).__name__} "
            f"({value!r}). Fix: pass a float, e.g. {what}=1.0."
        )
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(
            f"{owner}: expected a finite {what}, got {result!r}. Fix: pass a finite float."
        )
    return result


def _optional_fan(value: float | None, what: str, owner: str) -> float | None:
    if value is None:
        return None
    fan = _real(value, what, owner)
    if fan <= 0:
        raise ValueError(
            f"{owner}: expected {what} > 0, got {fan!r}. "
            f"Fix: pass a positive {what}, or None to infer it from the tensor's shape."
        )
    return fan


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """Paddle's recommended gain for ``nonlinearity`` (``paddle.nn.initializer.calculate_gain``).

    ``1`` for sigmoid / linear / conv*, ``5/3`` for tanh, ``sqrt(2)`` for relu,
    ``3/4`` for selu and ``sqrt(2 / (1 + param²))`` for leaky_relu, where ``param``
    (the negative slope) defaults to ``0.01`` when None.

    Raises:
        ValueError: ``nonlinearity`` is not one of the names above.
        TypeError: ``param`` is not a real number.
    """
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else _real(param, "param", "calculate_gain")
        return math.sqrt(2.0 / (1.0 + slope**2))
    if nonlinearity in _GAINS:
        return _GAINS[nonlinearity]
    raise ValueError(
        f"calculate_gain: expected nonlinearity to be one of {list(_GAIN_NAMES)}, "
        f"got {nonlinearity!r}. Fix: pick one of those names."
    )


def _compute_fans(shape: torch.Size) -> tuple[int, int]:
    """(fan_in, fan_out) of a tensor of ``shape`` by Paddle's convention (module docstring)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def _checked_fan(fan: float, what: str, owner: str, tensor: Tensor) -> float:
    if fan <= 0:
        raise ValueError(
            f"{owner}: cannot infer a positive {what} from a tensor of shape "
            f"{tuple(tensor.shape)} (got {fan}). Fix: pass {what}= explicitly."
        )
    return fan


class Initializer:
    """Base class: ``init(tensor)`` fills ``tensor`` in place and returns it.

    Subclasses implement ``_fill``. Any other callable ``f(tensor)`` is accepted
    wherever an initializer is, if it fills ``tensor`` in place or returns a new
    tensor of ``tensor``'s shape and dtype (copied in); anything else is an error
    when the parameter is created (``_param_attr.run_initializer``).
    """

    def __call__(self, tensor: Tensor) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{type(self).__name__}: expected a torch.Tensor to fill, got "
                f"{type(tensor).__name__}. Fix: call it on a tensor, e.g. init(layer.weight)."
            )
        with torch.no_grad():
            self._fill(tensor)
        return tensor

    def _fill(self, tensor: Tensor) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Initializer):
    """Fill with ``value`` (``paddle.nn.initializer.Constant``)."""

    value: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _real(self.value, "value", "Constant"))

    def _fill(self, tensor: Tensor) -> None:
        tensor.fill_(self.value)


@dataclass(frozen=True)
class Normal(Initializer):
    """Draw from N(mean, std²) (``paddle.nn.initializer.Normal``)."""

    mean: float = 0.0
    std: float = 1.0
    name: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _real(self.mean, "mean", "Normal"))
        std = _real(self.std, "std", "Normal")
        if std < 0:
            raise ValueError(f"Normal: expected std >= 0, got {std!r}. Fix: pass std >= 0.")
        object.__setattr__(self, "std", std)

    def _fill(self, tensor: Tensor) -> None:
        tensor.normal_(self.mean, self.std)


@dataclass(frozen=True)
class TruncatedNormal(Initializer):
    """Draw from N(mean, std²) restricted to ``[a, b]`` (``paddle.nn.initializer.TruncatedNormal``).

    ``a`` and ``b`` are absolute cut-offs, as in Paddle ≥ 3.0 and
    ``torch.nn.init.trunc_normal_`` (Paddle 2.x had no ``a``/``b`` and cut at
    ``mean ± 2·std``; with the defaults ``mean=0, std=1`` both agree). Paddle notes
    that the samples are off when ``mean`` lies more than ``2·std`` outside ``[a, b]``.
    """

    mean: float = 0.0
    std: float = 1.0
    a: float = -2.0
    b: float = 2.0
    name: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = "TruncatedNormal"
        object.__setattr__(self, "mean", _real(self.mean, "mean", owner))
        std = _real(self.std, "std", owner)
        if std <= 0:
            raise ValueError(f"{owner}: expected std > 0, got {std!r}. Fix: pass std > 0.")
        object.__setattr__(self, "std", std)
        a, b = _real(self.a, "a", owner), _real(self.b, "b", owner)
        if not a < b:
            raise ValueError(
                f"{owner}: expected a < b (the cut-offs), got a={a!r}, b={b!r}. "
                "Fix: pass a lower bound a below the upper bound b."
            )
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def _fill(self, tensor: Tensor) -> None:
        torch.nn.init.trunc_normal_(tensor, self.mean, self.std, self.a, self.b)


@dataclass(frozen=True)
class Uniform(Initializer):
    """Draw from U(low, high) (``paddle.nn.initializer.Uniform``)."""

    low: float = -1.0
    high: float = 1.0
    name: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        low, high = _real(self.low, "low", "Uniform"), _real(self.high, "high", "Uniform")
        if low > high:
            raise ValueError(
                f"Uniform: expected low <= high, got low={low!r}, high={high!r}. Fix: swap them."
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def _fill(self, tensor: Tensor) -> None:
        tensor.uniform_(self.low, self.high)


@dataclass(frozen=True)
class _Xavier(Initializer):
    fan_in: float | None = None
    fan_out: float | None = None
    gain: float = 1.0
    name: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "fan_in", _optional_fan(self.fan_in, "fan_in", owner))
        object.__setattr__(self, "fan_out", _optional_fan(self.fan_out, "fan_out", owner))
        object.__setattr__(self, "gain", _real(self.gain, "gain", owner))

    def _fan_sum(self, tensor: Tensor) -> float:
        inferred_in, inferred_out = _compute_fans(tensor.shape)
        fan_in = inferred_in if self.fan_in is None else self.fan_in
        fan_out = inferred_out if self.fan_out is None else self.fan_out
        return _checked_fan(fan_in + fan_out, "fan_in + fan_out", type(self).__name__, tensor)


class XavierNormal(_Xavier):
    """Glorot normal: N(0, std²), ``std = gain · sqrt(2 / (fan_in + fan_out))``.

    ``paddle.nn.initializer.XavierNormal(fan_in=None, fan_out=None, gain=1.0)``;
    fans not given are inferred from the tensor (module docstring).
    """

    def _fill(self, tensor: Tensor) -> None:
        tensor.normal_(0.0, self.gain * math.sqrt(2.0 / self._fan_sum(tensor)))


class XavierUniform(_Xavier):
    """Glorot uniform: U(-x, x), ``x = gain · sqrt(6 / (fan_in + fan_out))``.

    ``paddle.nn.initializer.XavierUniform(fan_in=None, fan_out=None, gain=1.0)``;
    fans not given are inferred from the tensor (module docstring).
    """

    def _fill(self, tensor: Tensor) -> None:
        limit = self.gain * math.sqrt(6.0 / self._fan_sum(tensor))
        tensor.uniform_(-limit, limit)


@dataclass(frozen=True)
class _Kaiming(Initializer):
    fan_in: float | None = None
    negative_slope: float = 0.0
    nonlinearity: str = "relu"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "fan_in", _optional_fan(self.fan_in, "fan_in", owner))
        slope = _real(self.negative_slope, "negative_slope", owner)
        object.__setattr__(self, "negative_slope", slope)
        calculate_gain(self.nonlinearity, slope)  # validate the name now, not at fill time

    @property
    def gain(self) -> float:
        """``calculate_gain(nonlinearity, negative_slope)``."""
        return calculate_gain(self.nonlinearity, self.negative_slope)

    def _fan_in(self, tensor: Tensor) -> float:
        fan_in = _compute_fans(tensor.shape)[0] if self.fan_in is None else self.fan_in
        return _checked_fan(fan_in, "fan_in", type(self).__name__, tensor)


class KaimingNormal(_Kaiming):
    """He normal: N(0, std²), ``std = gain / sqrt(fan_in)``, gain from ``calculate_gain``.

    ``paddle.nn.initializer.KaimingNormal(fan_in=None, negative_slope=0.0,
    nonlinearity='relu')``; ``fan_in`` is inferred from the tensor when None.
    """

    def _fill(self, tensor: Tensor) -> None:
        tensor.normal_(0.0, self.gain / math.sqrt(self._fan_in(tensor)))


class KaimingUniform(_Kaiming):
    """He uniform: U(-x, x), ``x = gain · sqrt(3 / fan_in)``, gain from ``calculate_gain``.

    ``paddle.nn.initializer.KaimingUniform(fan_in=None, negative_slope=0.0,
    nonlinearity='relu')``; ``fan_in`` is inferred from the tensor when None.
    """

    def _fill(self, tensor: Tensor) -> None:
        limit = self.gain * math.sqrt(3.0 / self._fan_in(tensor))
        tensor.uniform_(-limit, limit)
