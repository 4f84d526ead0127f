"""Single-process behaviour of SyncBatchNorm and sync_batch_norm: fallback, dtypes, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn.functional import local_fallback_applies, sync_batch_norm, synchronized_batch_norm


def _core(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The synchronized core with no group: the same code path, local statistics."""
    args = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "eps": 1e-5,
            "decay": 0.9, "unbiased_var": True, "process_group": None, "single_value": "raise"}
    args.update(kwargs)
    rm, rv, w, b = (args.pop(k) for k in ("running_mean", "running_var", "weight", "bias"))
    return synchronized_batch_norm(x, rm, rv, w, b, **args)


@pytest.fixture
def no_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective was called")

    monkeypatch.setattr(dist, "all_reduce", refuse)


# --- the named fallback ----------------------------------------------------------------------


def _train_pair(module: nn.Module, reference: nn.Module, shape: tuple[int, ...]) -> None:
    reference.load_state_dict(module.state_dict())
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = module(x), reference(x_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(y, y_ref)
        assert torch.equal(x.grad, x_ref.grad)
    for name, value in reference.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_it_is_exactly_batchnorm(no_collectives: None,
                                                       momentum: float | None) -> None:
    assert local_fallback_applies(None)
    _train_pair(syncbn.SyncBatchNorm(3, momentum=momentum).double(),
                nn.BatchNorm2d(3, momentum=momentum).double(), (4, 3, 5, 5))


def test_group_of_one_rank_is_exactly_batchnorm(world_of_one: None) -> None:
    assert local_fallback_applies(dist.group.WORLD)
    _train_pair(syncbn.SyncBatchNorm(3).double(), nn.BatchNorm1d(3).double(), (6, 3))


def test_eval_uses_running_stats_without_communication(no_collectives: None) -> None:
    module = syncbn.SyncBatchNorm(3)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        module.running_var.copy_(torch.tensor([4.0, 5.0, 6.0]))
    module.eval()
    x = torch.randn(2, 3, 4)
    want = F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias,
                        False, 0.0, module.eps)
    assert torch.equal(module(x), want)


def test_eval_without_running_stats_uses_the_batch(no_collectives: None) -> None:
    module = syncbn.SyncBatchNorm(3, track_running_stats=False).eval()
    x = torch.randn(5, 3, 2)
    assert module.running_mean is None
    torch.testing.assert_close(module(x), F.batch_norm(x, None, None, module.weight, module.bias,
                                                       True, 0.0, module.eps))


# --- the core on one rank: same math as torch -----------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)],
                         ids=["2d", "3d", "4d", "5d"])
def test_core_equals_batchnorm(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = _core(x, running_mean=rm, running_var=rv, weight=w, bias=b)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    rm2, rv2 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y2 = F.batch_norm(leaves[0], rm2, rv2, leaves[1], leaves[2], True, 0.1, 1e-5)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y.backward(g)
    y2.backward(g)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, y2, **tol)
    for mine, theirs in zip((x, w, b), leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, **tol)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)


