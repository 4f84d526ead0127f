"""FSDP2 (``fully_shard``) on a CPU device mesh of 2 (gloo) with syncbn layers.

- float32 and float64: 2 sharded ranks equal one process on the global batch;
- ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``: the weight and bias that reach
  the layer are bf16, its running buffers stay float32 (FSDP2 does not cast buffers).
  Plain BatchNorm rejects that mix; syncbn's layer computes its statistics in float32
  and updates the float32 buffers.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.distributed as dist
import trainer_helpers as th
from torch import Tensor, nn

import harness
import syncbn

fsdp = pytest.importorskip(
    "torch.distributed.fsdp", reason="needs torch.distributed.fsdp (torch >= 2.6)")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2); "
                "it needs torch >= 2.6", allow_module_level=True)

EPOCHS = 2
BF16_MISMATCH = (r"Expected running_mean to have type BFloat16"  # CUDA's message
                 r"|expected scalar type BFloat16 but found Float")  # CPU's


def _full_state(net: nn.Module) -> dict[str, Tensor]:
    from torch.distributed.tensor import DTensor

    return {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for key, value in net.state_dict().items()}


def _shard(net: nn.Module, **policy: Any) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs = {"mp_policy": fsdp.MixedPrecisionPolicy(**policy)} if policy else {}
    fsdp.fully_shard(net, mesh=mesh, **kwargs)
    return net


def _train_sharded(dtype: torch.dtype) -> dict[str, Tensor]:
    """One rank: syncbn net under fully_shard, SGD on this rank's DistributedSampler shard."""
    torch.set_num_threads(1)
    net = _shard(syncbn.convert_sync_batchnorm(th.build_net(dtype)))
    optimizer = torch.optim.SGD(net.parameters(), lr=th.LR)
    data = th.dataset(dtype)
    shard = list(th.rank_sampler(data, dist.get_rank()))
    for _ in range(EPOCHS):
        for start in range(0, len(shard), th.PER_RANK):
            images, labels = data[shard[start:start + th.PER_RANK]]
            optimizer.zero_grad()
            th.loss_of(net, images, labels).backward()
            optimizer.step()
    return _full_state(net)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)],
                         ids=["float32", "float64"])
def test_fully_shard_matches_one_process_on_the_global_batch(
    dtype: torch.dtype, tolerance: float
) -> None:
    data = th.dataset(dtype)
    reference = th.train_reference(th.build_net(dtype), data, th.global_batches(data, EPOCHS))
    untrained = th.build_net(dtype).state_dict()
    states = harness.run_ranks(th.WORLD_SIZE, _train_sharded, dtype, timeout=90)
    for rank, state in enumerate(states):
        th.assert_same_state(state, reference.state_dict(), atol=tolerance, rtol=tolerance,
                             label=f"rank {rank}")
        assert not torch.equal(state["0.weight"], untrained["0.weight"])


def _bf16_net() -> nn.Sequential:
    torch.manual_seed(th.SEED)  # BatchNorm first, so its input is the bf16 cast of the batch
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3))


def _bf16_step(convert: bool) -> dict[str, Any]:
    """One bf16-policy training step on this rank's shard; what the BatchNorm layer saw."""
    torch.set_num_threads(1)
    net = _bf16_net()
    if convert:
        net = syncbn.convert_sync_batchnorm(net)
    _shard(net, param_dtype=torch.bfloat16)
    seen: dict[str, Any] = {}

    def record(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.update(input=args[0].dtype, weight=layer.weight.dtype, bias=layer.bias.dtype,
                    running_mean=layer.running_mean.dtype)

    net[0].register_forward_pre_hook(record)
    data = th.dataset()
    images, labels = data[list(th.rank_sampler(data, dist.get_rank()))[:th.PER_RANK]]
    try:
        loss = th.loss_of(net, images, labels)
    except RuntimeError as error:
        return {"seen": seen, "error": str(error)}
    loss.backward()
    grads_finite = all(bool(p.grad.full_tensor().isfinite().all()) for p in net.parameters())
    torch.optim.SGD(net.parameters(), lr=th.LR).step()
    return {"seen": seen, "error": None, "grads_finite": grads_finite,
            "param_dtypes": sorted({str(p.dtype) for p in net.parameters()}),
            "running_mean": net[0].running_mean.clone(), "running_var": net[0].running_var.clone()}


@pytest.mark.slow
def test_bf16_params_with_float32_buffers_plain_batchnorm_fails_syncbn_works() -> None:
    plain, synced = (harness.run_ranks(th.WORLD_SIZE, _bf16_step, convert, timeout=90)
                     for convert in (False, True))
    mixed = {"input": torch.bfloat16, "weight": torch.bfloat16, "bias": torch.bfloat16,
             "running_mean": torch.float32}
    for result in plain:  # the failure FSDP2 users meet with torch's BatchNorm
        assert result["seen"] == mixed
        assert result["error"] is not None
        assert re.search(BF16_MISMATCH, result["error"]), result["error"]

    data = th.dataset()
    first_step = [i for rank in range(th.WORLD_SIZE)
                  for i in list(th.rank_sampler(data, rank))[:th.PER_RANK]]
    batch = data[first_step][0].to(torch.bfloat16).double()  # what the layer got, exactly
    mean = batch.mean(dim=(0, 2, 3))
    var = batch.var(dim=(0, 2, 3), unbiased=True)
    for result in synced:
        assert result["seen"] == mixed and result["error"] is None
        assert result["grads_finite"] and result["param_dtypes"] == ["torch.float32"]
        # statistics of the global bf16 batch accumulated in float32: a bf16 mean near 2
        # would be off by up to 2**-7 ≈ 8e-3 (8e-4 after momentum 0.1)
        assert result["running_mean"].dtype == torch.float32
        torch.testing.assert_close(result["running_mean"].double(), 0.1 * mean,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(result["running_var"].double(), 0.9 + 0.1 * var,
                                   atol=1e-6, rtol=0)
