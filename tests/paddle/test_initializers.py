"""Paddle initializers: fan convention, distributions, validation."""

from __future__ import annotations

import math

import pytest
import torch

from syncbn.paddle_compat import (
    Constant,
    Initializer,
    KaimingNormal,
    KaimingUniform,
    Normal,
    TruncatedNormal,
    Uniform,
    XavierNormal,
    XavierUniform,
    calculate_gain,
)
from syncbn.paddle_compat._initializers import _compute_fans

BIG = 200_000  # samples: relative error of a sample std ≈ 1/sqrt(2·BIG) ≈ 0.16 %


@pytest.mark.parametrize(
    ("shape", "fans"),
    [
        ((), (1, 1)),
        ((7,), (7, 7)),
        ((3, 5), (3, 5)),
        ((8, 3, 3, 3), (27, 72)),
        ((4, 2, 3, 5, 7), (2 * 105, 4 * 105)),
    ],
    ids=["scalar", "bn-1d", "linear-in-out", "conv2d", "conv3d"],
)
def test_fans_follow_paddle(shape: tuple[int, ...], fans: tuple[int, int]) -> None:
    assert _compute_fans(torch.Size(shape)) == fans


def test_constant_fills_in_place_and_returns_the_tensor() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    out = Constant(2.5)(param)
    assert out is param
    assert torch.equal(param.detach(), torch.full((4,), 2.5))
    assert param.grad_fn is None
    assert param.requires_grad