def test_core_gradcheck_with_undefined_grads() -> None:
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _core(t[0], weight=t[1], bias=t[2]), (x, w, b),
                                    check_undefined_grad=True)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_core_keeps_memory_format(fmt: torch.memory_format) -> None:
    shape = (2, 3, 4, 5) if fmt == torch.channels_last else (2, 3, 2, 4, 5)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    y = _core(x, weight=torch.ones(3), bias=torch.zeros(3))
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=fmt)
    assert x.grad is not None and x.grad.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, F.batch_norm(x.detach(), None, None, None, None, True, 0.1, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_statistics_in_float32(dtype: torch.dtype) -> None:
    x32 = torch.randn(8, 3, 6, 6) * 3 + 2
    rm, rv = torch.zeros(3), torch.ones(3)
    y = _core(x32.to(dtype), running_mean=rm, running_var=rv, weight=torch.ones(3),
              bias=torch.zeros(3))
    rm32, rv32 = torch.zeros(3), torch.ones(3)
    y32 = F.batch_norm(x32.to(dtype).float(), rm32, rv32, None, None, True, 0.1, 1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(rm, rm32, rtol=1e-5, atol=1e-6)  # float32 statistics
    torch.testing.assert_close(rv, rv32, rtol=1e-5, atol=1e-6)


def test_half_module_and_many_values_per_channel() -> None:
    """A module converted with .half(): buffers half, counts never 16-bit (> 65504 values)."""
    module = syncbn.SyncBatchNorm(1, momentum=1.0).half()
    x = torch.full((70_000, 1, 1), 1.0, dtype=torch.float16)
    x[1::2] = 3.0
    y = _core(x, running_mean=module.running_mean, running_var=module.running_var,
              weight=module.weight, bias=module.bias, decay=0.0)
    assert module.running_mean.item() == 2.0
    assert module.running_var.item() == pytest.approx(70_000 / 69_999, rel=1e-3)
    torch.testing.assert_close(y[:2].flatten().float(), torch.tensor([-1.0, 1.0]), rtol=1e-3,
                               atol=1e-3)


def test_empty_input_gives_empty_output_and_untouched_stats() -> None:
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = _core(x, running_mean=rm, running_var=rv, weight=torch.ones(3, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, 3, 4)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert x.grad is not None and x.grad.shape == (0, 3, 4)


def test_one_value_per_channel_policies() -> None:
    x = torch.randn(1, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, "
                                         r"got input size 1$"):
        _core(x)
    rm = torch.zeros(3)
    y = _core(x, running_mean=rm, single_value="identity")
    assert torch.equal(y, x) and torch.equal(rm, torch.zeros(3))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(1, 3))


def test_module_one_value_per_channel_is_torch_error() -> None:
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        syncbn.SyncBatchNorm(3)(torch.randn(1, 3))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: syncbn.SyncBatchNorm(3)(torch.randn(4)), ValueError,
         r"^expected at least 2D input \(got 1D input\)$"),
        (lambda: syncbn.SyncBatchNorm(3)(torch.randn(2, 3, 1, 1, 1, 1)), ValueError,
         r"expected at most 5D input \(got 6D input\).*flatten"),
        (lambda: syncbn.SyncBatchNorm(3)(torch.randn(2, 0, 4)), ValueError,
         r"^SyncBatchNorm number of input channels should be non-zero$"),
        (lambda: syncbn.SyncBatchNorm(3)(torch.randn(2, 4, 5)), ValueError,
         r"expected input with 3 channels at dim 1, got 4 \(input shape \(2, 4, 5\)\)"
         r".*num_features=4"),
        (lambda: syncbn.SyncBatchNorm(3)([[1.0, 2.0, 3.0]]), TypeError,
         r"expected input to be a torch.Tensor, got list"),
        (lambda: syncbn.SyncBatchNorm(3, process_group="world"), TypeError,
         r"process_group to be a torch.distributed.ProcessGroup or None, got str"),
        (lambda: syncbn.SyncBatchNorm(0), ValueError, r"num_features > 0, got 0"),
        (lambda: syncbn.SyncBatchNorm(2.5), TypeError, r"num_features to be an int"),
        (lambda: syncbn.SyncBatchNorm(3, momentum=1.5), ValueError, r"momentum in \[0, 1\]"),
        (lambda: syncbn.SyncBatchNorm(3, eps=-1.0), ValueError, r"eps >= 0, got -1.0"),
        (lambda: sync_batch_norm(torch.randn(2, 3), torch.zeros(4), torch.ones(3), training=True),
         ValueError, r"running_mean should contain 3 elements not 4"),
        (lambda: sync_batch_norm(torch.randn(2, 3), None, None), ValueError,
         r"training=False normalizes with the running statistics.*pass both buffers"),
        (lambda: sync_batch_norm(torch.ones(2, 3, dtype=torch.int64), None, None, training=True),
         TypeError, r"floating-point input.*got torch.int64"),
        (lambda: sync_batch_norm(torch.randn(2, 3), None, None, training=True, momentum=None),
         TypeError, r"momentum to be a float in \[0, 1\]"),
        (lambda: sync_batch_norm(torch.randn(2, 3), None, None, training=True,
                                 process_group=object()),
         TypeError, r"got object"),
    ],
    ids=["1d", "6d", "zero-channels", "wrong-channels", "not-a-tensor", "group-type",
         "zero-features", "float-features", "momentum-range", "negative-eps", "buffer-size",
         "eval-without-buffers", "integer-input", "functional-momentum-none", "unknown-group"],
)
def test_error_messages(make: Any, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        make()


def test_group_without_initialized_default_is_an_error(world_of_one: None) -> None:
    group = dist.new_group([0])
    module = syncbn.SyncBatchNorm(3, process_group=group)
    dist.destroy_process_group()
    with pytest.raises(ValueError, match=r"default process group is not initialized"):
        module(torch.randn(4, 3))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


# --- the module is a drop-in --------------------------------------------------------------


def test_module_is_a_batchnorm_with_torch_state() -> None:
    module = syncbn.SyncBatchNorm(4)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    assert list(module.state_dict()) == list(nn.SyncBatchNorm(4).state_dict())
    assert "SyncBatchNorm(4, eps=1e-05, momentum=0.1" in repr(module)
    assert module.layer_name == "SyncBatchNorm(4)"


def test_device_and_dtype_arguments() -> None:
    module = syncbn.SyncBatchNorm(2, device="cpu", dtype=torch.float64)
    assert module.weight.dtype == torch.float64 and module.running_var.dtype == torch.float64


# --- review fixes ----------------------------------------------------------------------------


def test_convert_keeps_a_torch_syncbn_group(world_of_one: None) -> None:
    group = dist.new_group([0])
    layer = syncbn.convert_sync_batchnorm(nn.SyncBatchNorm(4, process_group=group))
    assert layer.process_group is group
    other = dist.new_group([0])
    assert syncbn.convert_sync_batchnorm(nn.SyncBatchNorm(4, process_group=group),
                                         other).process_group is other


def test_revert_refuses_a_fused_activation() -> None:
    with pytest.raises(ValueError, match=r"cannot express SyncBatchNorm\(3\)'s fused "
                                         r"activation='relu'.*activation='identity'"):
        syncbn.revert_sync_batchnorm(nn.Sequential(syncbn.SyncBatchNorm(3, activation="relu")))


def test_eval_inplace_with_grad_enabled_stays_differentiable() -> None:
    layer = syncbn.SyncBatchNorm(3, activation="leaky_relu", inplace=True).eval()
    reference = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.01)).eval()
    x = torch.randn(4, 3, 5, 5)
    y = layer(x.clone())  # grad mode on, weight requires grad: not overwritten in place
    torch.testing.assert_close(y, reference(x))
    y.sum().backward()
    assert layer.weight.grad is not None


