"""``syncbn check``: verify syncbn on the live process group, against a local oracle.

For each case (input rank 2–5, float32/float64, contiguous or channels-last)
every rank draws its own shard from a seeded generator — uneven sizes, and one
rank empty when there are two or more — and the shards and their output
gradients are all-gathered (padded to the largest shard), so every rank holds
the global batch. The oracle is ``torch.nn.BatchNorm{1,2,3}d`` in float64 on
that global batch; syncbn must match it in:

- the output (training mode) and the input gradient, on this rank's rows;
- the weight and bias gradients, as the sum over ranks of the local ones
  (what DDP's gradient all-reduce would see, times the world size);
- the running mean and variance after the step, and the eval-mode output;
- dtype and memory format of the output and input gradient.

Each error is ``max |actual − expected| / max(1, max |expected|)``, the worst
over all ranks. Then one layer's training forward+backward on a small
``TIMING_SHAPE`` input is timed (median wall milliseconds, slowest rank), for
syncbn and, on CUDA, ``torch.nn.SyncBatchNorm``, and reported as a ratio to
unsynchronized ``torch.nn.BatchNorm2d`` on the same input: on a layer this
small the ratio is mostly the latency of the two collectives, not syncbn's
arithmetic (``benchmarks/`` measures realistic shapes).
Nothing here comes from the test suite: the command is part of the package,
to run where the tests cannot, e.g. under ``torchrun`` on a real cluster.
"""

from __future__ import annotations

import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import launch as _launch
from .launch import DistEnv

__all__ = ["TOLERANCE", "Case", "CheckConfig", "cases", "run_check", "shard_sizes"]

TOLERANCE: dict[torch.dtype, float] = {
    # float32: a handful of ulp (1.2e-7) on values and sums of a few hundred
    # terms, computed in another order than the oracle's float64.
    torch.float32: 1e-5,
    # float64: same reasoning with ulp 2.2e-16; still far above any real bug.
    torch.float64: 1e-10,
}
"""Largest accepted scaled error (see the module doc) per input dtype."""

TIMING_SHAPE: tuple[int, int, int, int] = (8, 32, 16, 16)
"""Per-rank input of the timing: small, so it shows the fixed cost of the two collectives."""

METRICS = ("out", "grad_in", "grad_w", "grad_b", "run_mean", "run_var", "eval")


@dataclass(frozen=True)
class CheckConfig:
    """Options of ``syncbn check`` (see ``syncbn check --help``)."""

    nproc: int | None = None
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    port: int | None = None
    timeout_s: float = 120.0
    iters: int = 20


@dataclass(frozen=True)
class Case:
    """One input kind: ``(N, *tail)`` of ``dtype`` in ``memory_format``."""

    tail: tuple[int, ...]
    dtype: torch.dtype
    memory_format: torch.memory_format

    @property
    def name(self) -> str:
        """E.g. ``(N,3,5,6) float32 channels_last``."""
        dims = ",".join(str(d) for d in self.tail)
        dtype = str(self.dtype).removeprefix("torch.")
        fmt = str(self.memory_format).removeprefix("torch.")
        return f"(N,{dims}) {dtype} {fmt.replace('contiguous_format', 'contiguous')}"


def cases() -> list[Case]:
    """Every input rank, both dtypes, and channels-last where the rank has one."""
    tails: list[tuple[int, ...]] = [(5,), (4, 7), (3, 5, 6), (2, 3, 4, 5)]
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}
    found = []
    for tail in tails:
        formats = [torch.contiguous_format]
        if len(tail) + 1 in channels_last:
            formats.append(channels_last[len(tail) + 1])
        for memory_format in formats:
            for dtype in (torch.float32, torch.float64):
                found.append(Case(tail, dtype, memory_format))
    return found


