"""syncbn on real gloo groups == torch BatchNorm on the concatenated global batch."""

from __future__ import annotations

import contextlib
import time
import types
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import harness
import syncbn
from bn_cases import Case, assert_matches_oracle, run_syncbn
from syncbn import _comm, _policy
from syncbn.functional import sync_batch_norm

CASES = {
    # world size 2 and 3, uneven, with an empty rank, every input rank
    "2d-uneven-empty": Case(sizes=(5, 0, 3), spatial=()),
    "3d-uneven": Case(sizes=(2, 5), spatial=(7,)),
    "4d-uneven-empty": Case(sizes=(3, 0, 2)),
    "5d-uneven": Case(sizes=(1, 2, 3), spatial=(2, 3, 2)),
    "4d-channels_last": Case(sizes=(2, 3), channels_last=True),
    "5d-channels_last_3d-empty": Case(sizes=(2, 0, 1), spatial=(2, 2, 3), channels_last=True),
    "momentum-none": Case(sizes=(4, 1, 2), momentum=None, steps=3),
    "affine-false": Case(sizes=(2, 3), affine=False),
    "no-running-stats": Case(sizes=(3, 0, 2), track_running_stats=False),
    "one-value-per-rank": Case(sizes=(1, 1), spatial=()),
    "float32": Case(sizes=(4, 3), dtype="float32", channels=5),
    "bfloat16": Case(sizes=(4, 3), dtype="bfloat16"),
    "subgroups-2x2": Case(sizes=(3, 1), groups=((0, 1), (2, 3))),
    # the widest group that sums by all_gather (GATHER_MAX_RANKS), uneven with an empty rank
    "4-ranks-uneven-empty": Case(sizes=(2, 0, 3, 1), spatial=(3,)),
}


def _world_size(case: Case) -> int:
    return sum(len(g) for g in case.groups) if case.groups else len(case.sizes)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_batchnorm_on_global_batch(case: Case) -> None:
    results = harness.run_ranks(_world_size(case), run_syncbn, case)
    assert_matches_oracle(case, results)


def test_channels_last_output_keeps_format() -> None:
    case = CASES["4d-channels_last"]
    results = harness.run_ranks(2, run_syncbn, case)
    assert all(step["is_channels_last"] for r in results for step in r["steps"])


def _subgroups_differ() -> list[float]:
    """Two groups of 2 get different data, so their statistics must differ."""
    case = CASES["subgroups-2x2"]
    result = run_syncbn(case)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result["running_mean"])
    return [float((gathered[0] - g).abs().max()) for g in gathered]


def test_subgroups_keep_their_own_statistics() -> None:
    diffs = harness.run_ranks(4, _subgroups_differ)[0]
    assert diffs[1] == 0.0  # same group, bitwise identical
    assert diffs[2] > 1e-3 and diffs[3] > 1e-3  # the other group's statistics


# --- communication: counted, not timed --------------------------------------------------


def _count_collectives(channels: int, eval_alone: bool, cap: int | None = None
                       ) -> dict[str, Any]:
    """Each collective's kind, bytes sent by this rank and dtype, over a first step, a
    second step and an eval forward (``cap``: ``GATHER_MAX_RANKS`` on this rank)."""
    saved = _comm.GATHER_MAX_RANKS
    if cap is not None:
        _comm.GATHER_MAX_RANKS = cap
    try:
        return _count_collectives_here(channels, eval_alone)
    finally:
        _comm.GATHER_MAX_RANKS = saved


