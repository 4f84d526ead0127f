"""Masked statistics (``mask=``) against the float64 oracle: autograd of the formula.

The oracle, in one process on the concatenated global batch: μ and the biased σ² over
the True positions of every rank, every position normalized with them,
``y = f(w·(x − μ)/√(σ² + eps) + β)``, gradients by autograd through μ and σ², running
statistics with the unbiased variance over the global valid count (untouched when that
count is at most 1). The layers run on real gloo ranks (tests/harness.py); each task
checks many configurations at once to keep the module fast on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import harness
import syncbn
from syncbn import _comm

C = 3
EPS = 1e-5
TIMEOUT_S = 60.0

# --- cases: every rank builds its own inputs from the case, the test rebuilds all of them ---

CASES: dict[str, dict[str, Any]] = {
    "ncl": dict(shape=(4, C, 7), mask="random"),
    "nchw-cl-rank1-masked": dict(shape=(3, C, 4, 5), mask="rank1-none", channels_last=True),
    "ncl-uneven-empty": dict(shape=(4, C, 6), mask="random", uneven=True),
    "bf16": dict(shape=(4, C, 9), mask="lengths", dtype=torch.bfloat16),
    "fp16-nchw": dict(shape=(2, C, 3, 4), mask="random", dtype=torch.float16),
    "momentum-none": dict(shape=(4, C, 5), mask="random", momentum=None),
    "affine-false": dict(shape=(3, C, 5), mask="lengths", affine=False),
    "untracked": dict(shape=(3, C, 5), mask="random", track=False),
    "inplace-leaky": dict(shape=(4, C, 6), mask="rank1-none", inplace=True),
    "inplace-leaky-nchw": dict(shape=(2, C, 3, 3), mask="random", inplace=True,
                               channels_last=True),
    # σ² = 0, so invstd = 1/√eps ≈ 316 amplifies rounding: a looser float64 tolerance
    "one-valid": dict(shape=(2, C, 4), mask="one-valid", tol=1e-8),
}


def _batch(case: dict[str, Any], rank: int) -> int:
    n = case["shape"][0]
    if case.get("uneven"):
        return [n, 0, 1][rank % 3] if rank else n  # rank 1 empty, rank 2 one sample
    return n


def make_inputs(case: dict[str, Any], step: int, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, mask, g)`` of ``rank`` at ``step``: input (its dtype), bool mask, float64 upstream
    gradient weights (the loss is ``Σ y·g``)."""
    shape = (_batch(case, rank), *case["shape"][1:])
    gen = torch.Generator().manual_seed(1000 * step + 17 * rank + len(case["mask"]))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    spatial = (shape[0], *shape[2:])
    kind = case["mask"]
    if kind == "random":
        mask = torch.rand(spatial, generator=gen) < 0.7
    elif kind == "rank1-none":
        mask = torch.rand(spatial, generator=gen) < 0.7
        if rank == 1:
            mask = torch.zeros(spatial, dtype=torch.bool)
    elif kind == "lengths":
        length = shape[2]
        lengths = torch.randint(1, length + 1, (shape[0],), generator=gen)
        mask = torch.arange(length) < lengths[:, None]
        mask = mask.view(shape[0], length, *([1] * (len(shape) - 3))).expand(spatial)
        mask = mask.contiguous()
    elif kind == "one-valid":  # a global valid count of 1: only rank 0, position 0
        mask = torch.zeros(spatial, dtype=torch.bool)
        if rank == 0:
            mask.view(-1)[0] = True
    elif kind == "none-valid":
        mask = torch.zeros(spatial, dtype=torch.bool)
    elif kind == "all":
        mask = torch.ones(spatial, dtype=torch.bool)
    else:
        raise AssertionError(kind)
    dtype = case.get("dtype", torch.float64)
    return x.to(dtype), mask, g


