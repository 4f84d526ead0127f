"""Bad values on real gloo groups: correct, and identical on every rank.

The oracle is plain ``torch.nn.BatchNorm`` (or ``F.batch_norm``) on the
concatenated global batch, in float64 unless said otherwise. Figures that
compare with torch's own BatchNorm are recorded with ``record_property`` and
reported in docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import harness
import syncbn

NAN, INF = float("nan"), float("inf")


def _rows(sizes: tuple[int, ...]) -> slice:
    """This rank's rows of a global batch split by ``sizes``."""
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _bn_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _init(module: nn.Module, channels: int) -> None:
    """Non-default parameters and buffers, the same on every rank and in the oracle."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(channels, generator=gen))
        module.running_mean.copy_(torch.randn(channels, generator=gen))
        module.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)


def _layout(x: Tensor, channels_last: bool) -> Tensor:
    if not channels_last:
        return x
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {name: getattr(module, name).detach().clone()
            for name in ("running_mean", "running_var", "num_batches_tracked")}


def _step(module: nn.Module, x: Tensor, dy: Tensor) -> dict[str, Tensor]:
    """One training forward + backward; the output and every gradient."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dweight": module.weight.grad.clone(),
            "dbias": module.bias.grad.clone()}


def _assert_steps_match(got_by_rank: list[list[dict[str, Tensor]]],
                        want: list[dict[str, Tensor]], **tol: Any) -> None:
    """Outputs and input grads concatenate to the oracle's; weight/bias grads sum to it."""
    for step, expect in enumerate(want):
        got = [rank_steps[step] for rank_steps in got_by_rank]
        for name in ("y", "dx"):
            torch.testing.assert_close(torch.cat([g[name] for g in got]).double(),
                                       expect[name].double(), **tol,
                                       msg=lambda m, n=name, s=step: f"{n}, step {s}: {m}")
        for name in ("dweight", "dbias"):
            total = torch.stack([g[name].double() for g in got]).sum(0)
            torch.testing.assert_close(total, expect[name].double(), **tol,
                                       msg=lambda m, n=name, s=step: f"{n}, step {s}: {m}")


def _assert_identical_on_every_rank(states: list[dict[str, Tensor]]) -> None:
    """Bitwise, NaN included (NaN == NaN here, and the dtype must agree)."""
    for state in states[1:]:
        for name, value in state.items():
            torch.testing.assert_close(value, states[0][name], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, n=name: f"{n} differs between ranks: {m}")


# --- the whole group has zero samples -------------------------------------------------------

EMPTY_CASES = {
    "2d-W2": (2, (), False),
    "3d-W3": (3, (5,), False),
    "4d-channels_last-W2": (2, (4, 4), True),
}
THEN_SIZES = (2, 3, 1)


def _empty_then_data(spatial: tuple[int, ...], channels_last: bool) -> dict[str, Any]:
    """Step 0: every rank empty. Step 1: real data, to show nothing was poisoned."""
    world = dist.get_world_size()
    module = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    _init(module, 3)
    before = _state(module)
    empty = _layout(torch.randn(0, 3, *spatial, dtype=torch.float64), channels_last)
    first = _step(module, empty, torch.ones_like(empty))
    after_empty = _state(module)
    x, dy = _global_batch(sum(THEN_SIZES[:world]), spatial)
    rows = _rows(THEN_SIZES[:world])
    second = _step(module, _layout(x[rows], channels_last), _layout(dy[rows], channels_last))
    return {"before": before, "after_empty": after_empty, "steps": [first, second],
            "after": _state(module)}


