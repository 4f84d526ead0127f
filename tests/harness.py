"""A pytest-native multi-process harness: real gloo process groups on 127.0.0.1.

One pool of spawned workers per world size is kept for the whole session, so
the cost of starting Python and importing torch is paid once (2 cores suffice).
Each worker joins a gloo group through a file rendezvous and then runs the
tasks it is sent: a module-level function and its arguments, pickled by
reference. The return values of every rank come back as a list.

Failures never hang the suite:

- a rank that raises sends its traceback, which is re-raised in pytest as
  :class:`RankError` naming the rank;
- a task that does not finish within its timeout raises :class:`RankTimeoutError`
  naming the ranks that did not answer;
- after either, the pool is torn down (ranks may be stuck in a collective) and
  the next task gets a fresh one.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

DEFAULT_TIMEOUT_S = 60.0
"""Wall-clock limit of one task on every rank (a hang fails within it)."""
GROUP_TIMEOUT_S = 20.0
"""gloo's own collective timeout inside the workers."""
START_TIMEOUT_S = 60.0


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


class RankTimeoutError(TimeoutError):
    """Some ranks did not finish in time."""


def _worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any,
            group_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=group_timeout_s),
        )
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    while True:
        payload = tasks.get()
        if payload is None:
            break
        try:
            # every task is a job of its own: syncbn's once-per-group debug-mode check
            # (per process) runs again at its first collective, on every rank alike
            from syncbn import _comm

            _comm._agreed.clear()
            fn, args, kwargs = pickle.loads(payload)
            value = fn(*args, **kwargs)
            results.put((rank, "ok", pickle.dumps(value)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """``world_size`` spawned ranks in one gloo group, reused across tasks."""

    def __init__(self, world_size: int, group_timeout_s: float = GROUP_TIMEOUT_S) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="syncbn-rdzv-")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, self._init_file, self._tasks[rank], self._results,
                      group_timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect("ready", START_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def _collect(self, expected: str, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(values) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if errors and not any(p.is_alive() for r, p in enumerate(self._procs)
                                      if r not in values and r not in errors):
                    break
                continue
            if status == "error":
                errors[rank] = value
                # give the other ranks a moment to report, then stop waiting
                deadline = min(deadline, time.monotonic() + 5.0)
            else:
                values[rank] = value
        if errors or len(values) < self.world_size:
            self.close()
            if errors:
                text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise RankError(f"{len(errors)} of {self.world_size} ranks raised:\n{text}")
            missing = sorted(set(range(self.world_size)) - set(values))
            raise RankTimeoutError(
                f"ranks {missing} of {self.world_size} did not finish '{expected}' "
                f"within {timeout_s:.0f} s (a hang?); the pool was torn down"
            )
        return [values[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
            **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; the return values, by rank."""
        payload = pickle.dumps((fn, args, kwargs))
        for task_queue in self._tasks:
            task_queue.put(payload)
        return [pickle.loads(v) for v in self._collect(getattr(fn, "__name__", "task"), timeout)]

    def close(self) -> None:
        for task_queue, proc in zip(self._tasks, self._procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(Exception):  # best effort on shutdown
                    task_queue.put_nowait(None)
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


_POOLS: dict[int, DistPool] = {}


def get_pool(world_size: int) -> DistPool:
    """The session's pool for ``world_size`` ranks, started (again) when needed."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = DistPool(world_size)
        _POOLS[world_size] = pool
    return pool


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any,
              timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
    """Run ``fn`` on ``world_size`` gloo ranks; a failure tears the pool down and re-raises."""
    pool = get_pool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        if not pool.alive:
            _POOLS.pop(world_size, None)


def close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@contextlib.contextmanager
def merges_seen() -> Any:
    """Record every merge of the core's statistics (``syncbn._step.merge``, the torch path,
    and ``merge_on_host``, the CPU lean step's NumPy path) while the block runs: yields a
    list of their results, each with ``mean``, ``inverse_powers`` (``[(σ² + eps)^(−½),
    (σ² + eps)^(−1)]``, σ² biased), ``batch_var`` (the running variance's target) and
    ``total`` (N)."""
    from syncbn import _step

    seen: list[Any] = []
    originals = {name: getattr(_step, name) for name in ("merge", "merge_on_host")}

    def spying(original: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            seen.append(result)
            return result
        return spy

    for name, original in originals.items():
        setattr(_step, name, spying(original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(_step, name, original)


def core_merges(packed: Any, acc: Any = None) -> list[tuple[float, Any, Any]]:
    """``(N, μ, σ²)`` (σ² biased, float64) from one summed packing ``[S₁, S₂, N, key]``
    (shift 0) by each of the core's merges: ``syncbn._step.merge`` (the torch path, N a
    device tensor as on accelerators, and a host float as on CPU) and
    ``merge_on_host`` (NumPy, CPU)."""
    import torch

    from syncbn import _step

    acc = acc or torch.float64
    channels = (packed.numel() - 2) // 2
    out = []
    host = _step.merge_on_host(packed.numpy(), torch.zeros(channels, dtype=acc).numpy(), 1.0,
                               False, torch.empty((5, channels), dtype=acc), None)
    out.append((host.total, torch.from_numpy(host.host_mean), host.batch_var))
    shift_eps = torch.zeros((2, channels), dtype=acc)
    for counts in (None, (float(packed[-2]), float(packed[-1]))):
        merged = _step.merge(packed, shift_eps, counts, acc, False)
        out.append((float(merged.total), merged.mean.double(), merged.batch_var.double()))
    return out


def attempt(step: Callable[[], object]) -> dict[str, Any]:
    """Run ``step`` on a rank; report the error it raised (``error``: its type name, or
    None), its ``message`` and the ``seconds`` it took."""
    start = time.monotonic()
    try:
        step()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - start}
    return {"error": None, "message": "", "seconds": time.monotonic() - start}
