"""``syncbn.join``: ranks with different numbers of batches, on real gloo ranks.

The oracle is one process training on the union of the active ranks' batches
at every step (torch's own BatchNorm on that batch), with the loss divided by
the initial world size, as DDP's join divides gradients by default.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import JoinHook

import harness
import syncbn
from syncbn import _comm
from syncbn import paddle_compat as pnn
from syncbn._comm import TIMEOUT_ENV

LR = 0.1
TIMEOUT_S = 60.0


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2),
    ).double()


def _batch(rank: int, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    size = 3 + (rank + step) % 3
    return torch.randn(size, 3, generator=gen, dtype=torch.float64) * (1 + rank) + step


def _loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 2, out.size(1), dtype=out.dtype)).pow(2).sum()


def _train_ranks(counts: list[int], use_ddp: bool, broadcast_buffers: bool,
                 variant: str, groups: list[list[int]] | None = None) -> dict[str, Any]:
    rank = dist.get_rank()
    group = None
    if groups is not None:  # every rank creates every group, in one order (torch's rule)
        made = [dist.new_group(ranks) for ranks in groups]
        group = next(g for g, ranks in zip(made, groups, strict=True) if rank in ranks)
    model = syncbn.convert_sync_batchnorm(_model(), process_group=group)
    for layer in model.modules():
        if isinstance(layer, syncbn.SyncBatchNorm):
            if variant == "same-names":  # not told apart by name: found by their hooks
                layer._syncbn_name = "bn"
            layer.debug = variant == "debug"  # the fingerprints run on the join group too
    net: nn.Module = model
    if use_ddp:
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    outputs, grads = [], []
    start = time.monotonic()
    with syncbn.join(net):
        for step in range(counts[rank]):
            opt.zero_grad()
            out = net(_batch(rank, step))
            _loss(out).backward()
            outputs.append(out.detach())
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                          if p.grad is not None})
            if use_ddp:
                opt.step()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "outputs": outputs, "grads": grads, "seconds": time.monotonic() - start}


def _oracle(counts: list[int], use_ddp: bool,
            groups: list[list[int]] | None = None) -> dict[str, Any]:
    """One process: each group's layers normalize the union of its active ranks' batches.

    The parameters are shared (DDP over every rank, loss divided by the initial
    world size); each group has its own running statistics.
    """
    world = len(counts)
    groups = groups or [list(range(world))]
    model = _model()
    params = dict(model.named_parameters())
    buffers = [{k: b.clone() for k, b in model.named_buffers()} for _ in groups]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    outputs: list[dict[int, Tensor]] = []
    grads: list[list[dict[str, Tensor]]] = []  # step, group: d(loss of the group's union)
    for step in range(max(counts)):
        opt.zero_grad()
        outputs.append({})
        grads.append([])
        for g, ranks in enumerate(groups):
            active = [r for r in ranks if counts[r] > step]
            grads[step].append({})
            if not active:
                continue
            xs = [_batch(r, step) for r in active]
            out = torch.func.functional_call(model, {**params, **buffers[g]}, (torch.cat(xs),))
            outputs[step].update(zip(active, out.detach().split([len(x) for x in xs]),
                                     strict=True))
            loss = _loss(out)
            grads[step][g] = dict(zip(params, torch.autograd.grad(loss, list(params.values())),
                                      strict=True))
            for key, p in params.items():  # DDP: the sum over ranks / the initial world size
                p.grad = grads[step][g][key] / world + (0 if p.grad is None else p.grad)
        if use_ddp:
            opt.step()
    state = [{**{k: p.detach() for k, p in params.items()}, **b} for b in buffers]
    return {"state": state, "outputs": outputs, "grads": grads, "groups": groups}


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-11, msg=what)


def _assert_matches(results: list[dict[str, Any]], oracle: dict[str, Any], counts: list[int],
                    use_ddp: bool) -> None:
    for g, ranks in enumerate(oracle["groups"]):
        for rank in ranks:
            state = results[rank]["state"]
            for key, expected in oracle["state"][g].items():
                if not (use_ddp or "running" in key or "num_batches" in key):
                    continue
                if key.endswith("num_batches_tracked"):
                    steps = max(counts[r] for r in ranks)
                    assert int(state[key]) == int(expected) == steps, (rank, key)
                else:
                    _assert_close(state[key], expected, f"rank {rank} {key}")
            for step, out in enumerate(results[rank]["outputs"]):
                _assert_close(out, oracle["outputs"][step][rank],
                              f"rank {rank} step {step} output")
        if use_ddp:
            continue
        for step, by_group in enumerate(oracle["grads"]):  # the active ranks' sum, per group
            active = [r for r in ranks if counts[r] > step]
            for key, grad in by_group[g].items():
                total = sum(results[r]["grads"][step][key] for r in active)
                assert isinstance(total, Tensor)
                _assert_close(total, grad, f"group {g} step {step} grad {key}")


CASES = [  # batches per rank, DDP, DDP's broadcast_buffers, variant
    pytest.param([2, 4], True, True, "", id="W2-ddp"),
    pytest.param([3, 1, 2], True, True, "", id="W3-ddp"),
    pytest.param([3, 1, 2], True, True, "same-names", id="W3-ddp-same-names"),
    pytest.param([2, 1, 3], True, True, "debug", id="W3-ddp-debug"),
    pytest.param([1, 3, 2], True, False, "", id="W3-ddp-no-broadcast-buffers"),
    pytest.param([4, 2], False, True, "", id="W2-plain"),
    pytest.param([2, 3, 1], False, True, "", id="W3-plain"),
    # a rank with no batch at all: it learns the iteration from the active ranks
    pytest.param([0, 3], True, True, "", id="W2-ddp-zero-batches"),
    pytest.param([2, 0, 3], True, True, "same-names", id="W3-ddp-same-names-zero-batches"),
    pytest.param([0, 2, 0], False, True, "debug", id="W3-plain-debug-two-with-zero-batches"),
]


@pytest.mark.parametrize(("counts", "use_ddp", "broadcast_buffers", "variant"), CASES)
def test_join_equals_one_process_on_the_active_ranks_batches(
        counts: list[int], use_ddp: bool, broadcast_buffers: bool, variant: str,
        record_property: Any) -> None:
    results = harness.run_ranks(len(counts), _train_ranks, counts, use_ddp, broadcast_buffers,
                                variant, timeout=TIMEOUT_S)
    record_property("seconds", max(r["seconds"] for r in results))
    _assert_matches(results, _oracle(counts, use_ddp), counts, use_ddp)


def _with_all_reduce(task: Any, *args: Any) -> Any:
    """Run ``task`` with syncbn summing by all_reduce on this rank (``GATHER_MAX_RANKS`` 0):
    the path of NCCL and of larger gloo groups, outside the join context as well as in it
    (where the layers' sums are all-reduces in any case)."""
    saved = _comm.GATHER_MAX_RANKS
    _comm.GATHER_MAX_RANKS = 0
    try:
        return task(*args)
    finally:
        _comm.GATHER_MAX_RANKS = saved


@pytest.mark.parametrize(("counts", "use_ddp"), [
    pytest.param([3, 1, 2], True, id="W3-ddp"),
    pytest.param([0, 2, 0], False, id="W3-plain-two-with-zero-batches"),
])
def test_join_on_the_all_reduce_path_equals_one_process(counts: list[int],
                                                         use_ddp: bool) -> None:
    results = harness.run_ranks(len(counts), _with_all_reduce, _train_ranks, counts, use_ddp,
                                True, "", timeout=TIMEOUT_S)
    _assert_matches(results, _oracle(counts, use_ddp), counts, use_ddp)


GROUP_CASES = [  # batches per rank, the layers' groups, DDP over every rank
    pytest.param([2, 3, 1], [[0, 1], [2]], False, id="W3-[0,1],[2]-plain"),
    pytest.param([1, 3, 2, 0], [[0, 1], [2, 3]], False, id="W4-[0,1],[2,3]-plain"),
    pytest.param([3, 1, 0, 2], [[0, 1], [2, 3]], True, id="W4-[0,1],[2,3]-ddp"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("counts", "groups", "use_ddp"), GROUP_CASES)
def test_join_with_layers_on_subgroups_equals_one_process_per_group(
        counts: list[int], groups: list[list[int]], use_ddp: bool, record_property: Any) -> None:
    # DDP over all ranks with per-group statistics: buffers are not broadcast (DDP would
    # overwrite one group's running statistics with another's)
    results = harness.run_ranks(len(counts), _train_ranks, counts, use_ddp, False, "", groups,
                                timeout=TIMEOUT_S)
    record_property("seconds", max(r["seconds"] for r in results))
    _assert_matches(results, _oracle(counts, use_ddp, groups), counts, use_ddp)


class _PaddleNet(nn.Module):
    """Paddle-flavour layers with C last: 'NHWC' on (N, H, W, C), then 'NLC' on (N, L, C)."""

    def __init__(self, sync: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(3, 4)
        self.bn1 = pnn.SyncBatchNorm(4, data_format="NHWC") if sync \
            else pnn.BatchNorm2D(4, data_format="NHWC")
        self.bn2 = pnn.SyncBatchNorm(4, momentum=0.8, data_format="NLC") if sync \
            else pnn.BatchNorm1D(4, momentum=0.8, data_format="NLC")
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn1(self.lin(x)))  # (N, H, W, 4)
        return self.bn2(h.flatten(1, 2))  # (N, H·W, 4)


def _paddle_batch(rank: int, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2 + (rank + step) % 3, 2, 3, 3, generator=gen,
                       dtype=torch.float64) * (1 + rank) + step


def _paddle_loss(out: Tensor) -> Tensor:
    return (out * torch.linspace(-1, 2, out.size(-1), dtype=out.dtype)).pow(2).sum()


def _train_paddle(counts: list[int], use_ddp: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    model = _PaddleNet(sync=True)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    outputs, grads = [], []
    with syncbn.join(net):
        for step in range(counts[rank]):
            opt.zero_grad()
            out = net(_paddle_batch(rank, step))
            _paddle_loss(out).backward()
            outputs.append(out.detach())
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
            if use_ddp:
                opt.step()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "outputs": outputs, "grads": grads}


@pytest.mark.parametrize(("counts", "use_ddp"), [
    pytest.param([3, 1], True, id="W2-ddp"),
    pytest.param([0, 2], False, id="W2-plain-zero-batches"),
])
def test_join_with_paddle_channel_last_layers_equals_one_process(
        counts: list[int], use_ddp: bool) -> None:
    results = harness.run_ranks(len(counts), _train_paddle, counts, use_ddp, timeout=TIMEOUT_S)
    model = _PaddleNet(sync=False)  # Paddle's local BatchNorm2D/1D on the union of the batches
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    world = len(counts)
    for step in range(max(counts)):
        active = [r for r in range(world) if counts[r] > step]
        xs = [_paddle_batch(r, step) for r in active]
        opt.zero_grad()
        out = model(torch.cat(xs))
        _paddle_loss(out).backward()
        for r, rows in zip(active, out.detach().split([len(x) for x in xs]), strict=True):
            _assert_close(results[r]["outputs"][step], rows, f"rank {r} step {step} output")
        if use_ddp:  # DDP averages over the initial world size
            for p in model.parameters():
                assert p.grad is not None
                p.grad /= world
            opt.step()
        else:
            for key, p in model.named_parameters():
                total = sum(results[r]["grads"][step][key] for r in active)
                assert isinstance(total, Tensor) and p.grad is not None
                _assert_close(total, p.grad, f"step {step} grad {key}")
    for rank, result in enumerate(results):
        for key, expected in model.state_dict().items():
            if use_ddp or key.endswith(("_mean", "_variance")):
                _assert_close(result["state"][key], expected, f"rank {rank} {key}")


def _throw(counts: list[int], use_ddp: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_model())
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    done = 0
    start = time.monotonic()
    try:
        with syncbn.join(net, throw_on_early_termination=True):
            for step in range(counts[rank]):
                _loss(net(_batch(rank, step))).backward()
                done += 1
    except RuntimeError as error:
        return {"error": str(error), "done": done, "seconds": time.monotonic() - start}
    return {"error": None, "done": done, "seconds": time.monotonic() - start}


@pytest.mark.parametrize("use_ddp", [True, False], ids=["ddp", "plain"])
def test_throw_on_early_termination_raises_on_every_rank(use_ddp: bool) -> None:
    counts = [1, 3, 2]
    results = harness.run_ranks(3, _throw, counts, use_ddp, timeout=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert result["seconds"] < 15, result
    assert "exhausted" in results[0]["error"]
    assert [r["done"] for r in results] == [1, 1, 1]


class _Branchy(nn.Module):
    """A SyncBatchNorm that only runs at even steps (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.extra = nn.BatchNorm1d(4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.double()

    def forward(self, x: Tensor, step: int) -> Tensor:
        h = self.body(x)
        if step % 2 == 0:
            h = self.extra(h)
        return self.head(h)


def _skipped_branch(counts: list[int], use_ddp: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_Branchy())
    net: nn.Module = model
    if use_ddp:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    dist.barrier()  # a fresh pool's group connects here, not in the measured time
    start = time.monotonic()
    try:
        with syncbn.join(net):
            for step in range(counts[rank]):
                net(_batch(rank, step), step).sum().backward()
    except syncbn.SyncBatchNormError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


@pytest.fixture
def own_pool() -> Iterator[harness.DistPool]:
    """Two ranks of their own: after a join error the group may still hold pending work."""
    pool = harness.DistPool(2)
    try:
        yield pool
    finally:
        for proc in pool._procs:  # its group is broken: no orderly shutdown to wait for
            if proc.is_alive():
                proc.kill()
        pool.close()


@pytest.mark.parametrize("use_ddp", [False, True], ids=["plain", "ddp"])
def test_layer_skipped_in_the_last_step_is_an_error_on_every_rank(
        use_ddp: bool, own_pool: harness.DistPool, record_property: Any) -> None:
    # rank 0 stops after step 1 (the extra layer skipped); rank 1's step 2 runs it
    results = own_pool.run(_skipped_branch, [2, 3], use_ddp, timeout=TIMEOUT_S)
    record_property("seconds", [round(r["seconds"], 3) for r in results])
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert "syncbn.join" in result["error"], result["error"]
        assert "drop_last=True" in result["error"], result["error"]
    assert "'extra' forward" in results[1]["error"]
    assert max(r["seconds"] for r in results) < 10  # the group's timeout is 20 s


def _float64_gathers_under_join() -> list[int]:
    """The sizes of the float64 all_gathers while ``syncbn.join`` shadows a rank (rank 0: 1
    batch, rank 1: 3), on a gloo group that gathers outside the join."""
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_model())
    sizes: list[int] = []
    original = dist.all_gather

    def counting(*args: Any, **kwargs: Any) -> Any:
        if args[1].dtype == torch.float64:
            sizes.append(args[1].numel())
        return original(*args, **kwargs)

    dist.all_gather = counting
    try:
        with syncbn.join(model):
            for step in range((1, 3)[rank]):
                _loss(model(_batch(rank, step))).backward()
    finally:
        dist.all_gather = original
    return sizes


def test_under_join_the_layers_sum_by_all_reduce() -> None:
    """Under syncbn.join the layers' sums run on its shadow groups by all_reduce (the kind
    its replay and mismatch messages pair), though the group gathers outside it."""
    assert harness.run_ranks(2, _float64_gathers_under_join, timeout=TIMEOUT_S) == [[], []]


def test_layer_skipped_on_the_all_reduce_path_is_an_error_on_every_rank(
        own_pool: harness.DistPool) -> None:
    """The mismatch message the active rank sends into the joined rank's replay pairs
    the joined rank's collective (an all_reduce: under syncbn.join every rank sums by
    all_reduce, whatever the cap), else the joined rank waits for its timeout."""
    results = own_pool.run(_with_all_reduce, _skipped_branch, [2, 3], False,
                           timeout=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        assert "syncbn.join" in result["error"], result["error"]
    assert max(r["seconds"] for r in results) < 10  # the group's timeout is 20 s


def _only_rank_0_enters() -> dict[str, Any]:
    os.environ[TIMEOUT_ENV] = "2"
    start = time.monotonic()
    try:
        if dist.get_rank() == 0:
            model = syncbn.convert_sync_batchnorm(_model())
            with syncbn.join(model):
                model(_batch(0, 0))
    except syncbn.SyncBatchNormError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    finally:
        del os.environ[TIMEOUT_ENV]
    return {"error": None, "seconds": time.monotonic() - start}


def test_a_rank_that_does_not_enter_join_is_an_error_within_the_timeout(
        own_pool: harness.DistPool) -> None:
    results = own_pool.run(_only_rank_0_enters, timeout=TIMEOUT_S)
    assert results[1]["error"] is None
    assert "every rank of the job must enter syncbn.join together" in results[0]["error"]
    assert 1.5 < results[0]["seconds"] < 2 + 5, results[0]


def _entry_error(case: str) -> str | None:
    """Enter syncbn.join with groups that cannot work; the error this rank gets."""
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])  # every rank creates it (torch's rule)
    model = syncbn.convert_sync_batchnorm(_model())
    if case == "several" and rank == 1:  # this rank's layers on two groups
        model[4].process_group = pair
    if case == "disagree" and rank == 0:  # rank 0's layers on [0, 1], the others' on all
        model = syncbn.convert_sync_batchnorm(_model(), process_group=pair)
    try:
        with syncbn.join(model):
            pass
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize(("case", "expected"), [
    pytest.param("several", [r"rank\(s\) \[1\] are on several process groups",
                             r"expected the SyncBatchNorm layers of the model to share one "
                             r"process group, got 2",
                             r"rank\(s\) \[1\] are on several process groups"],
                 id="one-rank-on-two-groups"),
    pytest.param("disagree", [r"ranks disagree on the process groups of the model: rank 0 has "
                              r"its SyncBatchNorm layers on ranks \[0, 1\] .*, rank 1 has "
                              r"\[0, 1, 2\] and \[0, 1, 2\]"] * 3, id="ranks-disagree"),
])
def test_groups_that_cannot_join_are_refused_on_every_rank(case: str,
                                                           expected: list[str]) -> None:
    errors = harness.run_ranks(3, _entry_error, case, timeout=TIMEOUT_S)
    for rank, (error, pattern) in enumerate(zip(errors, expected, strict=True)):
        assert error is not None, f"rank {rank} entered"
        with pytest.raises(ValueError, match=pattern):
            raise ValueError(error)


def _first_iterations_differ() -> dict[str, Any]:
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_Branchy())
    start = time.monotonic()
    try:
        with syncbn.join(model):
            if rank > 0:  # rank 0 has no batch; rank 1 runs the extra layer, rank 2 not
                model(_batch(rank, 0), rank - 1).sum().backward()
    except syncbn.SyncBatchNormError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_active_ranks_whose_first_iterations_differ_are_an_error_on_every_rank() -> None:
    # rank 0 has no batch: it replays what ranks 1 and 2 describe, which differs
    results = harness.run_ranks(3, _first_iterations_differ, timeout=TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        with pytest.raises(syncbn.SyncBatchNormError,
                           match=r"describe each SyncBatchNorm collective to it, but they "
                                 r"described different ones \(their layer"):
            raise syncbn.SyncBatchNormError(result["error"])
        assert result["seconds"] < 10, result


def _layer_outside_the_model() -> str | None:
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_model())
    outside = syncbn.SyncBatchNorm(2, name="outside").double()  # on the same (default) group
    try:
        with syncbn.join(model):
            if rank == 1:  # rank 0 has no batch and replays what rank 1 describes
                model(_batch(rank, 0)).sum().backward()
                outside(torch.randn(4, 2, dtype=torch.float64))
    except syncbn.SyncBatchNormError as error:
        return str(error)
    return None


def test_a_layer_outside_the_joined_model_cannot_be_described() -> None:
    errors = harness.run_ranks(2, _layer_outside_the_model, timeout=TIMEOUT_S)
    for rank, error in enumerate(errors):
        assert error is not None, f"rank {rank} did not raise"
        with pytest.raises(syncbn.SyncBatchNormError,
                           match=r"the active ranks' SyncBatchNorm collective \(C=2\) is not one "
                                 r"of the SyncBatchNorm layers of the model given to syncbn.join"):
            raise syncbn.SyncBatchNormError(error)


def test_an_unknown_ddp_is_refused_with_the_way_out() -> None:
    from syncbn._join import _DDPShadow

    with pytest.raises(RuntimeError, match=r"does not know this torch's DistributedDataParallel "
                                           r"\(it shadows DDP's join steps itself; missing "
                                           r"_check_and_sync_module_buffers, .*\); use "
                                           r"DistributedDataParallel.join\(\) with "
                                           r"throw_on_early_termination=True"):
        _DDPShadow(nn.Linear(1, 1), JoinHook())


def _disabled() -> list[int]:
    model = syncbn.convert_sync_batchnorm(_model())
    with syncbn.join(model, enable=False) as ctx:
        model(_batch(dist.get_rank(), 0)).sum().backward()
    assert ctx is not None
    return [int(model[1].num_batches_tracked)]


def test_enable_false_is_a_no_op() -> None:
    assert harness.run_ranks(2, _disabled, timeout=TIMEOUT_S) == [[1], [1]]
