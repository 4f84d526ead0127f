"""torch.compile: syncbn layers compile with fullgraph=True, forward and backward, and match eager.

Every multi-rank case runs on 2 real gloo ranks and compares against single-process
eager ``torch.nn.BatchNorm`` on the concatenated global batch (parameters, running
statistics, outputs), in float64 where the comparison should be exact. Compiling is
slow on this machine (seconds per graph), so each case compiles one model that holds
many layer kinds at once (1d on 2-D and 3-D inputs, 2d channels_last, 3d, affine=False,
momentum=None, track_running_stats=False, a fused activation) and checks everything
on it. ``fullgraph=True`` turns any graph break into an error; after the first step
``torch._dynamo.config.error_on_recompile`` turns any recompile into one too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import harness
import syncbn
from syncbn import paddle_compat as pnn

pytestmark = pytest.mark.slow

STEPS = 3
LR = 0.1
TIMEOUT_S = 240.0  # a task compiles a few graphs: tens of seconds on 2 shared cores


class Pointwise(nn.Module):
    """A 1×1 convolution as an einsum: inductor's convolution_backward mis-strides the weight
    gradient of an empty batch (plain torch, no syncbn involved), so empty ranks use this."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3) / 3)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,dc->ndhw", x, self.weight) + self.bias.view(1, -1, 1, 1)