def _count_collectives_here(channels: int, eval_alone: bool) -> dict[str, Any]:
    calls: list[tuple[str, int, str]] = []
    originals = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def counting(kind: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if kind == "all_reduce" else args[1]
            if tensor.numel() != 3:  # not the once-per-group debug-mode check (agree_on_mode)
                calls.append((kind, tensor.numel() * tensor.element_size(), str(tensor.dtype)))
            return originals[kind](*args, **kwargs)
        return call

    # debug off whatever SYNCBN_DEBUG says: no fingerprint all_gathers among the counted
    module = syncbn.SyncBatchNorm(channels, debug=False)
    x = torch.randn(3 + dist.get_rank(), channels, 4, 4, requires_grad=True)
    for kind in originals:
        setattr(dist, kind, counting(kind))
    try:
        module(x).sum().backward()  # a fresh layer exchanges its shift first
        first_calls = list(calls)
        calls.clear()
        module(x).sum().backward()
        train_calls = list(calls)
        calls.clear()
        module.eval()
        if not eval_alone or dist.get_rank() == 0:  # a rank that evaluates alone must not hang
            with torch.no_grad():
                module(x)
        eval_calls = list(calls)
    finally:
        for kind, original in originals.items():
            setattr(dist, kind, original)
    return {"first": first_calls, "train": train_calls, "eval": eval_calls}


@pytest.mark.parametrize(("world_size", "cap"), [(2, None), (4, None), (2, 0)],
                         ids=["2-gather", "4-gather", "2-all_reduce"])
def test_one_collective_each_way_of_constant_size(world_size: int, cap: int | None) -> None:
    channels = 16
    results = harness.run_ranks(world_size, _count_collectives, channels, True, cap)
    # gloo, CPU, at most GATHER_MAX_RANKS ranks: each sum is an all_gather (see _comm.gathers)
    gathering = world_size <= (_comm.GATHER_MAX_RANKS if cap is None else cap)
    kind = "all_gather" if gathering else "all_reduce"
    for result in results:
        # the first step: the shift exchange, then the two, all of one size
        assert result["first"] == [(kind, 8 * (2 * channels + 2), "torch.float64")] * 3
        forward, backward = result["train"]
        # one size both ways (so any mispairing is caught by the step key); each rank
        # sends O(C) (and, gathering, receives W times that)
        assert forward == (kind, 8 * (2 * channels + 2), "torch.float64")
        assert backward == (kind, 8 * (2 * channels + 2), "torch.float64")
        assert forward[1] + backward[1] == 16 * (2 * channels + 2)
        assert result["eval"] == []


def _run_with_gather_cap(case: Case, cap: int) -> dict[str, Any]:
    """:func:`run_syncbn` with ``_comm.GATHER_MAX_RANKS`` set to ``cap`` on this rank (0: every
    sum is an all_reduce, the path of NCCL and of larger gloo groups)."""
    saved = _comm.GATHER_MAX_RANKS
    _comm.GATHER_MAX_RANKS = cap
    try:
        return run_syncbn(case)
    finally:
        _comm.GATHER_MAX_RANKS = saved


REDUCE_CASES = ("2d-uneven-empty", "4d-uneven-empty", "4d-channels_last", "momentum-none",
                "float32", "subgroups-2x2")


@pytest.mark.parametrize("name", REDUCE_CASES)
def test_the_all_reduce_path_matches_batchnorm_on_global_batch(name: str) -> None:
    """Where syncbn sums by all_reduce (no gather: NCCL, gloo above GATHER_MAX_RANKS)."""
    case = CASES[name]
    results = harness.run_ranks(_world_size(case), _run_with_gather_cap, case, 0)
    assert_matches_oracle(case, results)


def test_gather_and_all_reduce_give_bitwise_the_same_step_on_two_ranks() -> None:
    """At 2 ranks both sum each value once (a + b), so the two paths agree bit for bit:
    outputs, input and parameter gradients, running statistics."""
    case = Case(sizes=(5, 2), channels=6, steps=3, dtype="float32")
    gathered = harness.run_ranks(2, _run_with_gather_cap, case, 8)
    reduced = harness.run_ranks(2, _run_with_gather_cap, case, 0)
    for mine, theirs in zip(gathered, reduced, strict=True):
        for got, want in zip(mine["steps"], theirs["steps"], strict=True):
            for key in ("y", "dx", "dweight", "dbias"):
                assert torch.equal(got[key], want[key]), key
        for key in ("running_mean", "running_var", "eval"):
            assert torch.equal(mine[key], theirs[key]), key


def _gather_decisions() -> dict[str, Any]:
    cpu = torch.zeros(3)
    world = dist.group.WORLD

    class OtherBackend:  # what a non-gloo group looks like to gathers()
        def size(self) -> int:
            return 2

        def _get_backend(self, device: torch.device) -> object:
            return object()

    class NoBackend(OtherBackend):  # a torch without _get_backend for this device
        def _get_backend(self, device: torch.device) -> object:
            raise RuntimeError("no backend for this device")

    class Wrapped(OtherBackend):  # TORCH_DISTRIBUTED_DEBUG=DETAIL wraps the backend
        def _get_backend(self, device: torch.device) -> object:
            return types.SimpleNamespace(wrapped_pg=world._get_backend(device))

    saved = _comm.GATHER_MAX_RANKS
    try:
        _comm.GATHER_MAX_RANKS = world.size() - 1
        above_cap = _comm.gathers(world, cpu)
    finally:
        _comm.GATHER_MAX_RANKS = saved
    with _policy.force_accelerator_policy():
        accelerator = _comm.gathers(world, cpu)
    return {"gloo": _comm.gathers(world, cpu), "above_cap": above_cap,
            "accelerator": accelerator, "other": _comm.gathers(OtherBackend(), cpu),
            "none": _comm.gathers(NoBackend(), cpu), "wrapped": _comm.gathers(Wrapped(), cpu)}


def test_which_groups_gather() -> None:
    """gloo and CPU tensors under the host policy, up to GATHER_MAX_RANKS: gather; anything
    else (above the cap, the accelerator policy, another backend): all_reduce."""
    for decisions in harness.run_ranks(2, _gather_decisions):
        assert decisions == {"gloo": True, "above_cap": False, "accelerator": False,
                             "other": False, "none": False, "wrapped": True}


def _one_rank_would_all_reduce() -> dict[str, Any]:
    """Rank 1 runs the accelerator policy (as a rank with CUDA tensors on a gloo group
    would): it would all-reduce where rank 0 gathers."""
    layer = syncbn.SyncBatchNorm(3, timeout=5.0, process_group=dist.new_group([0, 1]))
    x = torch.randn(4, 3, 5, requires_grad=True)
    start = time.monotonic()
    policy = (_policy.force_accelerator_policy() if dist.get_rank() == 1
              else contextlib.nullcontext())
    try:
        with policy:
            layer(x)
    except syncbn.SyncBatchNormError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_ranks_that_would_sum_differently_fail_at_once_on_every_rank() -> None:
    """Before the first collective of a group every rank compares how it would sum: an
    all_gather paired with an all_reduce would wait for the timeout on both."""
    for rank, result in enumerate(harness.run_ranks(2, _one_rank_would_all_reduce)):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert "1 of 2 ranks would sum by all_gather" in result["error"], result["error"]
        assert result["seconds"] < 2.0, result


# --- DDP end to end -----------------------------------------------------------------------


def _small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()


DDP_SIZES = (3, 2)
DDP_STEPS = 3


def _ddp_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(DDP_SIZES), 2, 6, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (sum(DDP_SIZES),), generator=gen)
    return x, target


