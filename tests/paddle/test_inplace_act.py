"""The old BatchNorm's ``in_place=True`` routes ``act`` through the core's in-place mode."""

from __future__ import annotations

import pytest
import torch

from syncbn import paddle_compat as pnn
from syncbn.paddle_compat._activations import get_activation


def _pair(act: str | None) -> tuple[pnn.BatchNorm, pnn.BatchNorm]:
    fused = pnn.BatchNorm(3, act=act, in_place=True, dtype="float64")
    plain = pnn.BatchNorm(3, act=act, dtype="float64")
    with torch.no_grad():
        for layer in (fused, plain):
            layer.weight.copy_(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    return fused, plain


def _run(layer: pnn.BatchNorm, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    leaf = x.clone().requires_grad_()
    inner = leaf * 1.0
    y = layer(inner)
    y.backward(g)
    shares = torch.tensor(float(y.data_ptr() == inner.data_ptr()))
    return [y.detach().clone(), leaf.grad, layer.weight.grad, layer.bias.grad,
            layer._mean.clone(), layer._variance.clone(), shares]


@pytest.mark.parametrize("act", [None, "leaky_relu", "elu", "relu", "tanh"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_in_place_gives_the_same_numbers(act: str | None, layout: str) -> None:
    fused, plain = _pair(act)
    if layout == "NHWC":
        fused.data_format = plain.data_format = "NHWC"
    shape = (4, 5, 2, 3) if layout == "NHWC" else (4, 3, 5, 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    got, want = _run(fused, x, g), _run(plain, x, g)
    for mine, theirs in zip(got[:-1], want[:-1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
    fusable = act in (None, "leaky_relu")  # elu saturates: applied out of place
    assert got[-1].item() == float(fusable)  # fused ones overwrite the input
    assert want[-1].item() == 0.0


def test_in_place_falls_back_where_the_input_is_needed() -> None:
    fused, plain = _pair("leaky_relu")
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)  # a leaf
    torch.testing.assert_close(fused(x), plain(x))
    assert x.grad is None


def test_one_value_globally_still_applies_the_activation_in_place() -> None:
    fused, _ = _pair("leaky_relu")
    leaf = torch.tensor([[-1.0, 0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    inner = leaf * 1.0
    y = fused(inner)
    assert y.data_ptr() == inner.data_ptr()  # fused, in place
    act = get_activation("leaky_relu")
    torch.testing.assert_close(y, act(leaf.detach()))
    y.sum().backward()
    want = torch.autograd.functional.jacobian(lambda t: act(t).sum(), leaf.detach())
    torch.testing.assert_close(leaf.grad, want)