class Zoo(nn.Module):
    """Many BatchNorm configurations in one graph; ``checkpointed`` wraps a block in a
    non-reentrant activation checkpoint."""

    conv: nn.Module

    def __init__(self, checkpointed: bool = False, pointwise: bool = False) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.conv = Pointwise() if pointwise else nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.2)
        self.bn2d_plain = nn.BatchNorm2d(4, affine=False, momentum=None)
        self.bn3d = nn.BatchNorm3d(4)
        self.bn1d = nn.BatchNorm1d(4, momentum=0.3)
        self.bn1d_untracked = nn.BatchNorm1d(4, track_running_stats=False)
        self.head = nn.Linear(4, 2)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2d_plain(self.act(self.bn2d(self.conv(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        h = self.bn3d(h.unsqueeze(2)).squeeze(2)
        seq = self.bn1d(h.flatten(2))  # (N, C, L)
        flat = self.bn1d_untracked(seq.mean(2))  # (N, C)
        return self.head(flat + seq.amax(2))


def _zoo(seed: int = 0, checkpointed: bool = False, pointwise: bool = False) -> Zoo:
    torch.manual_seed(seed)
    model = Zoo(checkpointed, pointwise).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def _fuse_activation(model: nn.Module) -> nn.Module:
    """Fold the converted ``bn2d`` + LeakyReLU into one layer with a fused activation."""
    layer = model.bn2d
    fused = syncbn.SyncBatchNorm(4, activation="leaky_relu", activation_param=0.2,
                                 name="bn2d").double()
    fused.load_state_dict(layer.state_dict())
    fused.weight, fused.bias = layer.weight, layer.bias
    model.bn2d, model.act = fused, nn.Identity()
    return model


def _batches(sizes: list[int], step: int, channels_last: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    batches = []
    for size in sizes:
        x = torch.randn(size, 3, 6, 5, generator=gen, dtype=torch.float64) * 2 + 3
        batches.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return batches


def _train(model: nn.Module, step_fn: Callable[[torch.Tensor], torch.Tensor],
           inputs: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    outs = []
    for x in inputs:
        optim.zero_grad()
        out = step_fn(x)
        (out.square().sum() * scale).backward()
        optim.step()
        outs.append(out.detach())
    return outs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def _oracle(sizes: list[int], pointwise: bool = False) -> dict[str, Any]:
    """One process, eager torch.nn.BatchNorm on the concatenated global batch.

    Each rank's loss is the sum over its rows, and DDP averages gradients over W ranks,
    so the global loss is scaled by 1/W. No checkpoint here: eager torch BatchNorm
    would update its running statistics twice under one (pytorch#96136); syncbn
    updates them once, checkpointed or not.
    """
    model = _zoo(pointwise=pointwise)
    inputs = [torch.cat(_batches(sizes, step)) for step in range(STEPS)]
    outs = _train(model, model, inputs, scale=1.0 / len(sizes))
    return {"state": _state(model), "outs": outs}


@pytest.fixture(autouse=True)
def _quiet_dynamo() -> Iterator[None]:
    yield
    torch._dynamo.reset()


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.config.error_on_recompile = False


def _run_steps(model: nn.Module, step_fn: Callable[[torch.Tensor], torch.Tensor],
               inputs: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    outs = []
    for index, x in enumerate(inputs):
        optim.zero_grad()
        out = step_fn(x)
        (out.square().sum() * scale).backward()
        optim.step()
        outs.append(out.detach())
        if index == 0:
            torch._dynamo.config.error_on_recompile = True  # steps 2.. must reuse the graphs
    torch._dynamo.config.error_on_recompile = False
    return outs


SETUPS = ("compile", "ddp-of-compiled", "compiled-ddp", "compiled-autograd", "checkpoint")


def _setup_case(setup: str, sizes: list[int], pointwise: bool = False) -> dict[str, Any]:
    """Train the zoo 3 steps on this rank's shard in one compiled setup.

    ``pointwise`` (for empty ranks) replaces the stem convolution, see :class:`Pointwise`.
    """
    _fresh_dynamo()
    rank = dist.get_rank()
    model = syncbn.convert_sync_batchnorm(_zoo(checkpointed=setup == "checkpoint",
                                               pointwise=pointwise))
    inputs = [_batches(sizes, step)[rank] for step in range(STEPS)]
    counters = torch._dynamo.utils.counters
    counters.clear()
    if setup == "ddp-of-compiled":
        ddp = DistributedDataParallel(torch.compile(model, fullgraph=True))
        outs = _run_steps(ddp, ddp, inputs)
    elif setup == "compiled-ddp":  # DDPOptimizer splits the graph at bucket boundaries
        ddp = DistributedDataParallel(model)
        compiled = torch.compile(ddp)
        outs = _run_steps(ddp, compiled, inputs)
    else:
        compiled = torch.compile(model, fullgraph=True)
        if setup == "compiled-autograd":  # the backward graph compiled too
            with torch._dynamo.compiled_autograd._enable(torch.compile):
                outs = _run_steps_allreduce(model, compiled, inputs)
        else:
            outs = _run_steps_allreduce(model, compiled, inputs)
    reasons = list(counters["graph_break"])
    if setup == "compiled-ddp":  # DDP's own forward breaks the graph (its Logger, hooks)
        reasons = [r for r in reasons if "syncbn" in r.lower() or "SyncBatchNorm" in r]
    return {"state": _state(model), "outs": outs, "graph_breaks": len(reasons),
            "reasons": reasons}


def _run_steps_allreduce(model: nn.Module, step_fn: Callable[[torch.Tensor], torch.Tensor],
                         inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Like DDP: average the gradients over the ranks after each backward."""
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    world = dist.get_world_size()
    outs = []
    for index, x in enumerate(inputs):
        optim.zero_grad()
        out = step_fn(x)
        out.square().sum().backward()
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world
        optim.step()
        outs.append(out.detach())
        if index == 0:
            torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.error_on_recompile = False
    return outs


def _assert_matches_oracle(results: list[dict[str, Any]], sizes: list[int],
                           rtol: float = 1e-9, pointwise: bool = False) -> None:
    want = _oracle(sizes, pointwise)
    for rank, result in enumerate(results):
        assert result["graph_breaks"] == 0, result["reasons"]
        for name, value in want["state"].items():
            torch.testing.assert_close(result["state"][name], value, rtol=rtol, atol=rtol,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
        start = sum(sizes[:rank])
        for step, out in enumerate(result["outs"]):
            torch.testing.assert_close(out, want["outs"][step][start:start + sizes[rank]],
                                       rtol=rtol, atol=rtol)


@pytest.mark.parametrize("setup", SETUPS)
def test_compiled_training_equals_eager_batchnorm_on_the_global_batch(setup: str) -> None:
    sizes = [3, 2]  # uneven
    results = harness.run_ranks(2, _setup_case, setup, sizes, timeout=TIMEOUT_S)
    _assert_matches_oracle(results, sizes)


def test_compiled_training_with_an_empty_rank() -> None:
    sizes = [4, 0]
    results = harness.run_ranks(2, _setup_case, "compile", sizes, True, timeout=TIMEOUT_S)
    _assert_matches_oracle(results, sizes, pointwise=True)


# --- fused activation, in-place mode, eval, masks, Paddle flavour: one compiled model each ---


def _variants_case() -> dict[str, Any]:
    """Several layer modes, each compiled with fullgraph=True, against eager syncbn."""
    _fresh_dynamo()
    rank = dist.get_rank()
    facts: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) + 1

    def pair(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(3)
        eager = make()
        torch.manual_seed(3)
        return eager, make()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        """Relative to the tensor's scale; tensors that are ~0 (a BN's bias gradient when
        another BN follows) are compared to 1e-6 instead."""
        a, b = a.detach().double(), b.detach().double()
        return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)

    def compare(label: str, eager: nn.Module, compiled_from: nn.Module,
                inputs: Callable[[], tuple[Any, ...]], rtol: float = 1e-10,
                grads: bool = True) -> None:
        """Two steps each; the worst relative difference of outputs, state and grads."""
        compiled = torch.compile(compiled_from, fullgraph=True)
        worst = 0.0
        for _ in range(2):
            args_e, args_c = inputs(), inputs()
            out_e, out_c = eager(*args_e), compiled(*args_c)
            worst = max(worst, rel(out_c, out_e))
            if grads:
                out_e.square().sum().backward()
                out_c.square().sum().backward()
        for a, b in zip(eager.state_dict().values(), compiled_from.state_dict().values(),
                        strict=True):
            worst = max(worst, rel(b, a))
        if grads:
            for a, b in zip(eager.parameters(), compiled_from.parameters(), strict=True):
                assert a.grad is not None and b.grad is not None
                worst = max(worst, rel(b.grad, a.grad))
        facts[label] = worst <= rtol, worst

    def conv_then(layer: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.Conv2d(4, 4, 1), layer()).double()

    fused = conv_then(lambda: syncbn.SyncBatchNorm(4, activation="elu"))
    compare("fused-elu", *pair(fused), lambda: (x,), rtol=1e-9)
    inplace = conv_then(lambda: syncbn.SyncBatchNorm(4, activation="leaky_relu", inplace=True))
    compare("inplace-leaky", *pair(inplace), lambda: (x,), rtol=1e-9)
    mask = torch.rand(3, 5, 6, generator=gen) > 0.3
    masked = syncbn.SyncBatchNorm(4).double()
    masked_c = syncbn.SyncBatchNorm(4).double()
    compare("masked", masked, masked_c, lambda: (x.clone().requires_grad_(), mask), rtol=1e-9)
    evals = [syncbn.SyncBatchNorm(4).double().eval() for _ in range(2)]
    compare("eval", *evals, lambda: (x,), grads=False)
    facts["paddle"] = _paddle_variant(x, compare, pair)
    bf16 = [nn.Sequential(nn.Conv2d(4, 4, 1, bias=False),  # its bias grad is ~0: BN follows
                          syncbn.SyncBatchNorm(4)).to(torch.bfloat16)
            for _ in range(2)]
    bf16[1].load_state_dict(bf16[0].state_dict())
    # outputs and running statistics only: in bfloat16 the bias gradients (Σdy with
    # dy = 2y, y centred by BN) are rounding noise around 0 in eager and compiled alike
    compare("bfloat16", *bf16, lambda: (x.to(torch.bfloat16),), rtol=5e-2, grads=False)
    return facts


def _paddle_variant(x: torch.Tensor, compare: Any, pair: Any) -> bool:
    def make() -> nn.Module:
        return nn.Sequential(pnn.SyncBatchNorm(4), pnn.BatchNorm2D(4, data_format="NCHW")
                             ).double()
    compare("paddle-sync-and-local", *pair(make), lambda: (x,), rtol=1e-7)
    return True


def test_compiled_layer_variants_match_eager() -> None:
    for facts in harness.run_ranks(2, _variants_case, timeout=TIMEOUT_S):
        for label, value in facts.items():
            if label == "paddle":
                continue
            ok, worst = value
            assert ok, (label, worst)


# --- the local fallback (no process group) and a group of one rank --------------------------


def test_compiled_fallback_without_a_group_matches_batchnorm() -> None:
    assert not dist.is_initialized()
    _fresh_dynamo()
    model = _zoo()
    oracle = _zoo()
    converted = syncbn.convert_sync_batchnorm(model)
    compiled = torch.compile(converted, fullgraph=True)
    inputs = [torch.cat(_batches([3, 2], step)) for step in range(STEPS)]
    got = _run_steps(converted, compiled, inputs)
    want = _train(oracle, oracle, inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name, value in _state(oracle).items():
        torch.testing.assert_close(_state(converted)[name], value, rtol=1e-9, atol=1e-9)


def _group_of_one_case() -> dict[str, Any]:
    _fresh_dynamo()
    rank = dist.get_rank()
    groups = [dist.new_group([0]), dist.new_group([1])]
    model = syncbn.convert_sync_batchnorm(_zoo(), groups[rank])
    oracle = _zoo()
    inputs = [_batches([3, 2], step)[rank] for step in range(STEPS)]
    got = _run_steps(model, torch.compile(model, fullgraph=True), inputs)
    want = _train(oracle, oracle, inputs)
    worst = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
    state, ref = _state(model), _state(oracle)
    worst = max(worst, *((state[k].double() - v.double()).abs().max().item()
                         for k, v in ref.items()))
    return {"worst": worst}


def test_compiled_group_of_one_rank_is_local_batchnorm() -> None:
    for result in harness.run_ranks(2, _group_of_one_case, timeout=TIMEOUT_S):
        assert result["worst"] < 1e-9, result


# --- the safety machinery under compile ------------------------------------------------------


def _fault_case(kind: str) -> dict[str, Any]:
    _fresh_dynamo()
    rank = dist.get_rank()
    if kind == "timeout":  # rank 1 skips the layer: rank 0 must time out naming it
        layer = syncbn.SyncBatchNorm(3, timeout=3.0, name="head.bn")
    elif kind == "out-of-step":  # the ranks run different layers
        layer = syncbn.SyncBatchNorm(3, name=f"layer{rank}")
    else:  # debug: the ranks disagree on eps
        layer = syncbn.SyncBatchNorm(3, eps=1e-5 * (1 + rank), debug=True, name="bn")
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 3)
    if kind == "timeout" and rank == 1:
        return {"error": None, "message": ""}
    try:
        compiled(x)
    except syncbn.SyncBatchNormError as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None, "message": ""}


@pytest.fixture
def fault_pool() -> Iterator[harness.DistPool]:
    pool = harness.DistPool(2, group_timeout_s=30.0)
    yield pool
    for proc in pool._procs:  # its group may be broken: no orderly shutdown
        if proc.is_alive():
            proc.kill()
    pool.close()


@pytest.mark.parametrize("kind", ["timeout", "out-of-step", "debug-eps"])
def test_compiled_layers_keep_their_safety_checks(kind: str,
                                                  fault_pool: harness.DistPool) -> None:
    results = fault_pool.run(_fault_case, kind, timeout=TIMEOUT_S)
    if kind == "timeout":
        assert results[0]["error"] == "SyncBatchNormError", results
        assert "SyncBatchNorm 'head.bn' (forward" in results[0]["message"]
        assert "did not complete within 3 s" in results[0]["message"]
    elif kind == "out-of-step":
        for result in results:
            assert result["error"] == "SyncBatchNormError", results
            assert "the ranks are out of step" in result["message"]
    else:
        for result in results:
            assert result["error"] == "SyncBatchNormError", results
            assert "ranks disagree on eps" in result["message"]


def test_no_graph_break_in_explain() -> None:
    """dynamo's own count, as a user would check it."""
    _fresh_dynamo()
    model = syncbn.convert_sync_batchnorm(_zoo())
    explanation = torch._dynamo.explain(model)(_batches([4], 0)[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