def _ddp_train() -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = syncbn.convert_sync_batchnorm(_small_net(0))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    start = sum(DDP_SIZES[:rank])
    rows = slice(start, start + DDP_SIZES[rank])
    for step in range(DDP_STEPS):
        x, target = _ddp_batches(step)
        # DDP averages gradients over ranks: scale the local sum so that the
        # result is the mean loss over the global batch
        loss = nn.functional.cross_entropy(ddp(x[rows]), target[rows], reduction="sum")
        (loss * world / sum(DDP_SIZES)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_training_equals_one_process_on_the_global_batch() -> None:
    results = harness.run_ranks(2, _ddp_train)
    model = _small_net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(DDP_STEPS):
        x, target = _ddp_batches(step)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        opt.zero_grad()
    for name, want in model.state_dict().items():
        for rank, state in enumerate(results):
            torch.testing.assert_close(state[name], want, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, n=name, r=rank: f"{n} on rank {r}: {m}")


# --- gradcheck through the synchronized function --------------------------------------------


def _gradcheck_rank(sizes: tuple[int, ...]) -> bool:
    """Rank 0 checks its Jacobian; the others join every collective with fixed data.

    gradcheck perturbs inputs one element at a time and back-propagates one unit
    vector at a time, so every rank must make the same number of calls: each
    rank's checked inputs have rank 0's shapes. Ranks > 0 contribute their shard
    as constants and a zero upstream gradient, so rank 0's check sees exactly
    d(out₀)/d(x₀, w, b) with the other shards in the global statistics.
    """
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    shards = [torch.randn(n, 2, 3, generator=gen, dtype=torch.float64) for n in sizes]
    weight = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    inputs = (shards[0].clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.clone().requires_grad_())

    def on_rank_zero(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sync_batch_norm(x, None, None, w, b, training=True)

    def on_other_ranks(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # `+ 0·x` links the checked inputs to the layer: backward reaches it (and
        # its collective) without changing any value
        out = sync_batch_norm(shards[rank] + 0.0 * x.sum(), None, None, weight + 0.0 * w,
                              bias + 0.0 * b, training=True)
        return x * 0.0 + out.sum() * 0.0

    fn = on_rank_zero if rank == 0 else on_other_ranks
    # check_undefined_grad is off: undefined upstream grads take different
    # paths through the two functions; the single-process tests cover it
    return bool(torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7,
                                         check_undefined_grad=False))


@pytest.mark.parametrize("sizes", [(3, 2), (2, 0, 4)], ids=["2-ranks", "3-ranks-with-empty"])
def test_gradcheck_through_the_synchronized_function(sizes: tuple[int, ...]) -> None:
    assert harness.run_ranks(len(sizes), _gradcheck_rank, sizes) == [True] * len(sizes)


# --- numerics -------------------------------------------------------------------------------


def _large_offset_variance(mean: float, std: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(11)
    data = torch.randn(2 * 4096, 2, generator=gen, dtype=torch.float64) * std + mean
    x = data.float()
    rank = dist.get_rank()
    module = syncbn.SyncBatchNorm(2, momentum=1.0)
    module(x[rank * 4096:(rank + 1) * 4096])
    exact = x.double().var(0, unbiased=True)
    local_bn = nn.BatchNorm1d(2, momentum=1.0)
    local_bn(x)
    return {
        "syncbn": float(((module.running_var.double() - exact) / exact).abs().max()),
        "torch_batchnorm": float(((local_bn.running_var.double() - exact) / exact).abs().max()),
        "naive_float32": float(((x.pow(2).mean(0) - x.mean(0).pow(2)) * 8192 / 8191
                                - exact).div(exact).abs().max()),
    }


@pytest.mark.parametrize(("mean", "std"), [(1e4, 1.0), (1e5, 1.0), (100.0, 0.01)])
def test_variance_is_stable_for_large_offsets(mean: float, std: float) -> None:
    errors = harness.run_ranks(2, _large_offset_variance, mean, std)[0]
    assert errors["syncbn"] < 1e-3, errors
    assert errors["naive_float32"] > 1e-3, errors  # the case really is hard


# --- errors on a live group -----------------------------------------------------------------


def _errors_on_group() -> dict[str, str]:
    messages: dict[str, str] = {}
    x = torch.randn(2, 3)
    others = dist.new_group([0, 1])  # rank 2 is outside
    if dist.get_rank() == 2:
        try:
            syncbn.SyncBatchNorm(3, process_group=others)(x)
        except ValueError as error:
            messages["non_member"] = str(error)
    single = torch.randn(1 if dist.get_rank() == 0 else 0, 3)
    try:
        syncbn.SyncBatchNorm(3)(single)
    except ValueError as error:
        messages["one_value"] = str(error)
    return messages


def test_errors_on_a_live_group() -> None:
    results = harness.run_ranks(3, _errors_on_group)
    assert "does not include this rank (global rank 2)" in results[2]["non_member"]
    for result in results:
        assert result["one_value"] == (
            "Expected more than 1 value per channel when training, got input size 1"
        )


def _destroyed_group_error() -> str:
    group = dist.new_group([0, 1])
    # every rank has connected before one destroys its side (older torch connects gloo
    # eagerly in new_group: a peer destroying early fails the other's connect)
    dist.barrier()
    module = syncbn.SyncBatchNorm(3, process_group=group)
    dist.destroy_process_group(group)
    try:
        module(torch.randn(4, 3))
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_destroyed_group_is_a_clear_error() -> None:
    results = harness.run_ranks(2, _destroyed_group_error)
    assert all(r != "no error" for r in results), results


# --- copies of a layer that holds a process group ------------------------------------------


def _copies_of_grouped_layer() -> dict[str, str]:
    import copy
    import pickle

    group = dist.new_group([0, 1])
    layer = syncbn.SyncBatchNorm(3, process_group=group)
    clone = copy.deepcopy(nn.Sequential(layer))[0]
    out = {"deepcopy_shares_group": str(clone.process_group is group),
           "deepcopy_new_params": str(clone.weight is not layer.weight)}
    clone(torch.randn(4, 3))  # trains over the shared group
    restored = pickle.loads(pickle.dumps(layer))
    out["pickled_group"] = str(restored.process_group)
    try:
        restored(torch.randn(4, 3))
    except ValueError as error:
        out["pickled_error"] = str(error)
    restored.eval()
    restored(torch.randn(4, 3))  # eval needs no group
    return out


def test_deepcopy_shares_the_group_and_pickling_says_it_dropped_it() -> None:
    for result in harness.run_ranks(2, _copies_of_grouped_layer):
        assert result["deepcopy_shares_group"] == "True"
        assert result["deepcopy_new_params"] == "True"
        assert result["pickled_group"] == "None"
        assert "was unpickled, and its process group could not travel" in result["pickled_error"]