def _layer_dtype(case: dict[str, Any]) -> torch.dtype:
    return torch.float64 if case.get("dtype", torch.float64) == torch.float64 else torch.float32


def init_params(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return (1 + 0.5 * torch.rand(C, generator=gen, dtype=torch.float64),
            torch.randn(C, generator=gen, dtype=torch.float64))


def _make_layer(case: dict[str, Any]) -> syncbn.SyncBatchNorm:
    extra: dict[str, Any] = {}
    if case.get("inplace"):
        extra = dict(activation="leaky_relu", activation_param=0.2, inplace=True)
    layer = syncbn.SyncBatchNorm(C, eps=EPS, momentum=case.get("momentum", 0.1),
                                 affine=case.get("affine", True),
                                 track_running_stats=case.get("track", True), **extra)
    layer = layer.to(_layer_dtype(case))
    if layer.affine:
        w, b = init_params(case)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    with torch.no_grad():  # a non-trivial starting point for the running statistics
        assert layer.running_mean is not None or not case.get("track", True)
        if layer.running_mean is not None and layer.running_var is not None:
            layer.running_mean.fill_(0.5)
            layer.running_var.fill_(2.0)
    return layer


STEPS = 2


def run_layer(case: dict[str, Any], rank: int) -> dict[str, Any]:
    """Two training steps of the case on this rank: outputs, gradients, final buffers."""
    layer = _make_layer(case)
    steps = []
    for step in range(STEPS):
        x, mask, g = make_inputs(case, step, rank)
        if case.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
            g = g.contiguous(memory_format=torch.channels_last)
        leaf = x.clone().requires_grad_()
        fed = leaf.clone() if case.get("inplace") else leaf  # the in-place mode needs a non-leaf
        y = layer(fed, mask)
        assert y.dtype == x.dtype and y.shape == x.shape
        if case.get("channels_last"):
            assert y.is_contiguous(memory_format=torch.channels_last)
        (y.double() * g).sum().backward()
        assert leaf.grad is not None
        steps.append(dict(
            y=y.detach().double(), dx=leaf.grad.double(),
            dw=None if layer.weight is None else layer.weight.grad.clone(),  # type: ignore[union-attr]
            db=None if layer.bias is None else layer.bias.grad.clone(),  # type: ignore[union-attr]
        ))
        layer.zero_grad(set_to_none=True)
    buffers = {k: v.clone() for k, v in layer.state_dict().items()}
    return dict(steps=steps, buffers=buffers)


def oracle(case: dict[str, Any], world: int) -> dict[str, Any]:
    """The formula in float64 on the concatenated batch, differentiated by autograd."""
    track = case.get("track", True)
    momentum = case.get("momentum", 0.1)
    running_mean = torch.full((C,), 0.5, dtype=torch.float64)
    running_var = torch.full((C,), 2.0, dtype=torch.float64)
    steps = []
    for step in range(STEPS):
        parts = [make_inputs(case, step, r) for r in range(world)]
        xs = [p[0].double().requires_grad_() for p in parts]
        x = torch.cat(xs)
        mask = torch.cat([p[1] for p in parts])
        g = torch.cat([p[2] for p in parts])
        w, b = init_params(case)
        affine = case.get("affine", True)
        w.requires_grad_(affine)
        b.requires_grad_(affine)
        m = mask.unsqueeze(1).double()
        dims = [0, *range(2, x.dim())]
        n = m.sum(dims, keepdim=True)
        mean = (x * m).sum(dims, keepdim=True) / n.clamp_min(1)
        var = (((x - mean) * m) ** 2).sum(dims, keepdim=True) / n.clamp_min(1)
        view = (1, C, *([1] * (x.dim() - 2)))
        z = (x - mean) / torch.sqrt(var + EPS)
        if affine:
            z = z * w.view(view) + b.view(view)
        y = F.leaky_relu(z, 0.2) if case.get("inplace") else z
        (y * g).sum().backward()
        sizes = [p[0].size(0) for p in parts]
        steps.append(dict(
            ys=list(y.detach().split(sizes)), dxs=[t.grad for t in xs],
            dw=w.grad if affine else None, db=b.grad if affine else None))
        count = float(n.flatten()[0])
        if track and count > 1:
            factor = 1.0 / (step + 1) if momentum is None else momentum
            unbiased = var.flatten() * count / (count - 1)
            running_mean = (1 - factor) * running_mean + factor * mean.detach().flatten()
            running_var = (1 - factor) * running_var + factor * unbiased.detach()
    return dict(steps=steps, running_mean=running_mean, running_var=running_var)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the oracle's scale (at least 1e-3)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-3))


def _tolerance(case: dict[str, Any]) -> float:
    """16-bit: the output and the upstream gradient are rounded to the input dtype (bf16: 8
    bits), the statistics are float32."""
    if "tol" in case:
        return float(case["tol"])
    return {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(case.get("dtype", torch.float64),
                                                           1e-10)


def check_case(name: str, results: list[dict[str, Any]]) -> None:
    case = CASES[name]
    world = len(results)
    want = oracle(case, world)
    tol = _tolerance(case)
    for step, expected in enumerate(want["steps"]):
        for rank, got in enumerate(results):
            s = got["steps"][step]
            assert torch.isfinite(s["y"]).all() and torch.isfinite(s["dx"]).all(), name
            assert _rel(s["y"], expected["ys"][rank]) <= tol, (name, step, rank, "y")
            assert _rel(s["dx"], expected["dxs"][rank]) <= tol, (name, step, rank, "dx")
        if expected["dw"] is not None:
            # DDP would sum the per-rank parameter gradients: so does the oracle's
            dw = sum(r["steps"][step]["dw"] for r in results)
            db = sum(r["steps"][step]["db"] for r in results)
            assert _rel(dw, expected["dw"]) <= tol, (name, step, "dw")
            assert _rel(db, expected["db"]) <= tol, (name, step, "db")
        else:
            assert all(r["steps"][step]["dw"] is None for r in results)
    for rank, got in enumerate(results):
        buffers = got["buffers"]
        if not case.get("track", True):
            assert "running_mean" not in buffers, name
            continue
        assert int(buffers["num_batches_tracked"]) == STEPS
        for key in ("running_mean", "running_var"):
            assert buffers[key].dtype == _layer_dtype(case)
            # 16-bit inputs: float32 statistics of the same values, rounded once
            assert _rel(buffers[key], want[key]) <= (1e-5 if tol > 1e-8 else tol), (
                name, rank, key)
            assert torch.equal(buffers[key], results[0]["buffers"][key]), (name, key)


def _cases_task(names: list[str]) -> dict[str, dict[str, Any]]:
    rank = dist.get_rank()
    return {name: run_layer(CASES[name], rank) for name in names}


@pytest.mark.parametrize("world", [2, 3])
def test_masked_layer_matches_float64_oracle(world: int) -> None:
    names = list(CASES)
    results = harness.run_ranks(world, _cases_task, names, timeout=TIMEOUT_S)
    for name in names:
        check_case(name, [r[name] for r in results])


def test_one_valid_position_leaves_running_stats_unchanged() -> None:
    """A global valid count of 1 (as 0) keeps the running buffers (the docstring says so)."""
    assert "count of 0 or 1 leaves the running buffers unchanged" in " ".join(
        (syncbn.functional.sync_batch_norm.__doc__ or "").split())
    want = oracle(CASES["one-valid"], 2)
    assert torch.equal(want["running_var"], torch.full((C,), 2.0, dtype=torch.float64))


# --- no valid position anywhere, bitwise agreement with the unmasked path, eval ---

def _edge_task() -> dict[str, Any]:
    rank = dist.get_rank()
    facts: dict[str, Any] = {}
    # global valid count 0: finite everywhere, buffers unchanged (one rank even empty)
    for label, n in (("none-valid", 3), ("none-valid-empty", 0 if rank else 3)):
        layer = syncbn.SyncBatchNorm(C, momentum=None).double()
        layer.running_var.fill_(2.0)  # type: ignore[union-attr]
        x = (torch.randn(n, C, 5, dtype=torch.float64) * 3).requires_grad_()
        y = layer(x, torch.zeros(n, 5, dtype=torch.bool))
        y.square().sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        facts[label] = dict(
            finite=bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all()
                        and torch.isfinite(layer.weight.grad).all()),
            mean=layer.running_mean.clone(), var=layer.running_var.clone(),  # type: ignore[union-attr]
        )
    facts["bitwise"] = _bitwise_facts(rank)
    return facts


def _unmasked_vs_masked(x: torch.Tensor, masks: list[torch.Tensor | None],
                        layer_dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    outs = []
    for mask in masks:
        torch.manual_seed(0)
        layer = syncbn.SyncBatchNorm(x.size(1)).to(layer_dtype)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
        leaf = x.clone().requires_grad_()
        y = layer(leaf, mask)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        assert leaf.grad is not None and layer.weight.grad is not None
        outs.append((y.detach(), leaf.grad, layer.weight.grad, layer.bias.grad,
                     layer.running_mean.clone(), layer.running_var.clone()))  # type: ignore[union-attr]
    return outs


def _bitwise_facts(rank: int) -> dict[str, Any]:
    """``mask=None`` against an all-True mask: bitwise equal, or the largest difference."""
    facts: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(3 + rank)
    for label, shape, dtype, cl in (
        ("f32-ncl", (4, C, 7), torch.float32, False),
        ("f64-nchw", (2, C, 3, 4), torch.float64, False),
        ("f32-nchw-cl", (2, C, 3, 4), torch.float32, True),
        ("bf16-ncl", (4, C, 7), torch.bfloat16, False),
    ):
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        mask = torch.ones(shape[0], *shape[2:], dtype=torch.bool)
        plain, masked = _unmasked_vs_masked(x, [None, mask],
                                            torch.float64 if dtype == torch.float64
                                            else torch.float32)
        facts[label] = [(torch.equal(a, b), _rel(a, b)) for a, b in zip(plain, masked,
                                                                           strict=True)]
    return facts


BITWISE_ON_RANKS: tuple[str, ...] = ()
"""The unmasked steady state (``_step``) reduces with ``var_mean`` (or two sums on large
inputs), the masked path with a select and two sums: another summation order, so the two
agree to rounding (float64 to 1e-12), not bitwise."""


def test_edge_cases_on_two_ranks() -> None:
    results = harness.run_ranks(2, _edge_task, timeout=TIMEOUT_S)
    for facts in results:
        for label in ("none-valid", "none-valid-empty"):
            assert facts[label]["finite"], label
            assert torch.equal(facts[label]["mean"], torch.zeros(C, dtype=torch.float64))
            assert torch.equal(facts[label]["var"], torch.full((C,), 2.0, dtype=torch.float64))
        for label, pairs in facts["bitwise"].items():
            if label in BITWISE_ON_RANKS:
                assert all(equal for equal, _ in pairs), (label, pairs)
            else:
                tol = 2e-2 if label.startswith("bf16") else (
                    1e-12 if label.startswith("f64") else 1e-5)
                assert all(diff <= tol for _, diff in pairs), (label, pairs)


def test_all_true_mask_on_one_process_agrees_to_rounding() -> None:
    """One process: ``mask=None`` is exactly ``F.batch_norm`` (the local fallback), a mask
    always runs the core (``F.batch_norm`` takes none), whose statistics are summed
    differently: the two agree to a few ulps, not bitwise. Documented, asserted exactly so."""
    x = torch.randn(4, C, 7, dtype=torch.float64) * 2 + 1
    mask = torch.ones(4, 7, dtype=torch.bool)
    plain, masked = _unmasked_vs_masked(x, [None, mask], torch.float64)
    reference = nn.BatchNorm1d(C).double()
    with torch.no_grad():
        torch.manual_seed(0)
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    assert torch.equal(plain[0], reference(x).detach())  # mask=None: torch's own kernel
    for a, b in zip(plain, masked, strict=True):
        assert _rel(b, a) <= 1e-13
    # the comparison can fail: one position fewer changes the result
    partial = mask.clone()
    partial[0, 0] = False
    (other,) = _unmasked_vs_masked(x, [partial], torch.float64)
    assert not torch.equal(other[0], masked[0])


def _eval_task() -> dict[str, Any]:
    rank = dist.get_rank()
    if rank != 0:  # rank 1 joins nothing: a collective on rank 0 would fail or hang
        return {}
    original = _comm.all_reduce_checked

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("eval communicated")

    _comm.all_reduce_checked = refuse  # type: ignore[assignment]
    try:
        layer = syncbn.SyncBatchNorm(C).double()
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            layer.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
        layer.eval()
        x = torch.randn(3, C, 6, dtype=torch.float64)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        plain = layer(x)
        masked = layer(x, torch.rand(3, 6) < 0.5)
        none_valid = layer(x, torch.zeros(3, 6, dtype=torch.bool))
        after = layer.state_dict()
        return dict(same=torch.equal(plain, masked) and torch.equal(plain, none_valid),
                    untouched=all(torch.equal(before[k], after[k]) for k in before))
    finally:
        _comm.all_reduce_checked = original  # type: ignore[assignment]


def test_eval_ignores_the_mask_and_communicates_nothing() -> None:
    facts = harness.run_ranks(2, _eval_task, timeout=TIMEOUT_S)[0]
    assert facts == dict(same=True, untouched=True)


# --- bad masks ---

@pytest.mark.parametrize(("mask", "error", "match"), [
    (torch.ones(4, 6, dtype=torch.bool), ValueError, r"expected mask of shape \(4, 7\)"),
    (torch.ones(4, 1, 7, dtype=torch.bool), ValueError, r"expected mask of shape \(4, 7\)"),
    (torch.ones(4, 7), TypeError, r"bool tensor .*got torch.float32"),
    (torch.ones(4, 7, dtype=torch.uint8), TypeError, r"bool tensor .*got torch.uint8"),
    ([[True] * 7] * 4, TypeError, r"bool tensor of shape \(4, 7\)"),
    (torch.ones(4, 7, dtype=torch.bool, device="meta"), ValueError,
     r"mask on the input's device cpu, got meta"),
])
@pytest.mark.parametrize("training", [True, False])
def test_bad_masks_are_refused_naming_the_expected_shape(mask: Any, error: type[Exception],
                                                         match: str, training: bool) -> None:
    layer = syncbn.SyncBatchNorm(C).train(training)
    x = torch.randn(4, C, 7)
    with pytest.raises(error, match=match):
        layer(x, mask)
    with pytest.raises(error, match=match):
        syncbn.functional.sync_batch_norm(x, layer.running_mean, layer.running_var,
                                          training=training, mask=mask)


def test_paddle_flavour_takes_no_mask() -> None:
    """Paddle has no mask argument, nor does its flavour here (docs/paddle_mapping.md)."""
    from syncbn import paddle_compat as pnn

    x = torch.randn(4, C, 7)
    with pytest.raises(TypeError, match="positional argument"):
        pnn.SyncBatchNorm(C)(x, torch.ones(4, 7, dtype=torch.bool))


# --- DDP and torch.compile ---

class Net(nn.Module):
    """conv1d → masked SyncBatchNorm → leaky_relu → conv1d → masked SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = syncbn.SyncBatchNorm(4)
        self.conv2 = nn.Conv1d(4, 3, 1)
        self.bn2 = syncbn.SyncBatchNorm(3, momentum=None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x), mask), 0.1)
        return self.bn2(self.conv2(h), mask)


def _net() -> Net:
    torch.manual_seed(11)
    return Net().double()


def _train_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    n = 3 + rank  # uneven batches
    x = torch.randn(n, 2, 8, generator=gen, dtype=torch.float64) + 1
    lengths = torch.randint(0 if rank else 1, 9, (n,), generator=gen)
    if step == 1 and rank == 1:
        lengths.zero_()  # a fully masked rank
    return x, torch.arange(8) < lengths[:, None]


def _masked_loss(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (out.square() * mask.unsqueeze(1)).sum()


def _oracle_bn(bn: syncbn.SyncBatchNorm, x: torch.Tensor, mask: torch.Tensor,
               step: int) -> torch.Tensor:
    """The formula on the global batch, float64, autograd; updates ``bn``'s buffers."""
    m = mask.unsqueeze(1).double()
    n = m.sum()
    mean = (x * m).sum((0, 2), keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum((0, 2), keepdim=True) / n
    factor = 1.0 / (step + 1) if bn.momentum is None else bn.momentum
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.mul_(1 - factor).add_(factor * mean.flatten())
        bn.running_var.mul_(1 - factor).add_(factor * var.flatten() * n / (n - 1))
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1) + bn.bias.view(
        1, -1, 1)


def _oracle_training(world: int, steps: int, lr: float) -> dict[str, torch.Tensor]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(steps):
        batches = [_train_batch(step, r) for r in range(world)]
        x = torch.cat([b[0] for b in batches])
        mask = torch.cat([b[1] for b in batches])
        h = F.leaky_relu(_oracle_bn(net.bn1, net.conv1(x), mask, step), 0.1)
        out = _oracle_bn(net.bn2, net.conv2(h), mask, step)
        opt.zero_grad()
        (_masked_loss(out, mask) / world).backward()  # DDP averages the ranks' gradients
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def _ddp_task(steps: int, lr: float) -> dict[str, torch.Tensor]:
    rank = dist.get_rank()
    net = _net()
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    for step in range(steps):
        x, mask = _train_batch(step, rank)
        opt.zero_grad()
        _masked_loss(ddp(x, mask), mask).backward()
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_ddp_training_with_masks_matches_single_process_oracle() -> None:
    steps, lr = 3, 0.05
    results = harness.run_ranks(2, _ddp_task, steps, lr, timeout=TIMEOUT_S)
    want = _oracle_training(2, steps, lr)
    for state in results:
        assert state.keys() == want.keys()
        for key, value in want.items():
            if key.endswith("num_batches_tracked"):
                assert int(state[key]) == steps
            else:
                assert _rel(state[key], value) <= 1e-10, key
            assert torch.equal(state[key], results[0][key]), key


def _compile_task() -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.reset()
    rank = dist.get_rank()
    eager, compiled_from = _net(), _net()
    compiled = torch.compile(compiled_from, fullgraph=True)
    worst = 0.0
    for step in range(2):
        x, mask = _train_batch(step, rank)
        out_e = eager(x, mask)
        out_c = compiled(x, mask)
        worst = max(worst, _rel(out_c, out_e))
        _masked_loss(out_e, mask).backward()
        _masked_loss(out_c, mask).backward()
    for (key, a), b in zip(eager.state_dict().items(), compiled_from.state_dict().values(),
                           strict=True):
        worst = max(worst, _rel(b, a)) if a.is_floating_point() else worst
        assert torch.equal(a, b) or a.is_floating_point(), key
    for a, b in zip(eager.parameters(), compiled_from.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        worst = max(worst, _rel(b.grad, a.grad))
    return dict(worst=worst)


@pytest.mark.slow
def test_compiled_masked_model_matches_eager_on_two_ranks() -> None:
    for facts in harness.run_ranks(2, _compile_task, timeout=240.0):
        assert facts["worst"] <= 1e-9, facts