def shard_sizes(world_size: int, case_index: int) -> list[int]:
    """Uneven per-rank batch sizes of 2–4 samples; with 2+ ranks, in two cases of three
    one rank (a different one from case to case) holds none."""
    sizes = [2 + (rank + case_index) % 3 for rank in range(world_size)]
    if world_size >= 2 and case_index % 3 != 1:
        sizes[(case_index // 3) % world_size] = 0
    return sizes


# ---------------------------------------------------------------------------
# Validation and launch (the calling process)
# ---------------------------------------------------------------------------


def run_check(config: CheckConfig) -> int:
    """Validate ``config``, start (or join) the ranks, return 0 if every case matches, else 1.

    Raises:
        UsageError: bad options or environment, before any rank starts.
        LaunchError: a rank failed.
    """
    backend = _launch.default_backend(config.device) if config.backend == "auto" else config.backend
    _launch.check_at_least("--iters", config.iters, minimum=0)
    _launch.check_timeout(config.timeout_s)
    found = _launch.torchrun_env()
    if found is not None:
        _launch.check_torchrun_options(config.nproc, config.port, found.world_size)
        _launch.check_device(config.device, None)
        _launch.check_backend(backend, config.device)
        created = not dist.is_initialized()  # a caller's own group stays
        env = _launch.join_torchrun(backend, config.device, config.timeout_s)
        try:
            return _check_rank(env, config)
        finally:
            if created:
                _launch.leave_group()

    if config.nproc is not None:
        nproc = config.nproc
    elif config.device == "cuda" and torch.cuda.is_available():
        nproc = torch.cuda.device_count()
    else:
        nproc = 4
    _launch.check_at_least("--nproc", nproc)
    _launch.check_device(config.device, nproc)
    _launch.check_backend(backend, config.device)
    port = _launch.check_port(config.port)
    codes = _launch.spawn(
        _check_rank, config, nproc=nproc, backend=backend, device=config.device,
        port=port, timeout_s=config.timeout_s,
    )
    return max(codes)


# ---------------------------------------------------------------------------
# One rank (module-level: spawned ranks import it by name)
# ---------------------------------------------------------------------------


def _gather_rows(local: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's ``local`` along dim 0; also return this rank's row offset.

    Shards differ in length, so each is padded to the longest before ``all_gather``.
    """
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)  # 1 -> world × 1
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous())  # (max N, ...) -> world × (max N, ...)
    rows = torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])
    return rows, sum(sizes[: dist.get_rank()])


def _scaled_error(actual: Tensor | None, expected: Tensor) -> float:
    """``max |actual − expected| / max(1, max |expected|)`` in float64; ``inf`` if missing."""
    if actual is None or actual.shape != expected.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    expected64 = expected.detach().double()
    diff = (actual.detach().double() - expected64).abs().max()
    return float(diff / expected64.abs().max().clamp(min=1.0))


_ORACLES: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d,
}


@dataclass(frozen=True)
class _Outcome:
    """One case's worst errors over all ranks, and whether dtype and layout held everywhere."""

    case: Case
    sizes: list[int]
    errors: dict[str, float]
    layout_ok: bool

    @property
    def passed(self) -> bool:
        tolerance = TOLERANCE[self.case.dtype]
        return self.layout_ok and all(e <= tolerance for e in self.errors.values())


def _run_case(env: DistEnv, case: Case, index: int, seed: int) -> _Outcome:
    """Compare syncbn with the float64 oracle for one case, on every rank together."""
    import syncbn

    sizes = shard_sizes(env.world_size, index)
    n_local = sizes[env.rank]
    channels = case.tail[0]
    # Per-rank data: this rank's own stream, so the all_gather has real work to do.
    rank_gen = torch.Generator().manual_seed(seed * 100_003 + index * 1009 + env.rank)
    # an offset and scale away from N(0, 1), so a naive E[x²] − E[x]² would show
    x_local = (torch.randn(n_local, *case.tail, generator=rank_gen, dtype=torch.float64) * 2 + 5)
    g_local = torch.randn(n_local, *case.tail, generator=rank_gen, dtype=torch.float64)
    # Shared affine parameters: the same stream on every rank.
    shared_gen = torch.Generator().manual_seed(seed * 100_003 + index * 1009 + 7919)
    weight = (1 + 0.5 * torch.rand(channels, generator=shared_gen, dtype=torch.float64))
    bias = 0.5 * torch.randn(channels, generator=shared_gen, dtype=torch.float64)

    def prepare(t: Tensor) -> Tensor:
        return t.to(env.device, case.dtype).contiguous(memory_format=case.memory_format)

    x_local, g_local = prepare(x_local), prepare(g_local)
    x_global, offset = _gather_rows(x_local.contiguous())
    g_global, _ = _gather_rows(g_local.contiguous())
    rows = slice(offset, offset + n_local)

    layer = syncbn.SyncBatchNorm(channels, momentum=0.1, device=env.device, dtype=case.dtype)
    oracle = _ORACLES[len(case.tail) + 1](
        channels, momentum=0.1, device=env.device, dtype=torch.float64
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        oracle.weight.copy_(layer.weight.double())  # the values syncbn really has
        oracle.bias.copy_(layer.bias.double())

    x = x_local.detach().requires_grad_(True)
    out = layer(x)
    torch.autograd.backward((out * g_local).sum())
    grad_w = _zeros_if_none(layer.weight.grad, layer.weight)
    grad_b = _zeros_if_none(layer.bias.grad, layer.bias)
    dist.all_reduce(grad_w)  # C -> C: sum of the local weight gradients
    dist.all_reduce(grad_b)  # C -> C

    x_ref = x_global.double().requires_grad_(True)
    out_ref = oracle(x_ref)
    torch.autograd.backward((out_ref * g_global.double()).sum())

    layer.eval()
    oracle.eval()
    with torch.no_grad():
        out_eval = layer(x_local)
        out_eval_ref = oracle(x_global.double())

    assert oracle.weight.grad is not None and oracle.bias.grad is not None  # backward ran
    assert x_ref.grad is not None
    errors = {
        "out": _scaled_error(out, out_ref[rows]),
        "grad_in": _scaled_error(x.grad, x_ref.grad[rows]),
        "grad_w": _scaled_error(grad_w, oracle.weight.grad),
        "grad_b": _scaled_error(grad_b, oracle.bias.grad),
        "run_mean": _scaled_error(layer.running_mean, _buffer(oracle.running_mean)),
        "run_var": _scaled_error(layer.running_var, _buffer(oracle.running_var)),
        "eval": _scaled_error(out_eval, out_eval_ref[rows]),
    }
    layout_ok = all(
        t is not None
        and t.dtype == case.dtype
        and t.is_contiguous(memory_format=case.memory_format)
        for t in (out, x.grad, out_eval)
    )
    # the worst over ranks: max of errors, min of the layout flag
    worst = torch.tensor([*errors.values(), 0.0 if layout_ok else 1.0], dtype=torch.float64)
    worst = worst.to(env.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # (7 + 1) -> (7 + 1)
    values = worst.tolist()
    return _Outcome(
        case=case,
        sizes=sizes,
        errors=dict(zip(METRICS, values[:-1], strict=True)),
        layout_ok=values[-1] == 0.0,
    )


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """A rank with no rows may leave a parameter without a gradient: count it as zero."""
    return torch.zeros_like(like) if grad is None else grad.detach().clone()


def _buffer(value: Tensor | None) -> Tensor:
    if value is None:  # pragma: no cover - track_running_stats=True here
        raise RuntimeError("the oracle lost its running statistics")
    return value


def _time_layer(
    env: DistEnv, layer: nn.Module, x: Tensor, grad: Tensor, iters: int
) -> float:
    """Median milliseconds of one training forward+backward, the slowest rank's."""

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)

    samples = []
    for i in range(iters + 3):  # 3 warm-up iterations
        inp = x.detach().requires_grad_(True)
        dist.barrier()
        sync()
        start = time.perf_counter()
        torch.autograd.backward(layer(inp), grad)
        sync()
        if i >= 3:
            samples.append((time.perf_counter() - start) * 1e3)
    median = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=env.device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)  # 1 -> 1
    return float(median.item())


def _timings(env: DistEnv, config: CheckConfig) -> list[tuple[str, float]]:
    """Forward+backward of local BatchNorm2d, syncbn, and (on CUDA) torch.nn.SyncBatchNorm."""
    import syncbn

    shape = TIMING_SHAPE
    gen = torch.Generator().manual_seed(config.seed + env.rank)
    x = torch.randn(*shape, generator=gen).to(env.device)
    grad = torch.randn(*shape, generator=gen).to(env.device)
    layers: list[tuple[str, nn.Module]] = [
        ("torch.nn.BatchNorm2d (local)", nn.BatchNorm2d(shape[1])),
        ("syncbn.SyncBatchNorm", syncbn.SyncBatchNorm(shape[1])),
    ]
    if env.device.type == "cuda":
        layers.append(("torch.nn.SyncBatchNorm", nn.SyncBatchNorm(shape[1])))
    return [
        (name, _time_layer(env, layer.to(env.device), x, grad, config.iters))
        for name, layer in layers
    ]


def _environment(env: DistEnv) -> list[tuple[int, str, str]]:
    """``(rank, host, device)`` of every rank, gathered to all."""
    device = str(env.device)
    if env.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(env.device)})"
    mine = (env.rank, socket.gethostname(), device)
    everyone: list[tuple[int, str, str] | None] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return [row for row in everyone if row is not None]


def _check_rank(env: DistEnv, config: CheckConfig) -> int:
    """Run every case and the timing on this rank; rank 0 prints. Returns the exit code."""
    if env.device.type == "cuda":  # compare true float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ranks = _environment(env)
    outcomes = []
    for index, case in enumerate(cases()):
        try:
            outcomes.append(_run_case(env, case, index, config.seed))
        except Exception as exc:
            raise RuntimeError(f"case {case.name} raised {type(exc).__name__}: {exc}") from exc
    timings = _timings(env, config) if config.iters > 0 else []
    passed = all(o.passed for o in outcomes)
    if env.rank == 0:
        _print_report(env, config, ranks, outcomes, timings)
    return 0 if passed else 1


def _print_report(
    env: DistEnv,
    config: CheckConfig,
    ranks: list[tuple[int, str, str]],
    outcomes: list[_Outcome],
    timings: list[tuple[str, float]],
) -> None:
    import syncbn

    lines = [
        f"syncbn check: backend {env.backend}, world size {env.world_size}, "
        f"launcher {env.launcher}",
        f"torch {torch.__version__}, syncbn {syncbn.__version__}, "
        f"python {platform.python_version()}, {platform.system()} {platform.machine()}",
        "",
        f"{'rank':>4}  {'host':<24} device",
    ]
    lines += [f"{rank:>4}  {host:<24} {device}" for rank, host, device in ranks]
    name_width = max(len(o.case.name) for o in outcomes)
    lines += [
        "",
        "scaled error max|syncbn − BatchNorm(global batch)| / max(1, max|BatchNorm|), worst rank;",
        f"tolerance float32 {TOLERANCE[torch.float32]:.0e}, float64 "
        f"{TOLERANCE[torch.float64]:.0e}; layout = dtype and memory format kept",
        "",
        f"{'case':<{name_width}}  {'rank sizes':<11}"
        + "".join(f"{m:>9}" for m in METRICS)
        + f"{'layout':>8}  verdict",
    ]
    for o in outcomes:
        sizes = ",".join(str(s) for s in o.sizes)
        lines.append(
            f"{o.case.name:<{name_width}}  {sizes:<11}"
            + "".join(f"{o.errors[m]:>9.1e}" for m in METRICS)
            + f"{'ok' if o.layout_ok else 'WRONG':>8}  {'pass' if o.passed else 'FAIL'}"
        )
    if timings:
        base = timings[0][1]
        lines += [
            "",
            f"timing: wall ms of one training forward+backward of one layer, input "
            f"{TIMING_SHAPE} float32 per rank, median of {config.iters}, slowest rank; "
            f"×local = that time / unsynchronized torch.nn.BatchNorm2d's on {config.device} "
            "(on a layer this small the sync layers' time is mostly collective latency)",
        ]
        lines += [
            f"  {name:<30} {ms:>8.3f} ms  {ms / base:>6.2f}×local" for name, ms in timings
        ]
    failed = [o for o in outcomes if not o.passed]
    lines.append("")
    if failed:
        lines.append(
            f"verdict: FAIL — {len(failed)} of {len(outcomes)} cases differ from BatchNorm on "
            f"the gathered global batch: {', '.join(o.case.name for o in failed)}"
        )
    else:
        lines.append(
            f"verdict: PASS — all {len(outcomes)} cases match BatchNorm on the gathered "
            "global batch"
        )
    print("\n".join(lines), flush=True)
    if failed:
        print(f"syncbn check: {len(failed)} case(s) mismatch", file=sys.stderr, flush=True)
