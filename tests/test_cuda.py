"""CUDA path: the same oracle checks on a GPU. Skipped cleanly where CUDA is absent (CI)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import harness
import syncbn
from syncbn.functional import synchronized_batch_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_core_on_cuda_equals_batchnorm(dtype: torch.dtype, channels_last: bool) -> None:
    x = torch.randn(4, 8, 6, 6, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(8, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    y = synchronized_batch_norm(x, rm, rv, w, b, eps=1e-5, decay=0.9, unbiased_var=True,
                                process_group=None, single_value="raise")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    rm2, rv2 = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    y2 = F.batch_norm(leaves[0], rm2, rv2, leaves[1], leaves[2], True, 0.1, 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, y2, **tol)
    for mine, theirs in zip((x, w, b), leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, **tol)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def _two_ranks_one_gpu(backend: str) -> dict[str, Any]:
    """Each rank holds a shard on CUDA; gloo (shared GPU) or NCCL (one GPU per rank)."""
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    group = dist.new_group([0, 1], backend=backend)
    gen = torch.Generator().manual_seed(9)
    x_all = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    rows = slice(0, 3) if rank == 0 else slice(3, 5)
    layer = syncbn.SyncBatchNorm(4, process_group=group).double().to(device)
    x = x_all[rows].to(device).requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y) * torch.arange(4, device=device).view(1, 4, 1, 1))
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "rm": layer.running_mean.cpu(),
            "x_all": x_all}


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_ranks_on_cuda(backend: str) -> None:
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank")
    results = harness.run_ranks(2, _two_ranks_one_gpu, backend)
    x_all = results[0]["x_all"].requires_grad_()
    bn = torch.nn.BatchNorm2d(4).double()
    y = bn(x_all)
    y.backward(torch.ones_like(y) * torch.arange(4).view(1, 4, 1, 1).double())
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), x_all.grad)
    for r in results:
        torch.testing.assert_close(r["rm"], bn.running_mean)


def _no_host_sync_in_a_step() -> dict[str, Any]:
    """Steady-state training steps on CUDA (gloo on CUDA tensors) with torch's sync debug
    mode set to error: any device→host read (``.item()``, ``.cpu()``, a sync copy) raises."""
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    layers = torch.nn.Sequential(*[syncbn.SyncBatchNorm(16) for _ in range(4)]).to(device)
    x = torch.randn(4, 16, 8, 8, device=device, requires_grad=True)
    params = [x, *layers.parameters()]
    dy = torch.randn(4, 16, 8, 8, device=device)
    for _ in range(3):  # the first step exchanges shifts and reads the step count once
        torch.autograd.grad(layers(x), params, dy)
    torch.cuda.synchronize()
    errors: list[str] = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            torch.autograd.grad(layers(x), params, dy)
    except RuntimeError as error:
        errors.append(str(error))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"errors": errors}


def test_a_training_step_on_cuda_reads_nothing_from_the_device() -> None:
    for result in harness.run_ranks(2, _no_host_sync_in_a_step):
        assert result["errors"] == [], result["errors"]
