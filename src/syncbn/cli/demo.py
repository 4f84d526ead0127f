"""``syncbn demo``: train one small conv net three ways and prove (b) equals (c).

The three runs share the initial weights (built once from ``--seed``, identical
on every rank, and DDP broadcasts rank 0's copy anyway) and the global sample
order (a seeded permutation per epoch; step ``s`` takes global batch ``s``, of
``G = nproc·batch_per_rank`` samples, and rank ``r`` its slice
``[r·b, (r + 1)·b)``):

- (a) DDP, plain per-rank ``torch.nn.BatchNorm2d``: statistics of ``b`` samples;
- (b) DDP after ``syncbn.convert_sync_batchnorm``: statistics of all ``G`` samples;
- (c) the reference: one process, ``torch.nn.BatchNorm2d``, the whole global batch.

(c) runs on rank 0, step for step beside its (a) and (b), so rank 0 can compare
parameters at every evaluation point without moving them between processes;
the other ranks wait for it in their next collective. With plain SGD and a
per-rank mean loss, DDP's gradient average equals (c)'s gradient of the global
mean loss, so (b) and (c) agree up to float rounding — and (a) does not. The
net is smooth (SiLU, average pooling) so that rounding stays rounding (see
:func:`build_net`); on CUDA, TF32 is switched off for the same reason.

Rank 0 alone draws the progress bar, prints the table, and writes
``results.json`` and ``curves.png`` to ``--out``. The data set is
scikit-learn's handwritten digits (shipped inside the package: nothing is
downloaded); scikit-learn, matplotlib and tqdm are imported lazily, only here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import launch as _launch
from .launch import DistEnv, UsageError

__all__ = ["DemoConfig", "UsageError", "build_net", "load_digits", "run_demo", "sample_order"]

TEST_FRACTION = 0.2
"""Share of the 1,797 digits held out for testing (the split is seeded)."""

# Tolerance of the proof "(b) equals (c)", as max |difference| over every
# parameter and running statistic. (b) and (c) compute the same function in a
# different order: each rank convolves 2 samples where (c) convolves N·2, the
# per-channel sums go through an all-reduce, and DDP averages N partial weight
# gradients. Each step thus adds float32 rounding of a few ulp (≈1e-7 relative)
# to weights of magnitude ≲1, and SGD carries it forward (smoothly: see
# build_net). Measured with 4 ranks: ≤6e-7 after the default 400 steps, ≤1e-6
# after 2,000 steps (seeds 0–2). 1e-4 leaves two orders of magnitude for other
# seeds, world sizes and batch sizes, and is far below the gap of (a), which
# trains on other statistics (≳1e-2 within a few dozen steps).
PROOF_TOLERANCE = 1e-4

EXTRAS_HINT = "pip install 'syncbn[demo]'"


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``syncbn demo`` (see ``syncbn demo --help``)."""

    nproc: int | None = None
    steps: int = 400
    batch_per_rank: int = 2
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    out: Path | None = None
    plot: bool = True
    eval_every: int | None = None
    lr: float = 0.05
    port: int | None = None
    timeout_s: float = 120.0
    progress: bool = True


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8×8 digits, ``(n, 1, 8, 8)`` float32 in [0, 1], split by a seeded shuffle."""

    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]


@dataclass(frozen=True)
class _Job:
    """What every rank needs (pickled across the spawn boundary)."""

    config: DemoConfig
    out: Path  # only rank 0 writes there
    data: Digits


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the demo, or say how to install it.

    Raises:
        UsageError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed; "
            f"install the demo extras with: {EXTRAS_HINT}"
        ) from None


def load_digits(seed: int) -> Digits:
    """Load the digits that ship with scikit-learn and hold out a seeded test split."""
    datasets = require("sklearn.datasets", "the demo's data set")
    bunch = datasets.load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


def build_net(seed: int) -> nn.Sequential:
    """Conv(1→8)→BN→SiLU→AvgPool→Conv(8→16)→BN→SiLU→AvgPool(2)→Linear(64→10), seeded.

    Smooth on purpose: with ReLU or max-pooling, a value that float32 rounding
    puts on the other side of a kink (or of a max) switches a gradient path
    on or off, and from then on any two float32 runs of the same training —
    here (b) and (c), which sum in different orders — drift apart by ~1e-2
    (measured: after a few hundred to a few thousand steps, depending on the
    seed). With SiLU and average pooling the runs stay ~1e-6 apart for
    thousands of steps, so the proof measures syncbn, not chaos.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),  # 8×8 → 8×8
            nn.BatchNorm2d(8),
            nn.SiLU(),
            nn.AvgPool2d(2),  # → 4×4
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),  # → 2×2
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def sample_order(seed: int, n_train: int, global_batch: int, steps: int) -> Tensor:
    """``(steps, global_batch)`` indices: a fresh seeded permutation each epoch, last partial batch
    dropped, so every global batch holds distinct samples."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = n_train // global_batch
    epochs = -(-steps // per_epoch)
    batches = [
        torch.randperm(n_train, generator=generator)[: per_epoch * global_batch].view(
            per_epoch, global_batch
        )
        for _ in range(epochs)
    ]
    return torch.cat(batches)[:steps]


# ---------------------------------------------------------------------------
# Validation and launch (the calling process)
# ---------------------------------------------------------------------------


def _resolve_backend(config: DemoConfig) -> str:
    return _launch.default_backend(config.device) if config.backend == "auto" else config.backend


def _default_out() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path.cwd() / f"syncbn-demo-{stamp}"
    suffix = 1
    while out.exists():
        suffix += 1
        out = Path.cwd() / f"syncbn-demo-{stamp}-{suffix}"
    return out


def prepare_out(out: Path) -> Path:
    """Create ``out`` and prove it is writable.

    Raises:
        UsageError: it cannot be created or written, with the OS's reason.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(
            f"cannot write the results to --out {str(out)!r}: {reason}; "
            "pass a folder you can write to"
        ) from None
    return out.resolve()


