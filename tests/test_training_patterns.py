"""Training patterns users hit, on real gloo groups, against one process on the global batch.

Activation checkpointing (reentrant and not), DDP with unused parameters,
gradient accumulation under ``no_sync``, one layer called twice per step,
deep copies, pickling, ``state_dict`` round trips and ``.to(...)``. The oracle
is the same model with plain ``torch.nn.BatchNorm2d`` in one process, in float64.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import harness
import syncbn

SIZES = (3, 2)  # rows of the global batch on rank 0 and rank 1
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _rows() -> slice:
    rank = dist.get_rank()
    return slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))


def _body(seed: int = 0) -> nn.Sequential:
    """conv → BN → ReLU → conv → BN → ReLU, float64; the BN layers are '1' and '4'."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ).double()


def _batch(index: int, out_channels: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Global input, upstream gradient of the body's output, and class targets."""
    gen = torch.Generator().manual_seed(50 + index)
    n = sum(SIZES)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    dy = torch.randn(n, out_channels, 6, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (n,), generator=gen)
    return x, dy, target


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


# --- activation checkpointing ---------------------------------------------------------------

CHECKPOINT_STEPS = 2
CHECKPOINT_MODES = {"reentrant": (True, False), "non-reentrant": (False, False),
                    "non-reentrant-debug": (False, True)}


def _checkpointed(reentrant: bool, debug: bool) -> dict[str, Any]:
    model = syncbn.convert_sync_batchnorm(_body())
    for module in model.modules():
        if isinstance(module, syncbn.SyncBatchNorm):
            module.debug = debug  # the recompute's collectives must match on every rank
    rows = _rows()
    input_grads = []
    for step in range(CHECKPOINT_STEPS):
        x, dy, _ = _batch(step)
        x = x[rows].clone().requires_grad_()
        y = checkpoint(model, x, use_reentrant=reentrant)
        y.backward(dy[rows])
        input_grads.append(x.grad)
    return {"dx": input_grads, "buffers": _buffers(model),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _plain_steps(model: nn.Module, steps: int, wrap: Callable[..., Tensor] | None = None
                 ) -> list[Tensor]:
    """The oracle's steps on the global batch; ``wrap`` runs the forward (e.g. checkpoint)."""
    input_grads = []
    for step in range(steps):
        x, dy, _ = _batch(step)
        x = x.clone().requires_grad_()
        y = model(x) if wrap is None else wrap(model, x)
        y.backward(dy)
        input_grads.append(x.grad)
    return input_grads


@pytest.mark.parametrize(("reentrant", "debug"), CHECKPOINT_MODES.values(),
                         ids=CHECKPOINT_MODES.keys())
def test_checkpoint_gives_exact_gradients_and_updates_stats_once(reentrant: bool,
                                                                 debug: bool) -> None:
    results = harness.run_ranks(2, _checkpointed, reentrant, debug)
    oracle = _body()
    want_dx = _plain_steps(oracle, CHECKPOINT_STEPS)  # no checkpoint: the reference
    for step, want in enumerate(want_dx):
        torch.testing.assert_close(torch.cat([r["dx"][step] for r in results]), want, **TOL)
    for name, param in oracle.named_parameters():  # local grads sum to the global ones
        torch.testing.assert_close(results[0]["grads"][name] + results[1]["grads"][name],
                                   param.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    for result in results:  # updated once per step, not twice (pytorch#96136)
        for name, value in _buffers(oracle).items():
            torch.testing.assert_close(result["buffers"][name], value, **TOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
        assert result["buffers"]["1.num_batches_tracked"].item() == CHECKPOINT_STEPS


@pytest.mark.parametrize("reentrant", [
    True,
    False,
], ids=["reentrant", "non-reentrant"])
def test_checkpoint_without_a_group_updates_stats_once_unlike_torch(
    reentrant: bool, record_property: Callable[[str, object], None]
) -> None:
    """The local fallback (no process group) keeps the guard; torch's own BatchNorm under
    checkpoint counts every step twice, and its running statistics move twice."""
    model = syncbn.convert_sync_batchnorm(_body())

    def wrap(m: nn.Module, x: Tensor) -> Tensor:
        return checkpoint(m, x, use_reentrant=reentrant)

    got_dx = _plain_steps(model, CHECKPOINT_STEPS, wrap)
    oracle = _body()
    want_dx = _plain_steps(oracle, CHECKPOINT_STEPS)
    for got, want in zip(got_dx, want_dx, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    for name, value in _buffers(oracle).items():
        torch.testing.assert_close(_buffers(model)[name], value, **TOL)
    torch_under_checkpoint = _body()
    _plain_steps(torch_under_checkpoint, CHECKPOINT_STEPS, wrap)
    record_property("torch_num_batches_tracked",
                    _buffers(torch_under_checkpoint)["1.num_batches_tracked"].item())
    record_property("syncbn_num_batches_tracked", _buffers(model)["1.num_batches_tracked"].item())


# --- DDP: unused parameters, no_sync accumulation, one layer called twice ----------------


class _Classifier(nn.Module):
    """The body, pooled, then a head; ``unused``, if any, is never called."""

    def __init__(self, with_unused: bool = False) -> None:
        super().__init__()
        self.body = _body()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.unused = nn.Linear(4, 3) if with_unused else None
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _SharedNorm(nn.Module):
    """One BatchNorm normalizes two branches: it runs twice per step (a siamese pattern)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.left = nn.Conv2d(2, 4, 3, padding=1)
        self.right = nn.Conv2d(2, 4, 5, padding=2)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.norm(self.left(x)))
        b = F.relu(self.norm(self.right(x)))
        return self.head(a + b)


DDP_PATTERNS = {
    # name: (model, DDP keyword arguments, micro-steps per optimizer step)
    "find_unused_parameters": (lambda: _Classifier(with_unused=True),
                               {"find_unused_parameters": True}, 1),
    "no_sync-accumulation": (_Classifier, {}, 3),
    "same-layer-twice": (_SharedNorm, {}, 1),
}
OPTIMIZER_STEPS = 2


def _ddp_train(pattern: str) -> dict[str, Tensor]:
    make, ddp_kwargs, accumulate = DDP_PATTERNS[pattern]
    world = dist.get_world_size()
    model = syncbn.convert_sync_batchnorm(make())
    if pattern == "same-layer-twice":
        model.norm.debug = True  # call counters advance alike on every rank
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    rows = _rows()
    for step in range(OPTIMIZER_STEPS):
        for micro in range(accumulate):
            x, _, target = _batch(step * accumulate + micro)
            last = micro == accumulate - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = F.cross_entropy(ddp(x[rows]), target[rows], reduction="sum")
                # DDP averages over ranks: scale the local sum so that the result is the
                # mean loss over the global batch, averaged over the micro-steps
                (loss * world / (sum(SIZES) * accumulate)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pattern", DDP_PATTERNS)
def test_ddp_pattern_equals_one_process_on_the_global_batch(pattern: str) -> None:
    results = harness.run_ranks(2, _ddp_train, pattern)
    make, _, accumulate = DDP_PATTERNS[pattern]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(OPTIMIZER_STEPS):
        for micro in range(accumulate):
            x, _, target = _batch(step * accumulate + micro)
            (F.cross_entropy(model(x), target) / accumulate).backward()
        opt.step()
        opt.zero_grad()
    for name, want in model.state_dict().items():
        for rank, state in enumerate(results):
            torch.testing.assert_close(state[name], want, **TOL,
                                       msg=lambda m, n=name, r=rank: f"{n} on rank {r}: {m}")
    if pattern == "same-layer-twice":  # as torch: every call is a batch
        assert results[0]["norm.num_batches_tracked"].item() == 2 * OPTIMIZER_STEPS


# --- deepcopy, pickle, state_dict, .to ------------------------------------------------------


def _train_step(model: nn.Module, index: int) -> dict[str, Tensor]:
    model.train()
    x, dy, _ = _batch(index)
    x = x[_rows()].clone().requires_grad_()
    y = model(x)
    y.backward(dy[_rows()])
    return {"y": y.detach(), "dx": x.grad}


def _deepcopy_case() -> dict[str, Any]:
    group = dist.new_group([0, 1])
    model = syncbn.convert_sync_batchnorm(_body(), group)
    model[1].timeout = 30.0
    twin = copy.deepcopy(model)  # e.g. an EMA model
    layer, copied = model[1], twin[1]
    facts = {
        "same_group": copied.process_group is group,
        "own_tensors": copied.weight.data_ptr() != layer.weight.data_ptr()
        and copied.running_mean.data_ptr() != layer.running_mean.data_ptr(),
        "settings": (copied.layer_name, copied.timeout, copied.debug, copied.num_features),
    }
    first, second = _train_step(model, 0), _train_step(twin, 0)  # both sync over the group
    return {**facts, "equal_steps": all(torch.equal(first[k], second[k]) for k in first),
            "equal_buffers": all(torch.equal(a, b) for a, b in
                                 zip(_buffers(model).values(), _buffers(twin).values(),
                                     strict=True))}


def test_deepcopy_shares_the_process_group_and_copies_the_rest() -> None:
    for result in harness.run_ranks(2, _deepcopy_case):
        assert result["same_group"], "a process group is a handle: copies must share it"
        assert result["own_tensors"]
        assert result["settings"] == ("1", 30.0, None, 4)
        assert result["equal_steps"] and result["equal_buffers"]


def _pickle_case() -> dict[str, Any]:
    group = dist.new_group([0, 1])
    model = syncbn.convert_sync_batchnorm(_body(), group)
    _train_step(model, 0)
    world_model = syncbn.convert_sync_batchnorm(_body())  # process_group=None: the world
    loaded = pickle.loads(pickle.dumps(model))
    loaded_world = pickle.loads(pickle.dumps(world_model))
    facts: dict[str, Any] = {"group_dropped": loaded[1].process_group is None,
                             "name_kept": loaded[1].layer_name}
    x, _, _ = _batch(5)
    with torch.no_grad():  # eval needs no group
        facts["eval_equal"] = torch.equal(loaded.eval()(x[_rows()]), model.eval()(x[_rows()]))
    try:
        _train_step(loaded, 1)
        facts["train_error"] = None
    except ValueError as error:
        facts["train_error"] = str(error)
    syncbn.convert_sync_batchnorm(loaded, group)  # give the group back
    after = _train_step(loaded, 1), _train_step(model, 1)
    facts["resumed_equal"] = all(torch.equal(after[0][k], after[1][k]) for k in after[0])
    world_steps = _train_step(loaded_world, 2), _train_step(world_model, 2)
    facts["world_equal"] = all(torch.equal(world_steps[0][k], world_steps[1][k])
                               for k in world_steps[0])
    return facts


def test_pickle_drops_a_custom_group_and_training_asks_for_it() -> None:
    for result in harness.run_ranks(2, _pickle_case):
        assert result["group_dropped"] and result["name_kept"] == "1"
        assert result["eval_equal"]
        assert result["train_error"] is not None and result["train_error"].startswith(
            "SyncBatchNorm '1' was unpickled, and its process group could not travel with it"
        ), result
        assert "convert_sync_batchnorm(model, process_group)" in result["train_error"]
        assert result["resumed_equal"]  # with the group back, it is the same layer again
        assert result["world_equal"]  # no custom group: nothing lost, nothing to restore


@pytest.mark.parametrize("cause", ["unpickled-without-its-group", "group-without-default-group"])
def test_refused_training_forward_leaves_the_layer_unchanged(cause: str) -> None:
    assert not dist.is_initialized()
    layer = syncbn.SyncBatchNorm(3, process_group=dist.ProcessGroup(dist.HashStore(), 0, 1))
    if cause == "unpickled-without-its-group":
        layer = pickle.loads(pickle.dumps(layer))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"unpickled|not initialized"):
        layer(torch.randn(4, 3))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert layer._syncbn_calls == 0


def _resume_case() -> dict[str, Any]:
    """Train, checkpoint the state_dict, resume in a fresh model: the same next step."""
    model = syncbn.convert_sync_batchnorm(_body())
    for step in range(2):
        _train_step(model, step)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = syncbn.convert_sync_batchnorm(_body(seed=9))  # different init, overwritten
    resumed.load_state_dict(state)
    plain, torch_sync = _body(), nn.SyncBatchNorm.convert_sync_batchnorm(_body())
    plain.load_state_dict(state)  # both ways: syncbn ↔ BatchNorm2d ↔ torch.nn.SyncBatchNorm
    torch_sync.load_state_dict(state)
    back = syncbn.convert_sync_batchnorm(_body(seed=9))
    back.load_state_dict(torch_sync.state_dict())
    nxt = _train_step(model, 2), _train_step(resumed, 2), _train_step(back, 2)
    return {"resumed_equal": all(torch.equal(nxt[0][k], nxt[1][k]) for k in nxt[0]),
            "back_equal": all(torch.equal(nxt[0][k], nxt[2][k]) for k in nxt[0]),
            "keys": list(state), "plain_keys": list(plain.state_dict())}


def test_state_dict_round_trip_resumes_training_exactly() -> None:
    for result in harness.run_ranks(2, _resume_case):
        assert result["keys"] == result["plain_keys"]
        assert result["resumed_equal"] and result["back_equal"]


def _to_case() -> dict[str, Any]:
    group = dist.new_group([0, 1])
    layer = syncbn.SyncBatchNorm(4, process_group=group, timeout=30.0, debug=True)
    layer._syncbn_name = "block.bn"
    facts: dict[str, Any] = {}
    for label, convert in (("to-cpu", lambda m: m.to("cpu")),
                           ("to-float64", lambda m: m.to(torch.float64)),
                           ("double", lambda m: m.double()),
                           ("to-bfloat16", lambda m: m.to(torch.bfloat16)),
                           ("to-cpu-float32", lambda m: m.to("cpu", torch.float32))):
        out = convert(layer)
        facts[label] = {
            "same_object": out is layer,
            "kept": (out.process_group is group, out.timeout, out.debug, out.layer_name),
            "dtypes": (str(out.weight.dtype), str(out.running_var.dtype),
                       str(out.num_batches_tracked.dtype)),
        }
    layer.double()
    model = nn.Sequential(_body()[0], layer)  # a float64 layer after .double() still syncs
    facts["step"] = _train_step(model, 0)
    facts["bn_state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return facts


def test_to_device_and_dtype_keep_the_group_and_settings() -> None:
    results = harness.run_ranks(2, _to_case)
    float_dtypes = {"to-cpu": "torch.float32", "to-float64": "torch.float64",
                    "double": "torch.float64", "to-bfloat16": "torch.bfloat16",
                    "to-cpu-float32": "torch.float32"}
    for result in results:
        for label, dtype in float_dtypes.items():
            facts = result[label]
            assert facts["same_object"] and facts["kept"] == (True, 30.0, True, "block.bn"), label
            assert facts["dtypes"] == (dtype, dtype, "torch.int64"), label
    oracle = nn.Sequential(_body()[0], nn.BatchNorm2d(4).double())
    x, dy, _ = _batch(0)
    x = x.clone().requires_grad_()
    y = oracle(x)
    y.backward(dy)
    torch.testing.assert_close(torch.cat([r["step"]["y"] for r in results]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["step"]["dx"] for r in results]), x.grad, **TOL)
    for name, value in oracle[1].state_dict().items():
        torch.testing.assert_close(results[0]["bn_state"][name], value, **TOL)
