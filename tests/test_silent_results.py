"""No silent wrong results in the core: garbage padding under a mask, tiny in-place slopes,
per-rank settings, eval without running statistics under a mask.

Each test names what happened before the fix (measured on round 2's core).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import harness
import syncbn

C = 3


# --- 1. NaN / inf in masked-out positions ------------------------------------------------------


def _padded(rank: int, fill: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(40 + rank)
    x = torch.randn(4, C, 9, generator=gen, dtype=torch.float64) * 2 + 5
    lengths = torch.tensor([9, 4, 6, 2]) if rank == 0 else torch.tensor([3, 9, 7, 5])
    mask = torch.arange(9) < lengths[:, None]
    g = torch.randn(4, C, 9, generator=gen, dtype=torch.float64)
    if fill is not None and rank == 0:  # garbage padding on rank 0 only
        x = torch.where(mask.unsqueeze(1), x, torch.full_like(x, fill))
    return x, mask, g


def _masked_run(fill: float | None) -> dict[str, Any]:
    rank = dist.get_rank()
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float64)
    outs = []
    for _ in range(2):
        x, mask, g = _padded(rank, fill)
        leaf = x.clone().requires_grad_()
        y = layer(leaf, mask)
        valid = mask.unsqueeze(1).expand_as(y)
        torch.where(valid, y * g, 0).sum().backward()  # the loss ignores the padding
        assert leaf.grad is not None and layer.weight.grad is not None
        outs.append({"y": y.detach()[valid], "dx": leaf.grad[valid],
                     "y_pad": y.detach()[~valid], "dx_pad": leaf.grad[~valid]})
    return {"steps": outs, "dw": layer.weight.grad.clone(), "db": layer.bias.grad.clone(),
            "mean": layer.running_mean.clone(), "var": layer.running_var.clone()}


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf"), 1e300],
                         ids=["nan", "inf", "-inf", "huge"])
def test_garbage_padding_never_reaches_valid_positions(fill: float) -> None:
    """Before: inf padding on rank 0 made every valid output on both ranks NaN (20/20,
    24/24) and running_mean NaN for good (``x·m`` with ``inf·0 = NaN``)."""
    clean = harness.run_ranks(2, _masked_run, None)
    dirty = harness.run_ranks(2, _masked_run, fill)
    for want, got in zip(clean, dirty, strict=True):
        for step_want, step_got in zip(want["steps"], got["steps"], strict=True):
            for key in ("y", "dx"):
                assert torch.isfinite(step_got[key]).all(), key
                torch.testing.assert_close(step_got[key], step_want[key], rtol=1e-12,
                                           atol=1e-12)
            # padding: normalized like the others, so non-finite only where the input is
            assert torch.isfinite(step_got["dx_pad"]).all()
        for key in ("dw", "db", "mean", "var"):
            assert torch.isfinite(got[key]).all(), key
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


# --- 3. in-place leaky_relu with a slope the dtype cannot carry ----------------------------------


@pytest.mark.parametrize(("dtype", "slope"), [(torch.float16, 1e-8), (torch.bfloat16, 1e-42),
                                              (torch.float32, 1e-45)],
                         ids=["fp16", "bf16", "fp32"])
def test_inplace_refuses_a_slope_below_the_smallest_normal(dtype: torch.dtype,
                                                           slope: float) -> None:
    """Before: accepted; x̂ could not be recovered and dx was off by 1–6 %."""
    layer = syncbn.SyncBatchNorm(C, activation="leaky_relu", activation_param=slope,
                                 inplace=True)
    x = (torch.randn(4, C, 5) + 0).to(dtype).requires_grad_()
    with pytest.raises(ValueError, match=r"leaky_relu slope .* is below the smallest normal "
                                         r".* use a slope ≥"):
        layer(x * 1)


def test_inplace_accepts_a_slope_at_the_bound() -> None:
    slope = torch.finfo(torch.float16).tiny * 2
    layer = syncbn.SyncBatchNorm(C, activation="leaky_relu", activation_param=slope,
                                 inplace=True)
    x = torch.randn(4, C, 5).half().requires_grad_()
    layer(x * 1).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- 4. eps that differs between ranks ------------------------------------------------------


def _eps_differs() -> dict[str, Any]:
    rank = dist.get_rank()
    layer = syncbn.SyncBatchNorm(C, eps=1e-5 if rank == 0 else 1e-3, timeout=10.0)
    x = torch.randn(5, C, 4)
    start = time.monotonic()
    try:
        layer(x).sum().backward()
        layer(x).sum().backward()
    except syncbn.SyncBatchNormError as error:
        return {"error": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_eps_that_differs_between_ranks_is_caught_in_default_mode() -> None:
    """Before: only debug mode caught it; the same global batch gave 1.7315 on one rank and
    1.3725 on the other, no error."""
    for outcome in harness.run_ranks(2, _eps_differs):
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert "out of step" in outcome["message"] and "eps" in outcome["message"], outcome
        assert outcome["seconds"] < 5.0, outcome


# --- 6. eval without running statistics takes the mask ----------------------------------------


def test_eval_without_running_stats_uses_the_mask() -> None:
    """Before: the mask was ignored in eval; valid outputs moved by 2.2 when only the padding
    changed."""
    layer = syncbn.SyncBatchNorm(C, track_running_stats=False, dtype=torch.float64).eval()
    x, mask, _ = _padded(0, None)
    other = torch.where(mask.unsqueeze(1), x, torch.full_like(x, 1e3))
    valid = mask.unsqueeze(1).expand_as(x)
    y1, y2 = layer(x, mask), layer(other, mask)
    torch.testing.assert_close(y1[valid], y2[valid], rtol=0, atol=1e-12)
    values = x.transpose(0, 1)[mask.unsqueeze(0).expand(C, -1, -1)].view(C, -1)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    want = (x - mean.view(1, C, 1)) / (var.view(1, C, 1) + layer.eps).sqrt()
    torch.testing.assert_close(y1[valid], want[valid], rtol=1e-12, atol=1e-12)


# --- 10. debug mode on one rank only ------------------------------------------------------


def _debug_on_one_rank() -> dict[str, Any]:
    group = dist.new_group([0, 1])  # a fresh group: its first collective is the mode check
    layer = syncbn.SyncBatchNorm(C, process_group=group, timeout=10.0,
                                 debug=dist.get_rank() == 0)
    start = time.monotonic()
    try:
        layer(torch.randn(4, C, 3)).sum().backward()
    except syncbn.SyncBatchNormError as error:
        return {"error": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_debug_mode_on_one_rank_is_an_error_on_every_rank_at_once() -> None:
    """Before: an all_gather (the debug rank) paired with an all_reduce; both ranks waited
    the whole timeout and the message blamed skipped layers."""
    for outcome in harness.run_ranks(2, _debug_on_one_rank):
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert "debug mode is on for 1 of 2 ranks" in outcome["message"], outcome
        assert "SYNCBN_DEBUG" in outcome["message"], outcome
        assert outcome["seconds"] < 5.0, outcome
