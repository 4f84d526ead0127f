"""The formulas in _stats.py's docstrings, checked numerically against one-line definitions."""

from __future__ import annotations

import pytest
import torch

import harness
from syncbn import _stats, _step


def _shards(sizes: list[int], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, generator=gen, dtype=torch.float64).mul(2).add(5).to(dtype)
            for n in sizes]


def _merges(shards: list[torch.Tensor]) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """``(N, μ, σ²)`` of the shards' summed packing, by each of the core's merges."""
    packed = sum(_stats.pack_local_moments(_stats.local_moments(s)) for s in shards)
    assert isinstance(packed, torch.Tensor)
    return harness.core_merges(packed)


@pytest.mark.parametrize("sizes", [[5], [3, 0, 4], [1, 1], [0, 7, 2, 2]])
def test_merge_equals_moments_of_concatenation(sizes: list[int]) -> None:
    shards = _shards(sizes)
    var, mean = torch.var_mean(torch.cat(shards), dim=[0, 2], unbiased=False)
    for count, merged_mean, merged_var in _merges(shards):
        assert count == sum(sizes) * 4
        torch.testing.assert_close(merged_mean, mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(merged_var, var, rtol=1e-12, atol=1e-13)


def test_sum_of_squares_identity_holds_for_any_centre() -> None:
    """Σx² = m2(c) + c·(2·Σx − count·c) for a centre that is not the mean."""
    x = _shards([6])[0]
    total = x.sum([0, 2])
    for centre in (total / 24 + 0.37, torch.zeros(3), torch.full((3,), -4.0)):
        m2 = (x - centre.view(1, 3, 1)).square().sum([0, 2])
        packed = _stats.pack_local_moments(_stats.LocalMoments(24, total, centre, m2))
        torch.testing.assert_close(packed[3:6], x.square().sum([0, 2]), rtol=1e-13, atol=0.0)


def test_empty_group_gives_zeros_not_nan() -> None:
    for count, mean, var in _merges(_shards([0, 0])):
        assert count == 0
        assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(var, torch.zeros(3, dtype=torch.float64))


def test_float32_large_offset_keeps_variance() -> None:
    """mean 1e4, std 1 in float32 over two shards: relative error of σ² below 1e-3."""
    gen = torch.Generator().manual_seed(2)
    exact64 = torch.randn(2, 5000, 2, generator=gen, dtype=torch.float64) + 1e4
    x = exact64.float()
    exact = x.double().reshape(-1, 2).var(0, unbiased=False)
    for _, _, var in _merges([x[0], x[1]]):  # float32 local sums; 1e-3 needed
        assert ((var - exact) / exact).abs().max() < 1e-5
    naive = x.reshape(-1, 2).pow(2).mean(0) - x.reshape(-1, 2).mean(0).pow(2)
    assert ((naive.double() - exact) / exact).abs().max() > 1e-3  # what the formula avoids


def test_local_moments_of_half_input_accumulate_in_float32() -> None:
    x = torch.full((70_000, 1), 2.0, dtype=torch.float16)  # > 65504 values per channel
    x[::2] = 4.0
    moments = _stats.local_moments(x)
    assert moments.total.dtype == torch.float32
    assert moments.count == 70_000
    assert moments.total.item() == 210_000.0
    for _, mean, var in harness.core_merges(_stats.pack_local_moments(moments)):
        assert mean.item() == pytest.approx(3.0, rel=1e-15)
        assert var.item() == pytest.approx(1.0, rel=1e-6)


def _updated(kind: str, unbiased: bool, total: float, decay: float = 0.75,
             cumulative_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running buffers [0.5, −1] and [2, 3] after one update by the core's torch path or its
    host path, with the global mean [1, 2], biased variance [4, 9] and count ``total``."""
    mean, var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 3.0])
    batch_mean = torch.tensor([1.0, 2.0], dtype=torch.float64)
    biased = torch.tensor([4.0, 9.0], dtype=torch.float64)
    factor = total / (total - 1.0) if unbiased and total > 1 else 1.0
    tracked = None if cumulative_count is None else torch.tensor(cumulative_count)
    if kind == "host":
        merged = _step.HostMerged(torch.empty(5, 2), batch_mean.numpy(), biased.numpy(),
                                  (biased * factor).numpy(), total, float(total > 1))
        _step.update_on_host(mean, var, merged, decay,
                             None if cumulative_count is None else float(cumulative_count))
    else:
        update = float(total > 1)
        _step.update_running_(mean, var, _step.Merged(batch_mean.float(), torch.empty(2, 2),
                              (biased * factor).float(), total, update), decay, tracked,
                              torch.float32)
    return mean, var


@pytest.mark.parametrize("kind", ["torch", "host"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_update_formula(kind: str, unbiased: bool) -> None:
    mean, var = _updated(kind, unbiased, 10.0)
    factor = 10 / 9 if unbiased else 1.0
    torch.testing.assert_close(mean, torch.tensor([0.75 * 0.5 + 0.25 * 1.0, 0.75 * -1.0 + 0.5]))
    torch.testing.assert_close(var, torch.tensor([0.75 * 2 + 0.25 * 4 * factor,
                                                  0.75 * 3 + 0.25 * 9 * factor]))
    cumulative_mean, _ = _updated(kind, unbiased, 10.0, cumulative_count=4)  # weight 1/4
    torch.testing.assert_close(cumulative_mean, mean)


@pytest.mark.parametrize("kind", ["torch", "host"])
def test_running_update_skips_empty_global_batch(kind: str) -> None:
    for total in (0.0, 1.0):
        mean, var = _updated(kind, True, total)
        assert torch.equal(mean, torch.tensor([0.5, -1.0]))
        assert torch.equal(var, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("affine", [True, False])
def test_input_grad_coefficients_match_autograd(affine: bool) -> None:
    """dx = a·dy + b·x + c equals autograd through y = w·(x − μ)/√(σ² + eps) + β."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64)
    weight = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    var, mean = torch.var_mean(x, dim=[0, 2], unbiased=False)
    y = (x - mean.view(1, 3, 1)) / (var.view(1, 3, 1) + 1e-5).sqrt()
    if weight is not None:
        y = y * weight.view(1, 3, 1)
    (dx_autograd,) = torch.autograd.grad(y, x, dy)

    inv = _stats.invstd(var.detach(), 1e-5)
    xhat = (x.detach() - mean.detach().view(1, 3, 1)) * inv.view(1, 3, 1)
    sums = _stats.GradSums(dy.sum([0, 2]), (dy * xhat).sum([0, 2]))
    count = torch.tensor([35.0], dtype=torch.float64)
    a, b, c = _stats.input_grad_coefficients(sums, count, mean.detach(), inv, weight)
    dx = a.view(1, 3, 1) * dy + b.view(1, 3, 1) * x.detach() + c.view(1, 3, 1)
    torch.testing.assert_close(dx, dx_autograd, rtol=1e-11, atol=1e-12)


def test_acc_dtype_and_count() -> None:
    assert _stats.acc_dtype(torch.float16) is torch.float32
    assert _stats.acc_dtype(torch.bfloat16) is torch.float32
    assert _stats.acc_dtype(torch.float64) is torch.float64
    assert _stats.local_count(torch.Size([4, 3, 5, 6])) == 120
    assert _stats.local_count(torch.Size([0, 3])) == 0


@pytest.mark.parametrize("affine", [True, False])
def test_input_grad_coefficients_from_output_match_autograd(affine: bool) -> None:
    """dx = a·dz + b·z + c with z = w·x̂ + β equals autograd (the in-place mode's formula)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64).requires_grad_()
    dz = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    weight = torch.tensor([0.7, -1.3], dtype=torch.float64) if affine else None
    bias = torch.tensor([0.2, -0.4], dtype=torch.float64) if affine else None
    var, mean = torch.var_mean(x, dim=[0, 2], unbiased=False)
    xhat = (x - mean.view(1, 2, 1)) / (var.view(1, 2, 1) + 1e-5).sqrt()
    z = xhat if weight is None else xhat * weight.view(1, 2, 1) + bias.view(1, 2, 1)
    (dx_autograd,) = torch.autograd.grad(z, x, dz)

    inv = _stats.invstd(var.detach(), 1e-5)
    sums = _stats.GradSums(dz.sum([0, 2]), (dz * xhat.detach()).sum([0, 2]))
    count = torch.tensor([24.0], dtype=torch.float64)
    a, b, c = _stats.input_grad_coefficients_from_output(sums, count, inv, weight, bias)
    dx = a.view(1, 2, 1) * dz + b.view(1, 2, 1) * z.detach() + c.view(1, 2, 1)
    torch.testing.assert_close(dx, dx_autograd, rtol=1e-11, atol=1e-12)


def test_channels_last_takes_torch_kernel_and_agrees() -> None:
    x = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1e4).float()
    x = x.contiguous(memory_format=torch.channels_last)
    assert _stats.torch_stats_kernel_applies(x)
    assert not _stats.torch_stats_kernel_applies(x.contiguous())
    assert not _stats.torch_stats_kernel_applies(x.view(4, 3, 30))
    assert _stats.torch_stats_kernel_applies(x.contiguous().to(torch.bfloat16))
    var, mean = torch.var_mean(x.double(), dim=[0, 2, 3], unbiased=False)
    for _, merged_mean, merged_var in harness.core_merges(
            _stats.pack_local_moments(_stats.local_moments(x))):
        torch.testing.assert_close(merged_mean, mean, rtol=1e-6, atol=0.0)
        assert ((merged_var - var) / var).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_statistics_from_torch_kernel_are_float32(dtype: torch.dtype) -> None:
    x = (torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 10).to(dtype)
    moments = _stats.local_moments(x)
    assert moments.centre.dtype == torch.float32 and moments.m2.dtype == torch.float32
    var, mean = torch.var_mean(x.double(), dim=[0, 2, 3], unbiased=False)
    torch.testing.assert_close(moments.centre.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments.m2.double() / 120, var, rtol=1e-5, atol=1e-6)