def _check_counts(config: DemoConfig, nproc: int) -> None:
    _launch.check_at_least("--nproc", nproc)
    _launch.check_at_least("--steps", config.steps)
    _launch.check_at_least("--batch-per-rank", config.batch_per_rank)
    if config.eval_every is not None:
        _launch.check_at_least("--eval-every", config.eval_every)
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise UsageError(f"--lr must be a positive number, got {config.lr}")
    _launch.check_timeout(config.timeout_s)


def _check_batch(config: DemoConfig, nproc: int, n_train: int) -> None:
    global_batch = nproc * config.batch_per_rank
    if global_batch > n_train:
        raise UsageError(
            f"--nproc {nproc} × --batch-per-rank {config.batch_per_rank} makes a global batch "
            f"of {global_batch} samples, but the training split has only {n_train}; "
            f"pass --batch-per-rank {n_train // nproc} or less"
        )


def _check_extras(config: DemoConfig, rank0: bool) -> None:
    require("sklearn.datasets", "the demo's data set")
    if rank0 and config.progress:
        require("tqdm", "the progress bar (or pass --no-progress)")
    if rank0 and config.plot:
        require("matplotlib", "the plot (or pass --no-plot)")


def run_demo(config: DemoConfig) -> int:
    """Validate ``config``, start (or join) the ranks, and return the exit code.

    0: (b) matched (c); 1: it did not. Bad options raise :class:`UsageError`
    before anything starts; a failing rank raises :class:`LaunchError`.
    """
    found = _launch.torchrun_env()
    backend = _resolve_backend(config)
    if found is not None:
        return _run_torchrun(config, found, backend)

    nproc = 4 if config.nproc is None else config.nproc
    _check_counts(config, nproc)
    _launch.check_device(config.device, nproc)
    _launch.check_backend(backend, config.device)
    port = _launch.check_port(config.port)
    _check_extras(config, rank0=True)
    data = load_digits(config.seed)
    _check_batch(config, nproc, len(data.y_train))
    out = prepare_out(config.out or _default_out())
    job = _Job(config=config, out=out, data=data)
    codes = _launch.spawn(
        _train_rank, job, nproc=nproc, backend=backend, device=config.device,
        port=port, timeout_s=config.timeout_s,
    )
    return max(codes)


