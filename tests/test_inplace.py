"""The in-place activated mode: same results as BatchNorm + activation, half the memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import harness
import syncbn

ACTS = [("identity", None, True), ("leaky_relu", 0.1, True), ("leaky_relu", 0.01, True),
        ("identity", None, False), ("leaky_relu", 0.1, False), ("elu", 1.0, False),
        ("elu", 0.5, False)]


def _reference(act: str, param: float | None) -> nn.Module:
    return {"identity": nn.Identity(), "leaky_relu": nn.LeakyReLU(param or 0.01),
            "elu": nn.ELU(param or 1.0), "relu": nn.ReLU()}[act]


def _pair(act: str, param: float | None, inplace: bool,
          channels: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # negative scales are fine, zero is not
        bn.weight[bn.weight.abs() < 0.1] = 0.5
        bn.bias.normal_()
    layer = syncbn.SyncBatchNorm(channels, activation=act, activation_param=param,
                                 inplace=inplace).double()
    layer.load_state_dict(bn.state_dict())
    return layer, nn.Sequential(bn, _reference(act, param))


def _through(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaf = x.clone().requires_grad_()
    inner = leaf * 1.0  # the layer may overwrite its input: give it a non-leaf
    y = module(inner)
    y.backward(g)
    return (y.detach().clone(), leaf.grad, *(p.grad for p in module.parameters()))


@pytest.mark.parametrize(("act", "param", "inplace"), ACTS,
                         ids=[f"{a}-{p}-{'inplace' if i else 'out-of-place'}" for a, p, i in ACTS])
def test_equals_batchnorm_then_activation(act: str, param: float | None, inplace: bool) -> None:
    layer, reference = _pair(act, param, inplace)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
        g = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
        for mine, theirs in zip(_through(layer, x, g), _through(reference, x, g), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
        layer.zero_grad()
        reference.zero_grad()
    torch.testing.assert_close(layer.running_mean, reference[0].running_mean)
    torch.testing.assert_close(layer.running_var, reference[0].running_var)


def test_inplace_overwrites_the_input_and_keeps_channels_last() -> None:
    layer, reference = _pair("leaky_relu", 0.2, True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    inner = x.clone().requires_grad_() * 1.0
    y = layer(inner)
    assert y.data_ptr() == inner.data_ptr()
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference(x))


def test_eval_inplace_without_grad_overwrites_the_input() -> None:
    layer, reference = _pair("leaky_relu", 0.05, True)
    layer(torch.randn(8, 3, 2, 2, dtype=torch.float64) * 1.0)
    reference(torch.randn(8, 3, 2, 2, dtype=torch.float64))
    layer.eval()
    reference.eval()
    reference[0].load_state_dict({k: v for k, v in layer.state_dict().items()})
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = reference(x)
    with torch.no_grad():
        y = layer(x)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, want)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize(("act", "param"), [("leaky_relu", 0.01), ("leaky_relu", 0.2)])
def test_inplace_saves_at_most_055_of_batchnorm_plus_activation(act: str,
                                                                param: float | None) -> None:
    layer, reference = _pair(act, param, True, channels=16)
    layer.float()
    reference.float()
    x = torch.randn(8, 16, 32, 32)
    inplace = _saved_bytes(layer, x.clone().requires_grad_() * 1.0)
    separate = _saved_bytes(reference, x.clone().requires_grad_() * 1.0)
    assert inplace <= 0.55 * separate, (inplace, separate)
    assert inplace <= x.numel() * 4 + 64 * 16  # the output plus O(C)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: syncbn.SyncBatchNorm(3, activation="relu", inplace=True),
         r"inplace=True needs an invertible activation, got 'relu'"),
        (lambda: syncbn.SyncBatchNorm(3, activation="leaky_relu", activation_param=0.0,
                                      inplace=True),
         r"invertible activation, got 'leaky_relu' \(param 0\)"),
        (lambda: syncbn.SyncBatchNorm(3, activation="elu", inplace=True),
         r"invertible activation, got 'elu'.*saturates"),
        (lambda: syncbn.SyncBatchNorm(3, activation="gelu"),
         r"activation to be one of identity, relu, leaky_relu, elu, got 'gelu'"),
        (lambda: syncbn.SyncBatchNorm(3, inplace=True)(torch.randn(4, 3, requires_grad=True)),
         r"leaf tensor that requires grad"),
        (lambda: syncbn.SyncBatchNorm(3, inplace=True)(
            torch.sigmoid(torch.randn(4, 3, requires_grad=True))),
         r"autograd still needs it \(saved by SigmoidBackward0"),
    ],
    ids=["relu", "zero-slope", "elu", "unknown", "leaf", "saved-by-sigmoid"],
)
def test_inplace_errors(make: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_inplace_refuses_zero_weight() -> None:
    layer = syncbn.SyncBatchNorm(3, inplace=True)
    with torch.no_grad():
        layer.weight[1] = 0.0
    with pytest.raises(ValueError, match=r"channel 1 has weight 0, so x̂ is lost"):
        layer(torch.randn(4, 3, requires_grad=True) * 1.0)


def test_relu_out_of_place_matches() -> None:
    layer, reference = _pair("relu", None, False)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    for mine, theirs in zip(_through(layer, x, g), _through(reference, x, g), strict=True):
        torch.testing.assert_close(mine, theirs)


# --- synchronized: 2 ranks with an empty one against the global-batch oracle ---------------

SIZES = (3, 0, 2)


def _global(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(40 + step)
    x = torch.randn(sum(SIZES), 3, 4, 2, generator=gen, dtype=torch.float64) * 2 - 1
    return x, torch.randn(sum(SIZES), 3, 4, 2, generator=gen, dtype=torch.float64)


def _rank_inplace(act: str, param: float) -> dict[str, Any]:
    rank = dist.get_rank()
    rows = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    layer, _ = _pair(act, param, True)
    out: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for step in range(2):
        x, g = _global(step)
        leaf = x[rows].clone().requires_grad_()
        y = layer(leaf * 1.0)
        y.backward(g[rows])
        out["y"].append(y.detach().clone())
        out["dx"].append(leaf.grad)
        out["dw"].append(layer.weight.grad.clone())
        out["db"].append(layer.bias.grad.clone())
        layer.zero_grad()
    out["running_var"] = layer.running_var.clone()
    return out


def test_inplace_synchronized_matches_global_batch() -> None:
    results = harness.run_ranks(3, _rank_inplace, "leaky_relu", 0.1)
    _, reference = _pair("leaky_relu", 0.1, True)
    for step in range(2):
        x, g = _global(step)
        leaf = x.clone().requires_grad_()
        y = reference(leaf)
        y.backward(g)
        torch.testing.assert_close(torch.cat([r["y"][step] for r in results]), y.detach())
        torch.testing.assert_close(torch.cat([r["dx"][step] for r in results]), leaf.grad)
        torch.testing.assert_close(sum(r["dw"][step] for r in results), reference[0].weight.grad)
        torch.testing.assert_close(sum(r["db"][step] for r in results), reference[0].bias.grad)
        reference.zero_grad()
    for r in results:
        torch.testing.assert_close(r["running_var"], reference[0].running_var)