def test_mixed_dtypes_are_refused_on_every_path() -> None:
    layer = syncbn.SyncBatchNorm(3)
    with pytest.raises(TypeError, match=r"torch.float64 input for a layer whose parameters and "
                                        r"buffers are torch.float32.*input.to\(torch.float32\)"):
        layer(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"torch.float64 input"):
        sync_batch_norm(torch.randn(4, 3, dtype=torch.float64), torch.zeros(3), torch.ones(3),
                        training=True)
    assert layer(torch.randn(4, 3).to(torch.bfloat16)).dtype == torch.bfloat16  # 16-bit is fine


def test_name_keyword_and_timeout_validation() -> None:
    assert syncbn.SyncBatchNorm(3, name="head.bn").layer_name == "head.bn"
    with pytest.raises(TypeError, match=r"timeout to be a number of seconds"):
        syncbn.SyncBatchNorm(3, timeout=True)
    with pytest.raises(ValueError, match=r"0\.001 <= timeout <= 1e\+07 seconds, got 0;"):
        syncbn.SyncBatchNorm(3, timeout=0)


def test_refused_inplace_forward_counts_nothing() -> None:
    layer = syncbn.SyncBatchNorm(3, activation="leaky_relu", inplace=True)
    with pytest.raises(ValueError, match=r"leaf tensor that requires grad"):
        layer(torch.randn(4, 3, requires_grad=True))
    assert layer.num_batches_tracked.item() == 0
    assert layer._syncbn_calls == 0