def _run_torchrun(config: DemoConfig, found: _launch.TorchrunVars, backend: str) -> int:
    """This process is one of torchrun's ranks: check, join its group, train."""
    _launch.check_torchrun_options(config.nproc, config.port, found.world_size)
    _check_counts(config, found.world_size)
    _launch.check_device(config.device, None)
    _launch.check_backend(backend, config.device)
    _check_extras(config, rank0=found.rank == 0)
    data = load_digits(config.seed)
    _check_batch(config, found.world_size, len(data.y_train))
    # only rank 0 writes; on other nodes the folder need not exist
    out = prepare_out(config.out or _default_out()) if found.rank == 0 else Path(".")
    created = not dist.is_initialized()  # a caller's own group stays
    env = _launch.join_torchrun(backend, config.device, config.timeout_s)
    try:
        return _train_rank(env, _Job(config=config, out=out, data=data))
    finally:
        if created:
            _launch.leave_group()


# ---------------------------------------------------------------------------
# One rank's training (module-level: spawned ranks import it by name)
# ---------------------------------------------------------------------------


@dataclass
class _Curves:
    """Numbers rank 0 collects, written to results.json."""

    eval_points: list[dict[str, Any]] = field(default_factory=list)
    loss_a: list[float] = field(default_factory=list)
    loss_b: list[float] = field(default_factory=list)
    loss_c: list[float] = field(default_factory=list)


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One SGD step on the mean cross-entropy; returns the detached loss."""
    optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: see _ddp
    loss = F.cross_entropy(model(x), y)
    torch.autograd.backward(loss)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy with the running statistics (eval mode; no communication)."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(dim=1) == y).float().mean())
    finally:
        model.train(was_training)


@torch.no_grad()
def _max_diffs(model: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """Max |difference| of the parameters, and of the float buffers (running stats)."""
    params = dict(reference.named_parameters())
    param_diffs = [float((p - params[name]).abs().max()) for name, p in model.named_parameters()]
    buffers = dict(reference.named_buffers())
    buffer_diffs = [float((b - buffers[name]).abs().max())
                    for name, b in model.named_buffers() if b.is_floating_point()]
    # NaN must win (Python's max() would skip it unless it comes first)
    return _nan_max(param_diffs), _nan_max(buffer_diffs)


def _nan_max(values: list[float]) -> float:
    """``max(values)``, NaN if any is NaN, 0.0 for none."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def _ddp(module: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP without buffer broadcasts: (b)'s running stats agree on every rank by
    construction, and (a) is evaluated on rank 0, the broadcast's source, so the
    broadcast would change no reported number; it would only cost a collective a step."""
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # torch 2.13 renamed the option (and deprecated the old name with a warning).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        no_sync: dict[str, Any] = {"forward_sync_buffers": False}
    else:  # pragma: no cover - torch < 2.13
        no_sync = {"broadcast_buffers": False}
    module = module.to(env.device)
    # The first conv's weight is (8, 1, 3, 3), and autograd may give its gradient
    # any stride along the size-1 dim; DDP compares strides exactly and warns
    # ("Grad strides do not match bucket view strides"). Gradients that exist
    # before the first backward are accumulated in place, keeping their layout.
    for param in module.parameters():
        param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return DistributedDataParallel(module, device_ids=device_ids, **no_sync)


def _train_rank(env: DistEnv, job: _Job) -> int:
    """Train (a) and (b) on every rank and (c) on rank 0; rank 0 reports. Returns the exit code."""
    config = job.config
    data = job.data
    if env.device.type == "cuda":
        # TF32 would round to 10 mantissa bits and break the float32 proof.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    device = env.device
    b = config.batch_per_rank
    x_train = torch.from_numpy(data.x_train).to(device)
    y_train = torch.from_numpy(data.y_train).to(device)
    x_test = torch.from_numpy(data.x_test).to(device)
    y_test = torch.from_numpy(data.y_test).to(device)
    order = sample_order(config.seed, len(y_train), env.world_size * b, config.steps).to(device)

    base = build_net(config.seed)
    import syncbn

    model_a = _ddp(copy.deepcopy(base), env)
    model_b = _ddp(syncbn.convert_sync_batchnorm(copy.deepcopy(base)), env)
    model_c = copy.deepcopy(base).to(device) if env.rank == 0 else None
    opt_a = torch.optim.SGD(model_a.parameters(), lr=config.lr)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=config.lr)
    opt_c = torch.optim.SGD(model_c.parameters(), lr=config.lr) if model_c is not None else None

    eval_every = config.eval_every or max(1, config.steps // 10)
    curves = _Curves()
    losses_ab = torch.zeros(2, config.steps, dtype=torch.float64, device=device)
    window_start = 0
    report = _Reporter(env, config, eval_every) if env.rank == 0 else None
    started = time.perf_counter()

    with report.progress() if report is not None else contextlib.nullcontext() as bar:
        for step in range(config.steps):
            global_idx = order[step]
            local_idx = global_idx[env.rank * b : (env.rank + 1) * b]
            x, y = x_train[local_idx], y_train[local_idx]
            losses_ab[0, step] = _sgd_step(model_a, opt_a, x, y)
            losses_ab[1, step] = _sgd_step(model_b, opt_b, x, y)
            if model_c is not None and opt_c is not None:
                loss_c = _sgd_step(model_c, opt_c, x_train[global_idx], y_train[global_idx])
                curves.loss_c.append(float(loss_c))
            if bar is not None:
                bar.update(1)

            if (step + 1) % eval_every and step + 1 != config.steps:
                continue
            # mean over ranks and over the steps since the last evaluation point
            window = losses_ab[:, window_start : step + 1].sum(dim=1)
            dist.all_reduce(window)  # 2 -> 2: sum of per-rank mean losses
            window_mean = (window / (env.world_size * (step + 1 - window_start))).tolist()
            if report is not None and model_c is not None:
                diff_b, buf_b = _max_diffs(model_b.module, model_c)
                diff_a, buf_a = _max_diffs(model_a.module, model_c)
                point = {
                    "step": step + 1,
                    "train_loss": {
                        "a": window_mean[0],
                        "b": window_mean[1],
                        "c": sum(curves.loss_c[window_start:]) / (step + 1 - window_start),
                    },
                    "test_accuracy": {
                        "a": _accuracy(model_a.module, x_test, y_test),
                        "b": _accuracy(model_b.module, x_test, y_test),
                        "c": _accuracy(model_c, x_test, y_test),
                    },
                    "max_param_diff": {"b_vs_c": diff_b, "a_vs_c": diff_a},
                    "max_running_stat_diff": {"b_vs_c": buf_b, "a_vs_c": buf_a},
                }
                curves.eval_points.append(point)
                report.row(point)
            window_start = step + 1

    dist.all_reduce(losses_ab)  # (2, steps) -> (2, steps): per-step sums over ranks
    elapsed = time.perf_counter() - started
    code = torch.zeros(1, dtype=torch.int64, device=device)
    if report is not None:
        per_step = (losses_ab / env.world_size).tolist()
        curves.loss_a, curves.loss_b = per_step[0], per_step[1]
        code[0] = report.finish(curves, job.out, elapsed)
    dist.broadcast(code, src=0)  # every rank exits with rank 0's verdict
    return int(code.item())


# ---------------------------------------------------------------------------
# Rank 0's presentation: progress bar, table, JSON, plot
# ---------------------------------------------------------------------------

_HEADER = (
    f"{'step':>6}  {'loss a':>7} {'loss b':>7} {'loss c':>7}  "
    f"{'acc a':>6} {'acc b':>6} {'acc c':>6}  {'max|Δθ| b−c':>11} {'max|Δθ| a−c':>11}"
)


class _Reporter:
    """Rank 0's output: the bar on stderr, the table on stdout, the files in ``out``."""

    def __init__(self, env: DistEnv, config: DemoConfig, eval_every: int) -> None:
        self.env = env
        self.config = config
        self.eval_every = eval_every
        self._bar: Any = None

    @contextlib.contextmanager
    def progress(self) -> Iterator[Any]:
        """The tqdm bar (or ``None`` with ``--no-progress``) around the training loop."""
        n, b = self.env.world_size, self.config.batch_per_rank
        self._say(
            f"syncbn demo: {n} ranks ({self.env.launcher}, {self.env.backend}, "
            f"{self.env.device.type}), {self.config.steps} steps, batch {b} per rank\n"
            f"  (a) DDP + per-rank BatchNorm2d   statistics of {b} samples\n"
            f"  (b) DDP + syncbn.SyncBatchNorm   statistics of {n * b} samples\n"
            f"  (c) one process, BatchNorm2d     batch of {n * b} (the reference, on rank 0)\n"
            f"loss: mean training loss since the previous row; acc: test accuracy "
            f"(running stats); max|Δθ|: max |parameter difference|\n{_HEADER}"
        )
        if not self.config.progress:
            yield None
            return
        tqdm = require("tqdm", "the progress bar (or pass --no-progress)")
        # tqdm's default lock is a multiprocessing semaphore, which a spawned rank
        # (leaving through os._exit) would leak; one writer needs only a thread lock.
        tqdm.tqdm.set_lock(threading.RLock())
        with tqdm.tqdm(
            total=self.config.steps, desc="training", unit="step", file=sys.stderr,
            dynamic_ncols=True, mininterval=0.5, leave=False,
        ) as bar:
            self._bar = bar
            try:
                yield bar
            finally:
                self._bar = None

    def _say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text)
        sys.stdout.flush()

    def row(self, point: dict[str, Any]) -> None:
        """Print one evaluation point as a table row."""
        loss, acc, diff = point["train_loss"], point["test_accuracy"], point["max_param_diff"]
        self._say(
            f"{point['step']:>6}  {loss['a']:>7.4f} {loss['b']:>7.4f} {loss['c']:>7.4f}  "
            f"{acc['a']:>6.1%} {acc['b']:>6.1%} {acc['c']:>6.1%}  "
            f"{diff['b_vs_c']:>11.2e} {diff['a_vs_c']:>11.2e}"
        )

    def finish(self, curves: _Curves, out: Path, elapsed: float) -> int:
        """Judge (b) against (c), write the JSON and the plot, print where; return the code."""
        final = curves.eval_points[-1]
        diff_b = final["max_param_diff"]["b_vs_c"]
        buf_b = final["max_running_stat_diff"]["b_vs_c"]
        passed = math.isfinite(diff_b) and math.isfinite(buf_b) and max(diff_b, buf_b) <= (
            PROOF_TOLERANCE
        )
        if passed:
            message = (
                f"PASS: (b) syncbn matches (c) the single-process reference: max |parameter "
                f"difference| {diff_b:.2e}, max |running-stat difference| {buf_b:.2e} "
                f"<= {PROOF_TOLERANCE:.0e}; (a) per-rank BatchNorm is off by "
                f"{final['max_param_diff']['a_vs_c']:.2e}"
            )
        else:
            message = (
                f"FAIL: (b) syncbn departs from (c) the single-process reference: max |parameter "
                f"difference| {diff_b:.2e}, max |running-stat difference| {buf_b:.2e}, "
                f"tolerance {PROOF_TOLERANCE:.0e}; syncbn's statistics or gradients differ "
                "from BatchNorm on the global batch"
            )
        results = self._results(curves, elapsed, passed, message)
        json_path = out / "results.json"
        png_path = out / "curves.png"
        if self.config.plot:
            width, height = _plot(curves, png_path, self.env.world_size, self.config)
            results["plot"] = {"path": png_path.name, "width": width, "height": height}
        json_path.write_text(json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8")
        self._say(f"\nfinished in {elapsed:.1f} s\nwrote {json_path}")
        if self.config.plot:
            self._say(f"wrote {png_path}")
        if passed:
            self._say(message)
        else:
            print(f"syncbn demo: {message}", file=sys.stderr, flush=True)
        return 0 if passed else 1

    def _results(
        self, curves: _Curves, elapsed: float, passed: bool, message: str
    ) -> dict[str, Any]:
        import syncbn

        config = asdict(self.config)
        config["out"] = str(config["out"]) if config["out"] is not None else None
        config["nproc"] = self.env.world_size
        config["eval_every"] = self.eval_every
        final = curves.eval_points[-1]
        return {
            "format": "syncbn-demo/1",
            "config": config,
            "environment": {
                "torch": torch.__version__,
                "syncbn": syncbn.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "backend": self.env.backend,
                "world_size": self.env.world_size,
                "device": self.env.device.type,
                "launcher": self.env.launcher,
                "cpu_count": os.cpu_count(),
            },
            "runs": {
                "a": "DDP + per-rank torch.nn.BatchNorm2d",
                "b": "DDP + syncbn.convert_sync_batchnorm",
                "c": "one process, global batch, torch.nn.BatchNorm2d (reference, on rank 0)",
            },
            "eval_points": curves.eval_points,
            "train_loss_per_step": {"a": curves.loss_a, "b": curves.loss_b, "c": curves.loss_c},
            "final": {
                "step": final["step"],
                "test_accuracy": final["test_accuracy"],
                "max_param_diff": final["max_param_diff"],
                "max_running_stat_diff": final["max_running_stat_diff"],
            },
            "tolerance": PROOF_TOLERANCE,
            "verdict": "pass" if passed else "fail",
            "message": message,
            "elapsed_s": elapsed,
        }


def _finite(value: Any) -> Any:
    """Replace NaN/inf by ``None`` so the file is strict JSON even if training diverged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _smooth(values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Trailing moving average (steps are 1-based)."""
    array = np.asarray(values, dtype=np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(array)])
    lo = np.maximum(np.arange(1, len(array) + 1) - window, 0)
    means = (cumsum[1:] - cumsum[lo]) / (np.arange(1, len(array) + 1) - lo)
    return list(range(1, len(array) + 1)), means.tolist()