def _global_batch(n: int, spatial: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, *spatial, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(n, 3, *spatial, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("world", "spatial", "channels_last"), EMPTY_CASES.values(),
                         ids=EMPTY_CASES.keys())
def test_empty_global_batch(world: int, spatial: tuple[int, ...], channels_last: bool) -> None:
    results = harness.run_ranks(world, _empty_then_data, spatial, channels_last)
    oracle = _bn_class(2 + len(spatial))(3, dtype=torch.float64)
    _init(oracle, 3)
    empty = torch.randn(0, 3, *spatial, dtype=torch.float64)
    x, dy = _global_batch(sum(THEN_SIZES[:world]), spatial)
    want = [_step(oracle, empty, empty), _step(oracle, x, dy)]
    for result in results:
        first = result["steps"][0]
        assert first["y"].shape == (0, 3, *spatial) and first["dx"].shape == (0, 3, *spatial)
        for name in ("dweight", "dbias"):  # zero gradients, not None, not NaN
            assert torch.equal(first[name], torch.zeros(3, dtype=torch.float64)), name
        for name in ("running_mean", "running_var"):  # untouched, bitwise
            assert torch.equal(result["after_empty"][name], result["before"][name]), name
        assert result["after_empty"]["num_batches_tracked"].item() == 1  # as torch counts it
        assert all(torch.isfinite(t).all() for step in result["steps"] for t in step.values())
    _assert_steps_match([r["steps"] for r in results], want, rtol=1e-10, atol=1e-10)
    for name, value in _state(oracle).items():
        torch.testing.assert_close(results[0]["after"][name], value, rtol=1e-10, atol=1e-10)
    _assert_identical_on_every_rank([r["after"] for r in results])


# --- NaN or Inf in one rank's input -------------------------------------------------------

POISON_SIZES = (3, 4)
POISON_CASES = {
    # name: ((row, spatial index, value), ...) in channel 1 of the global batch; rank 1 owns
    # rows 3–6, rank 0 rows 0–2
    "nan": (((4, 2), NAN),),
    "inf": (((5, 0), INF),),
    "-inf": (((3, 1), -INF),),
    "inf-and--inf-on-two-ranks": (((1, 0), INF), ((5, 3), -INF)),
    "nan-4d-channels_last": (((6, 3), NAN),),
    "inf-4d-channels_last": (((4, 0), INF),),
}


def _poisoned_batch(name: str, step: int) -> tuple[Tensor, Tensor]:
    """Step 0 carries the bad values in channel 1; step 1 is clean."""
    four_d = name.endswith("4d-channels_last")
    spatial = (2, 2) if four_d else (4,)
    x, dy = _global_batch(sum(POISON_SIZES), spatial, seed=10 + step)
    if step == 0:
        flat = x.view(x.shape[0], 3, -1)
        for (row, index), value in POISON_CASES[name]:
            flat[row, 1, index] = value
    return x, dy


def _poisoned(name: str) -> dict[str, Any]:
    channels_last = name.endswith("4d-channels_last")
    module = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    _init(module, 3)
    rows = _rows(POISON_SIZES)
    steps = []
    for step in range(2):
        x, dy = _poisoned_batch(name, step)
        steps.append(_step(module, _layout(x[rows], channels_last),
                           _layout(dy[rows], channels_last)))
    return {"steps": steps, "state": _state(module)}


@pytest.mark.parametrize("name", POISON_CASES)
def test_nan_or_inf_in_one_rank_behaves_as_batchnorm_on_the_global_batch(name: str) -> None:
    results = harness.run_ranks(2, _poisoned, name)
    x0, _ = _poisoned_batch(name, 0)
    oracle = _bn_class(x0.dim())(3, dtype=torch.float64)
    _init(oracle, 3)
    want = [_step(oracle, *_poisoned_batch(name, step)) for step in range(2)]
    # exactly torch's values, NaN where torch has NaN and nowhere else
    _assert_steps_match([r["steps"] for r in results], want, rtol=1e-10, atol=1e-10,
                        equal_nan=True)
    for name_, value in _state(oracle).items():
        torch.testing.assert_close(results[0]["state"][name_], value, rtol=1e-10, atol=1e-10,
                                   equal_nan=True)
    _assert_identical_on_every_rank([r["state"] for r in results])
    # spelled out: the affected channel is NaN on every rank, the others are finite
    for result in results:
        first = result["steps"][0]
        assert torch.isnan(first["y"][:, 1]).all() and torch.isnan(first["dx"][:, 1]).all()
        assert torch.isfinite(first["y"][:, [0, 2]]).all()
        assert torch.isfinite(first["dx"][:, [0, 2]]).all()
        assert torch.isfinite(first["dbias"]).all()  # Σdy does not see x
        assert torch.isfinite(result["steps"][1]["y"]).all()  # the next batch is clean
        assert torch.isfinite(result["state"]["running_mean"][[0, 2]]).all()


# --- float16 / bfloat16 -------------------------------------------------------------------

LOW_SIZES = (10, 10)
LOW_SPATIAL = (64, 64)  # 40,960 values per channel per rank, 81,920 globally (> 65,504)
LOW_CASES = {
    # name: (input dtype, module conversion)
    "float16-input": ("float16", None),
    "bfloat16-input": ("bfloat16", None),
    "half-module": ("float16", "half"),
    "bfloat16-module": ("bfloat16", "to-bfloat16"),
}
WEIGHT = (0.5, 2.0)
BIAS = (1.0, -1.0)


def _low_batch(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean 3, std 2: Σx ≈ 2.5e5 per channel, which float16 cannot hold (max 65,504)."""
    gen = torch.Generator().manual_seed(5)
    shape = (sum(LOW_SIZES), 2, *LOW_SPATIAL)
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    return x, dy


def _low_precision(name: str) -> dict[str, Any]:
    dtype_name, conversion = LOW_CASES[name]
    dtype = getattr(torch, dtype_name)
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(WEIGHT))
        model[0].bias.copy_(torch.tensor(BIAS))
    if conversion == "half":
        model.half()
    elif conversion == "to-bfloat16":
        model.to(torch.bfloat16)
    x, dy = _low_batch(dtype)
    rows = _rows(LOW_SIZES)
    step = _step(model[0], x[rows], dy[rows])
    return {"step": step, "state": _state(model[0]),
            "dtypes": {k: str(v.dtype) for k, v in model[0].state_dict().items()}}


@pytest.mark.parametrize("name", LOW_CASES)
def test_low_precision_statistics_in_float32_without_overflow(name: str) -> None:
    dtype_name, conversion = LOW_CASES[name]
    results = harness.run_ranks(2, _low_precision, name)
    x, dy = _low_batch(getattr(torch, dtype_name))
    # the float64 oracle on the very same 16-bit values
    running_mean, running_var = torch.zeros(2, dtype=torch.float64), torch.ones(2).double()
    x64 = x.double().requires_grad_()
    weight = torch.tensor(WEIGHT, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    y64 = F.batch_norm(x64, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    y64.backward(dy.double())
    want = {"y": y64.detach(), "dx": x64.grad, "dweight": weight.grad, "dbias": bias.grad}

    module_dtype = {None: "torch.float32", "half": "torch.float16",
                    "to-bfloat16": "torch.bfloat16"}[conversion]
    for result in results:
        assert result["dtypes"]["num_batches_tracked"] == "torch.int64"  # counts never 16-bit
        assert result["dtypes"]["running_var"] == module_dtype
        assert result["step"]["y"].dtype == getattr(torch, dtype_name)
        assert all(torch.isfinite(t).all() for t in result["step"].values())
        assert all(torch.isfinite(t).all() for t in result["state"].values())
    # output and input grad: one rounding to the 16-bit dtype away from the oracle
    low = {"rtol": 2e-3, "atol": 2e-3} if dtype_name == "float16" else {"rtol": 1.6e-2,
                                                                        "atol": 1.6e-2}
    for name_ in ("y", "dx"):
        got = torch.cat([r["step"][name_] for r in results]).double()
        torch.testing.assert_close(got, want[name_].double(), **low,
                                   msg=lambda m, n=name_: f"{n}: {m}")
    # weight/bias grads: sums over 40,960 values per rank, rounded once to the module dtype
    for name_ in ("dweight", "dbias"):
        got = torch.stack([r["step"][name_].double() for r in results]).sum(0)
        rtol = 1e-4 if conversion is None else low["rtol"]
        torch.testing.assert_close(got, want[name_], rtol=rtol, atol=rtol * 300,
                                   msg=lambda m, n=name_: f"{n}: {m}")
    # statistics accumulated in float32: float32 buffers agree to ~1e-6; 16-bit buffers
    # are the float32 values rounded once
    stats_tol = 1e-5 if conversion is None else low["rtol"] / 2
    for name_, value in (("running_mean", running_mean), ("running_var", running_var)):
        for result in results:
            torch.testing.assert_close(result["state"][name_].double(), value, rtol=stats_tol,
                                       atol=stats_tol, msg=lambda m, n=name_: f"{n}: {m}")
    _assert_identical_on_every_rank([r["state"] for r in results])


# --- large offsets: variance against a float64 oracle, and torch's figure beside it --------

OFFSET_SIZES = (3000, 5192)  # 8,192 values per channel in all


def _offset_batch(mean: float, std: float, four_d: bool) -> Tensor:
    """float32 data; ``four_d``: (128, 2, 8, 8) channels_last, else (8192, 2)."""
    gen = torch.Generator().manual_seed(11)
    if four_d:
        x = torch.randn(128, 2, 8, 8, generator=gen, dtype=torch.float64) * std + mean
        return x.float().contiguous(memory_format=torch.channels_last)
    return (torch.randn(sum(OFFSET_SIZES), 2, generator=gen, dtype=torch.float64) * std
            + mean).float()


def _offset_sizes(four_d: bool) -> tuple[int, int]:
    return (50, 78) if four_d else OFFSET_SIZES


def _large_offset(mean: float, std: float, four_d: bool) -> dict[str, Tensor]:
    x = _offset_batch(mean, std, four_d)[_rows(_offset_sizes(four_d))]
    module = syncbn.SyncBatchNorm(2, momentum=1.0)  # running_var = this batch's (unbiased)
    y = module(x)
    return {"y": y.detach(), "running_var": module.running_var.clone()}


def _errors(var: Tensor, y: Tensor, x: Tensor) -> tuple[float, float]:
    """(max relative error of the unbiased variance, max abs error of y) vs float64."""
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    exact_var = x64.var(dims, unbiased=True)
    biased = x64.var(dims, unbiased=False)
    view = (1, 2) + (1,) * (x.dim() - 2)
    exact_y = (x64 - x64.mean(dims).view(view)) / (biased.view(view) + 1e-5).sqrt()
    var_error = ((var.double() - exact_var) / exact_var).abs().max().item()
    y_error = (y.double() - exact_y).abs().max().item()
    return var_error, y_error


@pytest.mark.parametrize("four_d", [False, True], ids=["2d", "4d-channels_last"])
@pytest.mark.parametrize(("mean", "std"), [(1e4, 1.0), (1e5, 1.0), (100.0, 0.01)],
                         ids=["mean1e4-std1", "mean1e5-std1", "mean100-std0.01"])
def test_large_offsets_keep_the_variance(
    mean: float, std: float, four_d: bool, record_property: Callable[[str, object], None]
) -> None:
    results = harness.run_ranks(2, _large_offset, mean, std, four_d)
    x = _offset_batch(mean, std, four_d)
    y = torch.cat([r["y"] for r in results])
    var_error, y_error = _errors(results[0]["running_var"], y, x)
    reference = _bn_class(x.dim())(2, momentum=1.0)  # torch's own, float32, one process
    torch_y = reference(x).detach()
    torch_var_error, torch_y_error = _errors(reference.running_var, torch_y, x)
    for name, value in (("syncbn_var_rel_error", var_error), ("syncbn_y_abs_error", y_error),
                        ("torch_var_rel_error", torch_var_error),
                        ("torch_y_abs_error", torch_y_error)):
        record_property(name, f"{value:.2e}")
    assert var_error < 1e-3, (var_error, torch_var_error)
    # y = scale·x + shift rounds terms of size μ/σ in float32, as torch's kernel does, and
    # float32 shard means are off by ε₃₂·μ: the output is good to a few ε₃₂·μ/σ, whoever
    # computes it (torch's own BatchNorm: 4e-3 to 1.6e-2 here, recorded above)
    assert y_error < 16 * torch.finfo(torch.float32).eps * mean / std, (y_error, torch_y_error)
    assert torch.equal(results[0]["running_var"], results[1]["running_var"])


# --- running statistics after 20 steps with uneven batches -------------------------------

STEPS = 20


def _step_sizes(step: int, world: int) -> tuple[int, ...]:
    """Uneven per-rank sizes, 0 included; step 7 is empty on every rank."""
    if step == 7:
        return (0,) * world
    gen = torch.Generator().manual_seed(100 + step)
    return tuple(int(v) for v in torch.randint(0, 6, (world,), generator=gen))


def _long_run_batch(step: int, world: int, spatial: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    n = sum(_step_sizes(step, world))
    return _global_batch(n, spatial, seed=200 + step)


def _twenty_steps(spatial: tuple[int, ...], channels_last: bool,
                  momentum: float | None) -> dict[str, Tensor]:
    world = dist.get_world_size()
    module = syncbn.SyncBatchNorm(3, momentum=momentum)  # float32
    _init(module, 3)
    for step in range(STEPS):
        x, dy = _long_run_batch(step, world, spatial)
        rows = _rows(_step_sizes(step, world))
        _step(module, _layout(x[rows].float(), channels_last),
              _layout(dy[rows].float(), channels_last))
    return _state(module)


@pytest.mark.parametrize(("spatial", "channels_last", "momentum"),
                         [((3,), False, 0.1), ((2, 3), True, None)],
                         ids=["3d-momentum0.1", "4d-channels_last-momentum-none"])
def test_running_stats_bitwise_identical_after_20_uneven_steps(
    spatial: tuple[int, ...], channels_last: bool, momentum: float | None
) -> None:
    world = 3
    states = harness.run_ranks(world, _twenty_steps, spatial, channels_last, momentum)
    _assert_identical_on_every_rank(states)
    for state in states[1:]:  # spelled out: the very same bits
        assert torch.equal(state["running_mean"].view(torch.int32),
                           states[0]["running_mean"].view(torch.int32))
        assert torch.equal(state["running_var"].view(torch.int32),
                           states[0]["running_var"].view(torch.int32))
    oracle = _bn_class(2 + len(spatial))(3, momentum=momentum, dtype=torch.float64)
    _init(oracle, 3)
    for step in range(STEPS):
        _step(oracle, *_long_run_batch(step, world, spatial))
    want = _state(oracle)
    assert states[0]["num_batches_tracked"].item() == want["num_batches_tracked"].item()
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(states[0][name].double(), want[name], rtol=1e-5, atol=1e-6)
