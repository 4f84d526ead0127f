"""Paddle ``act=`` activations against independent scalar formulas with Paddle's constants."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from syncbn.paddle_compat import (
    ACTIVATION_NAMES,
    INVERTIBLE_ACTIVATIONS,
    get_activation,
    is_invertible,
)

# Paddle's documented constants (operator defaults; stored as float32 by Paddle).
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
LEAKY = 0.02
HS_SLOPE, HS_OFFSET = 0.2, 0.5


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _softplus(v: float) -> float:
    return v if v > 20.0 else math.log(1.0 + math.exp(v))


def _round_half_away(v: float) -> float:
    return math.copysign(math.floor(abs(v) + 0.5), v)


Scalar = Callable[[float], float]
REFERENCE: dict[str, tuple[Scalar, Callable[[float], bool]]] = {
    # name: (formula, domain)
    "relu": (lambda v: max(v, 0.0), lambda v: True),
    "relu6": (lambda v: min(max(v, 0.0), 6.0), lambda v: True),
    "brelu": (lambda v: min(max(v, 0.0), 24.0), lambda v: True),
    "leaky_relu": (lambda v: v if v >= 0 else LEAKY * v, lambda v: True),
    "thresholded_relu": (lambda v: v if v > 1.0 else 0.0, lambda v: True),
    "elu": (lambda v: v if v > 0 else math.exp(v) - 1.0, lambda v: True),
    "celu": (lambda v: max(0.0, v) + min(0.0, math.exp(v) - 1.0), lambda v: True),
    "selu": (
        lambda v: SELU_SCALE * (v if v > 0 else SELU_ALPHA * (math.exp(v) - 1.0)),
        lambda v: True,
    ),
    "gelu": (lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))), lambda v: True),
    "sigmoid": (_sigmoid, lambda v: True),
    "logsigmoid": (lambda v: -math.log1p(math.exp(-v)), lambda v: True),
    "hard_sigmoid": (
        lambda v: 0.0 if v <= -2.5 else 1.0 if v >= 2.5 else HS_SLOPE * v + HS_OFFSET,
        lambda v: True,
    ),
    "silu": (lambda v: v * _sigmoid(v), lambda v: True),
    "swish": (lambda v: v * _sigmoid(v), lambda v: True),
    "hard_swish": (lambda v: v * min(max(v + 3.0, 0.0), 6.0) / 6.0, lambda v: True),
    "mish": (lambda v: v * math.tanh(_softplus(v)), lambda v: True),
    "softplus": (_softplus, lambda v: True),
    "soft_relu": (lambda v: math.log(1.0 + math.exp(min(max(v, -40.0), 40.0))), lambda v: True),
    "softsign": (lambda v: v / (1.0 + abs(v)), lambda v: True),
    "softshrink": (
        lambda v: v - 0.5 if v > 0.5 else v + 0.5 if v < -0.5 else 0.0,
        lambda v: True,
    ),
    "hard_shrink": (lambda v: v if abs(v) > 0.5 else 0.0, lambda v: True),
    "tanh": (math.tanh, lambda v: True),
    "tanh_shrink": (lambda v: v - math.tanh(v), lambda v: True),
    "stanh": (lambda v: 1.7159 * math.tanh(0.67 * v), lambda v: True),
    "abs": (abs, lambda v: True),
    "ceil": (lambda v: float(math.ceil(v)), lambda v: True),
    "floor": (lambda v: float(math.floor(v)), lambda v: True),
    "round": (_round_half_away, lambda v: True),
    "exp": (math.exp, lambda v: v < 50),
    "expm1": (math.expm1, lambda v: v < 50),
    "log": (math.log, lambda v: v > 0),
    "log1p": (math.log1p, lambda v: v > -1),
    "log2": (math.log2, lambda v: v > 0),
    "log10": (math.log10, lambda v: v > 0),
    "sqrt": (math.sqrt, lambda v: v >= 0),
    "rsqrt": (lambda v: 1.0 / math.sqrt(v), lambda v: v > 0),
    "square": (lambda v: v * v, lambda v: True),
    "reciprocal": (lambda v: 1.0 / v, lambda v: v != 0),
    "erf": (math.erf, lambda v: True),
    "sin": (math.sin, lambda v: True),
    "cos": (math.cos, lambda v: True),
    "tan": (math.tan, lambda v: True),
    "sinh": (math.sinh, lambda v: abs(v) < 50),
    "cosh": (math.cosh, lambda v: abs(v) < 50),
    "asin": (math.asin, lambda v: abs(v) <= 1),
    "acos": (math.acos, lambda v: abs(v) <= 1),
    "atan": (math.atan, lambda v: True),
    "asinh": (math.asinh, lambda v: True),
    "acosh": (math.acosh, lambda v: v >= 1),
    "atanh": (math.atanh, lambda v: abs(v) < 1),
}

POINTS = [
    -45.0, -30.0, -5.5, -3.0, -2.5, -2.0, -1.0, -0.7, -0.5, -0.3, -0.25, 0.0,
    0.25, 0.3, 0.5, 0.7, 0.9, 1.0, 1.5, 2.0, 2.5, 3.0, 5.5, 19.9, 20.5, 30.0, 45.0,
]  # fmt: skip


def test_every_name_has_a_reference() -> None:
    assert set(REFERENCE) == set(ACTIVATION_NAMES)


def test_names_are_a_sorted_tuple_of_paddle_operator_names() -> None:
    assert isinstance(ACTIVATION_NAMES, tuple)
    assert list(ACTIVATION_NAMES) == sorted(ACTIVATION_NAMES)
    required = {"relu", "relu6", "sigmoid", "tanh", "gelu", "elu", "selu", "swish", "silu",
                "softsign", "softplus", "hard_swish", "hard_sigmoid", "brelu", "leaky_relu",
                "mish", "logsigmoid", "tanh_shrink", "softshrink", "hard_shrink", "square",
                "sqrt", "abs", "exp", "log"}  # fmt: skip
    assert required <= set(ACTIVATION_NAMES)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_matches_reference_formula(name: str) -> None:
    formula, domain = REFERENCE[name]
    points = [v for v in POINTS if domain(v)]
    x = torch.tensor(points, dtype=torch.float64)
    expected = torch.tensor([formula(v) for v in points], dtype=torch.float64)
    # rtol covers Paddle's float32-rounded constants (e.g. 0.02 → 0.019999999552965164)
    torch.testing.assert_close(get_activation(name)(x), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_keeps_shape_and_dtype_and_float32_agrees(name: str) -> None:
    formula, domain = REFERENCE[name]
    points = [v for v in np.linspace(-3.0, 3.0, 24).tolist() if domain(v)]
    x = torch.tensor(points, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, 2, 3)
    out = get_activation(name)(x)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    expected = torch.tensor([formula(v) for v in points], dtype=torch.float32)
    torch.testing.assert_close(out[:, 1, 2], expected, rtol=2e-6, atol=2e-6)


def test_constants_are_paddles_float32_values() -> None:
    x = torch.tensor([-1.0], dtype=torch.float64)
    assert get_activation("leaky_relu")(x).item() == -float(np.float32(0.02))
    assert get_activation("selu")(torch.tensor([1.0], dtype=torch.float64)).item() == float(
        np.float32(SELU_SCALE)
    )


@pytest.mark.parametrize(
    ("name", "x", "y"),
    [
        ("selu", 1.0, SELU_SCALE),
        ("selu", -60.0, -SELU_SCALE * SELU_ALPHA),  # saturation value −λα
        ("hard_sigmoid", -3.0, 0.0),
        ("hard_sigmoid", -2.5, 0.0),
        ("hard_sigmoid", 1.0, 0.7),  # 0.2·1 + 0.5, not torch's 1/6 slope
        ("hard_sigmoid", 2.5, 1.0),
        ("hard_swish", 1.0, 4.0 / 6.0),
        ("leaky_relu", -10.0, -0.2),  # operator default 0.02, not paddle.nn.functional's 0.01
        ("round", 2.5, 3.0),  # half away from zero, unlike torch.round
        ("round", -0.5, -1.0),
        ("thresholded_relu", 1.0, 0.0),
        ("brelu", 30.0, 24.0),
        ("soft_relu", 100.0, math.log1p(math.exp(40.0))),
        ("softplus", 25.0, 25.0),
        ("stanh", 1.0, 1.7159 * math.tanh(0.67)),
        ("hard_shrink", 0.5, 0.0),
        ("softshrink", -0.7, -0.2),
    ],
)
def test_chosen_points(name: str, x: float, y: float) -> None:
    out = get_activation(name)(torch.tensor([x], dtype=torch.float64))
    assert out.item() == pytest.approx(y, rel=1e-7, abs=1e-12)


def test_round_float32_just_below_half() -> None:
    x = torch.tensor([np.nextafter(np.float32(0.5), np.float32(0))], dtype=torch.float32)
    assert get_activation("round")(x).item() == 0.0


def test_none_is_identity() -> None:
    x = torch.randn(3)
    assert get_activation(None)(x) is x


def test_gradients_flow() -> None:
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    get_activation("selu")(x).sum().backward()
    assert x.grad is not None
    expected = [SELU_SCALE * SELU_ALPHA * math.exp(-1.0), SELU_SCALE, SELU_SCALE]
    torch.testing.assert_close(
        x.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=0
    )


def test_unknown_name_lists_names_and_suggests() -> None:
    with pytest.raises(
        ValueError, match=r"unknown activation 'hardswish'\. Did you mean 'hard_swish'"
    ) as info:
        get_activation("hardswish")
    assert all(name in str(info.value) for name in ACTIVATION_NAMES)
    with pytest.raises(ValueError, match=r"unknown activation 'Relu'"):
        get_activation("Relu")


def test_non_str_name() -> None:
    with pytest.raises(
        TypeError, match=r"act: expected None or an activation name \(str\), got int"
    ):
        get_activation(3)  # type: ignore[arg-type]


def _grid(name: str) -> torch.Tensor:
    """10 001 points of ``name``'s domain where float64 resolves its slope."""
    low, high = -5.0, 5.0
    if name in {"asin", "acos", "atanh"}:
        low, high = -0.999, 0.999
    elif name == "acosh":
        low, high = 1.0, 50.0
    elif name in {"log", "log2", "log10", "log1p", "sqrt", "rsqrt"}:
        low, high = 0.001, 50.0
    elif name == "soft_relu":
        low, high = -50.0, 50.0  # flat beyond ±40
    return torch.linspace(low, high, 10_001, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(INVERTIBLE_ACTIVATIONS))
def test_invertible_ones_are_strictly_increasing(name: str) -> None:
    assert is_invertible(name)
    steps = torch.diff(get_activation(name)(_grid(name)))
    assert bool((steps > 0).all()), name


@pytest.mark.parametrize("name", sorted(set(ACTIVATION_NAMES) - INVERTIBLE_ACTIVATIONS))
def test_others_are_not_strictly_increasing(name: str) -> None:
    assert not is_invertible(name)
    if name == "softplus":
        # Increasing, but the switch to x above 20 jumps down by log1p(e^-20) ≈ 2e-9.
        y = get_activation(name)(torch.tensor([20.0, 20.0 + 1e-9], dtype=torch.float64))
        assert y[1] < y[0]
        return
    steps = torch.diff(get_activation(name)(_grid(name)))
    assert bool((steps <= 0).any()), name


def test_is_invertible_none_and_errors() -> None:
    assert is_invertible(None)
    assert is_invertible("leaky_relu")
    assert is_invertible("elu")
    assert not is_invertible("relu")
    with pytest.raises(ValueError, match=r"unknown activation 'nope'"):
        is_invertible("nope")