def _plot(curves: _Curves, path: Path, world_size: int, config: DemoConfig) -> tuple[int, int]:
    """Loss and accuracy curves of (a), (b), (c) as a PNG (Agg canvas, no pyplot); its size."""
    figure_mod = require("matplotlib.figure", "the plot (or pass --no-plot)")
    agg = require("matplotlib.backends.backend_agg", "the plot (or pass --no-plot)")
    dpi = 100
    figure = figure_mod.Figure(figsize=(11, 4.2), dpi=dpi, layout="constrained")
    agg.FigureCanvasAgg(figure)
    ax_loss, ax_acc = figure.subplots(1, 2)
    n, b = world_size, config.batch_per_rank
    styles = {
        "a": dict(color="tab:orange", lw=1.5, label=f"(a) DDP + per-rank BN ({b}/rank)"),
        "b": dict(color="tab:blue", lw=3.0, alpha=0.6, label=f"(b) DDP + syncbn ({n}×{b})"),
        "c": dict(color="black", lw=1.2, ls="--", label=f"(c) one process, batch {n * b}"),
    }
    window = max(1, config.steps // 20)
    for run, values in (("a", curves.loss_a), ("b", curves.loss_b), ("c", curves.loss_c)):
        steps, smooth = _smooth(values, window)
        ax_loss.plot(steps, smooth, **styles[run])
    ax_loss.set(
        xlabel="step", ylabel=f"training loss (moving mean of {window} steps)",
        title="training loss",
    )
    points = curves.eval_points
    for run in ("a", "b", "c"):
        ax_acc.plot(
            [p["step"] for p in points],
            [100 * p["test_accuracy"][run] for p in points],
            marker="o", ms=3, **styles[run],
        )
    final = points[-1]["max_param_diff"]
    ax_acc.set(
        xlabel="step", ylabel="test accuracy (%)",
        title=f"test accuracy — max|Δθ| b−c {final['b_vs_c']:.1e}, a−c {final['a_vs_c']:.1e}",
    )
    for axis in (ax_loss, ax_acc):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"syncbn demo: {n} ranks × {b} samples, digits (8×8)")
    figure.savefig(path, dpi=dpi)
    width, height = figure.canvas.get_width_height()
    return int(width), int(height)