def test_normal_matches_mean_and_std() -> None:
    x = Normal(mean=3.0, std=2.0)(torch.empty(BIG, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(3.0, abs=0.03)
    assert x.std().item() == pytest.approx(2.0, rel=0.01)


def test_truncated_normal_bounds_are_absolute() -> None:
    # Relative bounds (mean + a·std) would be [9.5, 10.5]; Paddle 3 and torch cut at [a, b].
    x = TruncatedNormal(mean=5.0, std=1.0, a=4.5, b=5.5)(torch.empty(BIG))
    assert x.min().item() >= 4.5
    assert x.max().item() <= 5.5
    assert x.mean().item() == pytest.approx(5.0, abs=0.01)


def test_truncated_normal_default_std() -> None:
    # Standard normal cut at ±2: var = 1 − 2·b·φ(b) / (Φ(b) − Φ(−b)), b = 2.
    b = 2.0
    pdf = math.exp(-b * b / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(b / math.sqrt(2))
    expected_std = math.sqrt(1 - 2 * b * pdf / mass)
    x = TruncatedNormal()(torch.empty(BIG, dtype=torch.float64))
    assert x.abs().max().item() <= 2.0
    assert x.std().item() == pytest.approx(expected_std, rel=0.01)


def test_uniform_range() -> None:
    x = Uniform(-0.5, 1.5)(torch.empty(BIG))
    assert x.min().item() >= -0.5
    assert x.max().item() <= 1.5
    assert x.min().item() < -0.49
    assert x.max().item() > 1.49


C = 100_000  # channels of a (long) BatchNorm weight; both fans are C


@pytest.mark.parametrize(
    ("init", "expected_std"),
    [
        (XavierNormal(), math.sqrt(2.0 / (C + C))),
        (XavierNormal(gain=3.0), 3.0 * math.sqrt(2.0 / (C + C))),
        (KaimingNormal(), math.sqrt(2.0) / math.sqrt(C)),
        (KaimingNormal(nonlinearity="tanh"), (5.0 / 3.0) / math.sqrt(C)),
        (
            KaimingNormal(negative_slope=0.2, nonlinearity="leaky_relu"),
            math.sqrt(2.0 / 1.04) / math.sqrt(C),
        ),
    ],
    ids=["xavier", "xavier-gain3", "kaiming-relu", "kaiming-tanh", "kaiming-leaky0.2"],
)
def test_normal_family_std_on_1d(init: Initializer, expected_std: float) -> None:
    x = init(torch.empty(C, dtype=torch.float64))
    assert x.std().item() == pytest.approx(expected_std, rel=0.02)
    assert x.mean().item() == pytest.approx(0.0, abs=5 * expected_std / math.sqrt(C))


@pytest.mark.parametrize(
    ("init", "limit"),
    [
        (XavierUniform(), math.sqrt(6.0 / (C + C))),
        (XavierUniform(fan_in=2, fan_out=4), 1.0),
        (KaimingUniform(), math.sqrt(2.0) * math.sqrt(3.0 / C)),
        (KaimingUniform(fan_in=3.0, nonlinearity="linear"), 1.0),
    ],
    ids=["xavier", "xavier-given-fans", "kaiming", "kaiming-given-fan"],
)
def test_uniform_family_limit_on_1d(init: Initializer, limit: float) -> None:
    x = init(torch.empty(C, dtype=torch.float64))
    assert x.abs().max().item() <= limit
    assert x.abs().max().item() > 0.99 * limit


def test_rank2_uses_paddle_in_out_layout() -> None:
    # Paddle's Linear weight is (in, out): fan_in = shape[0] = 400, not torch's shape[1] = 3.
    x = KaimingUniform()(torch.empty(400, 3, dtype=torch.float64))
    limit = math.sqrt(2.0) * math.sqrt(3.0 / 400)
    assert 0.9 * limit < x.abs().max().item() <= limit


@pytest.mark.parametrize(
    ("name", "param", "gain"),
    [
        ("sigmoid", None, 1.0),
        ("conv2d_transpose", None, 1.0),
        ("tanh", None, 5.0 / 3.0),
        ("relu", None, math.sqrt(2.0)),
        ("selu", None, 0.75),
        ("leaky_relu", None, math.sqrt(2.0 / (1 + 0.01**2))),
        ("leaky_relu", 1.0, 1.0),
    ],
)
def test_calculate_gain(name: str, param: float | None, gain: float) -> None:
    assert calculate_gain(name, param) == pytest.approx(gain)


def test_calculate_gain_rejects_unknown() -> None:
    with pytest.raises(ValueError, match=r"expected nonlinearity to be one of .*'gelu'"):
        calculate_gain("gelu")


def test_value_semantics() -> None:
    assert Constant(1) == Constant(1.0)
    assert repr(Constant(1.0)) == "Constant(value=1.0)"
    assert XavierNormal(name="a") == XavierNormal(name="b")  # name is cosmetic, as in Paddle
    assert KaimingNormal().gain == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Constant("1"), TypeError, r"Constant: expected value to be a real number"),
        (lambda: Constant(True), TypeError, r"got bool"),
        (lambda: Constant(float("nan")), ValueError, r"expected a finite value"),
        (lambda: Normal(std=-1.0), ValueError, r"Normal: expected std >= 0"),
        (lambda: TruncatedNormal(std=0.0), ValueError, r"expected std > 0"),
        (lambda: TruncatedNormal(a=1.0, b=0.0), ValueError, r"expected a < b"),
        (lambda: Uniform(2.0, 1.0), ValueError, r"expected low <= high"),
        (lambda: XavierNormal(fan_in=0), ValueError, r"XavierNormal: expected fan_in > 0"),
        (lambda: KaimingNormal(nonlinearity="bogus"), ValueError, r"nonlinearity .*'bogus'"),
        (lambda: KaimingUniform(negative_slope="x"), TypeError, r"negative_slope"),
    ],
    ids=[
        "str-value",
        "bool-value",
        "nan-value",
        "negative-std",
        "zero-std-truncated",
        "a-not-below-b",
        "low-above-high",
        "zero-fan",
        "unknown-nonlinearity",
        "str-slope",
    ],
)
def test_constructor_validation(build: object, error: type[Exception], match: str) -> None:
    assert callable(build)
    with pytest.raises(error, match=match):
        build()


def test_call_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"Constant: expected a torch.Tensor to fill, got list"):
        Constant(1.0)([1.0, 2.0])  # type: ignore[arg-type]


def test_empty_tensor_has_no_fan() -> None:
    with pytest.raises(ValueError, match=r"KaimingNormal: cannot infer a positive fan_in"):
        KaimingNormal()(torch.empty(0))
