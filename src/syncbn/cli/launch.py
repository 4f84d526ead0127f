"""Put the CLI's ranks into a process group: spawn local workers, or join torchrun's.

Shared by ``syncbn demo`` and ``syncbn check``. Two ways in:

- **torchrun** (:func:`torchrun_env` finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``): this process is one rank; :func:`join_torchrun`
  initializes the default group from the environment, any backend, any number
  of nodes.
- **local spawn** (:func:`spawn`): the calling process starts ``nproc`` workers
  with the ``spawn`` start method, rendezvous over TCP on 127.0.0.1, and waits
  for each rank's exit code. A rank that raises or dies makes the parent stop
  the others at once and raise :class:`LaunchError` carrying that rank's
  traceback, so a failure never turns into a hang.

Every collective runs under an explicit timeout (``timeout_s``), so a rank that
stops answering fails the run within that time instead of blocking forever.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "LaunchError",
    "UsageError",
    "check_at_least",
    "check_backend",
    "check_device",
    "check_port",
    "check_timeout",
    "default_backend",
    "free_port",
    "join_torchrun",
    "leave_group",
    "port_in_use",
    "spawn",
    "torchrun_env",
]

LOCAL_ADDR = "127.0.0.1"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

P = TypeVar("P")
"""The payload handed to every rank (must pickle: it crosses the spawn boundary)."""


class LaunchError(RuntimeError):
    """The ranks could not be started, or one of them failed; the message says which and why."""


class UsageError(LaunchError):
    """Bad options or a missing requirement, found before any rank starts."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the group (valid after the group is initialized)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    launcher: Literal["spawn", "torchrun"]


@dataclass(frozen=True)
class TorchrunVars:
    """The rendezvous variables torchrun (or any ``env://`` launcher) exported."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunVars | None:
    """The torchrun variables, or ``None`` when this process was not started by torchrun.

    Raises:
        UsageError: only some of the variables are set, or one is not an integer.
    """
    env = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARS if name in env]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARS if name not in env]
    if missing:
        raise UsageError(
            f"found torchrun variables {', '.join(present)} but not {', '.join(missing)}; "
            "start with `torchrun --nproc-per-node N -m syncbn ...`, or unset them all "
            "to let syncbn spawn its own local ranks"
        )
    try:
        return TorchrunVars(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    except ValueError as exc:
        raise UsageError(
            "torchrun variables RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be "
            f"integers: {exc}"
        ) from None


def check_at_least(option: str, value: int, minimum: int = 1) -> None:
    """Raise :class:`UsageError` unless the integer option ``value`` is ``>= minimum``."""
    if value < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {value}")


def check_timeout(timeout_s: float) -> None:
    """Raise :class:`UsageError` unless the timeout is a positive number of seconds."""
    if not (timeout_s > 0 and timeout_s < float("inf")):
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout_s}")


def default_backend(device: str) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device == "cuda" else "gloo"


def check_device(device: str, nproc: int | None) -> None:
    """Check that ``device`` exists here, and has a GPU per local rank when it is CUDA.

    Raises:
        UsageError: with what was asked, what is there, and what to pass instead.
    """
    if device == "cpu":
        return
    if device != "cuda":
        raise UsageError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible"
        )
        raise UsageError(
            f"--device cuda was requested, but {why} (torch {torch.__version__}); "
            "run with --device cpu"
        )
    count = torch.cuda.device_count()
    if nproc is not None and nproc > count:
        raise UsageError(
            f"--device cuda gives each local rank its own GPU: --nproc {nproc} needs "
            f"{nproc} GPUs, but {count} are visible; pass --nproc {count} or --device cpu"
        )


def check_backend(backend: str, device: str) -> None:
    """Check that ``backend`` is built into this torch and can carry ``device`` tensors.

    Raises:
        UsageError: the backend is unknown, unavailable, or NCCL was asked for CPU tensors.
    """
    if not dist.is_available():
        raise UsageError(
            f"this torch build ({torch.__version__}) has no torch.distributed; "
            "install a build with distributed support"
        )
    if backend == "nccl" and device != "cuda":
        raise UsageError(
            "--backend nccl carries only CUDA tensors, but --device is cpu; "
            "pass --device cuda, or --backend gloo"
        )
    if not dist.is_backend_available(backend):
        known = [b for b in ("gloo", "nccl", "mpi", "ucc", "xccl") if dist.is_backend_available(b)]
        raise UsageError(
            f"--backend {backend!r} is not available in this torch build; "
            f"available: {', '.join(known) or 'none'}"
        )


def port_in_use(port: int, host: str = LOCAL_ADDR) -> bool:
    """True when something already listens on ``host:port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def free_port(host: str = LOCAL_ADDR) -> int:
    """A TCP port that was free a moment ago, chosen by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def check_port(port: int | None) -> int:
    """``port`` if it is usable, else a free one when ``port`` is ``None``.

    Raises:
        UsageError: the port is out of range or something already listens on it.
    """
    if port is None:
        return free_port()
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if port_in_use(port):
        raise UsageError(
            f"port {port} on {LOCAL_ADDR} is already in use; pass another --port, "
            "or leave --port out to pick a free one"
        )
    return port


def _rank_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_torchrun(backend: str, device: str, timeout_s: float) -> DistEnv:
    """Initialize the default group from torchrun's environment (``env://``).

    If a default group already exists (a caller set one up), it is used as is.
    """
    found = torchrun_env()
    if found is None:  # pragma: no cover - callers check first
        raise LaunchError("not started by torchrun: RANK/WORLD_SIZE/... are not set")
    torch_device = _rank_device(device, found.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch_device if device == "cuda" else None,
        )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=found.local_rank,
        backend=str(dist.get_backend()),
        device=torch_device,
        launcher="torchrun",
    )


def leave_group() -> None:
    """Destroy the default group if there is one (NCCL warns when it is not destroyed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_Report = tuple[int, str, object]
"""What a spawned rank sends back: ``(rank, "exit", code)`` or ``(rank, "error", traceback)``."""


@dataclass(frozen=True)
class _WorkerArgs(Generic[P]):
    """What one spawned rank needs besides the payload; pickled by the spawn start method.

    The payload travels through a pipe of its own, written by a thread per rank:
    spawn writes a process's arguments into a pipe that the child reads only after
    importing torch, so a payload larger than the pipe buffer would start the ranks
    one by one.
    """

    target: Callable[[DistEnv, P], int]
    world_size: int
    port: int
    backend: str
    device: str
    timeout_s: float
    env: dict[str, str]


def _worker(
    rank: int,
    args: _WorkerArgs[P],
    payloads: multiprocessing.connection.Connection,
    reports: multiprocessing.connection.Connection,
) -> None:
    """Body of a spawned rank: join the group, run the target, report ``(rank, kind, value)``."""
    os.environ.update(args.env)
    os.environ.update(
        MASTER_ADDR=LOCAL_ADDR, MASTER_PORT=str(args.port),
        RANK=str(rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(rank),
    )
    # Several ranks share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if not payloads.poll(args.timeout_s):
            raise TimeoutError(f"no payload from the parent within {args.timeout_s:g} s")
        payload = payloads.recv()
        device = _rank_device(args.device, rank)
        dist.init_process_group(
            args.backend,
            init_method=f"tcp://{LOCAL_ADDR}:{args.port}",
            rank=rank,
            world_size=args.world_size,
            timeout=datetime.timedelta(seconds=args.timeout_s),
            device_id=device if args.device == "cuda" else None,
        )
        env = DistEnv(
            rank=rank, world_size=args.world_size, local_rank=rank, backend=args.backend,
            device=device, launcher="spawn",
        )
        code = args.target(env, payload)
        sys.stdout.flush()
        reports.send((rank, "exit", code))
    except BaseException:  # report everything, KeyboardInterrupt included, then leave
        with contextlib.suppress(OSError):  # the parent may be gone
            reports.send((rank, "error", traceback.format_exc()))
    finally:
        # the group may be broken after a failure; exiting is what matters
        with contextlib.suppress(Exception):
            leave_group()
    # Leave without the interpreter's teardown (about a second per rank with torch
    # loaded, paid N times on few cores): flush what the parent must see, then exit.
    # First the finalizers multiprocessing runs when a child's target returns (not its
    # join of leftover children): they unlink the named semaphores this rank created
    # (tqdm makes one when torch.compile traces an autograd Function); skipped, the
    # resource tracker the parent shares reports them as leaked at its exit, a
    # UserWarning on stderr.
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]
    reports.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local_env() -> dict[str, str]:
    """Variables the spawned ranks get: gloo on the loopback interface unless told otherwise."""
    env: dict[str, str] = {}
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def spawn(
    target: Callable[[DistEnv, P], int],
    payload: P,
    *,
    nproc: int,
    backend: str,
    device: str,
    port: int,
    timeout_s: float,
    grace_s: float = 5.0,
) -> list[int]:
    """Run ``target(env, payload)`` on ``nproc`` fresh local ranks; return their exit codes.

    ``target`` must be a module-level function (it is pickled by name). The
    ranks rendezvous on ``127.0.0.1:port`` and each sets one intra-op thread.

    Raises:
        LaunchError: a rank raised (its traceback is in the message) or died
            without reporting; the other ranks have been stopped by then.
    """
    context = multiprocessing.get_context("spawn")
    # pipes, not multiprocessing queues: a queue's locks are named semaphores, which the
    # resource tracker sometimes reported as leaked when this process ended (seen about
    # once in 14 runs of `syncbn check` on 2 busy cores, a UserWarning on stderr)
    payload_pipes = [context.Pipe(duplex=False) for _ in range(nproc)]  # (child's, ours)
    report_pipes = [context.Pipe(duplex=False) for _ in range(nproc)]  # (ours, child's)
    args = _WorkerArgs(
        target=target, world_size=nproc, port=port, backend=backend,
        device=device, timeout_s=timeout_s, env=_local_env(),
    )
    processes = [
        context.Process(
            target=_worker, args=(rank, args, payload_pipes[rank][0], report_pipes[rank][1]),
            name=f"syncbn-rank{rank}",
        )
        for rank in range(nproc)
    ]
    reports = [ours for ours, _ in report_pipes]
    finished = False
    try:
        for process in processes:
            process.start()
        for (theirs, ours), (_, their_reports) in zip(payload_pipes, report_pipes, strict=True):
            theirs.close()  # the children hold these now: a dead child's pipe reads EOF
            their_reports.close()
            threading.Thread(target=_send_quietly, args=(ours, payload), daemon=True).start()
        codes = _collect(processes, reports, grace_s)
        finished = True
    finally:
        # After a failure the other ranks may sit in a collective: stop them now.
        _stop(processes, wait_s=10.0 if finished else 0.0)
        for connection in [ours for _, ours in payload_pipes] + reports:
            connection.close()
    return codes


def _send_quietly(connection: multiprocessing.connection.Connection, payload: object) -> None:
    """Send a rank its payload (a thread per rank: a child reads it only after importing
    torch); a rank that died first is reported by :func:`_collect`, not here."""
    with contextlib.suppress(OSError):
        connection.send(payload)


def _receive(reports: dict[multiprocessing.connection.Connection, int],
             connection: multiprocessing.connection.Connection) -> _Report | None:
    """One rank's report, or ``None`` once its pipe is closed (it is then forgotten)."""
    try:
        report: _Report = connection.recv()
    except (EOFError, OSError):
        del reports[connection]
        return None
    return report


def _ready(reports: dict[multiprocessing.connection.Connection, int], timeout_s: float
           ) -> list[multiprocessing.connection.Connection]:
    """The report pipes with something to read (or closed), waiting at most ``timeout_s``."""
    if not reports:
        time.sleep(timeout_s)
        return []
    ready = multiprocessing.connection.wait(list(reports), timeout=timeout_s)
    return [connection for connection in ready
            if isinstance(connection, multiprocessing.connection.Connection)]


def _collect(
    processes: Sequence[multiprocessing.process.BaseProcess],
    report_pipes: Sequence[multiprocessing.connection.Connection],
    grace_s: float,
) -> list[int]:
    """Wait for one report per rank; raise on the first error or silent death."""
    codes: dict[int, int] = {}
    dead_since: dict[int, float] = {}
    reports = {connection: rank for rank, connection in enumerate(report_pipes)}
    while len(codes) < len(processes):
        ready = _ready(reports, 0.1)
        if not ready:
            now = time.monotonic()
            for rank, process in enumerate(processes):
                if rank in codes or process.exitcode is None:
                    continue
                # A rank's last report may still be in the pipe when it has exited.
                if now - dead_since.setdefault(rank, now) > grace_s:
                    raise LaunchError(_died(rank, process)) from None
            continue
        for connection in ready:
            report = _receive(reports, connection)
            if report is None:
                continue
            rank, kind, value = report
            if kind == "error":
                raise LaunchError(_failure(processes, reports, codes, {rank: str(value)}))
            if not isinstance(value, int):  # pragma: no cover - targets return int
                raise LaunchError(f"rank {rank} returned {value!r} instead of an exit code")
            codes[rank] = value
    return [codes[rank] for rank in range(len(processes))]


def _died(rank: int, process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else (
        f"exited with code {code}"
    )
    return f"rank {rank} {how} without reporting (killed, or out of memory?)"


def _failure(
    processes: Sequence[multiprocessing.process.BaseProcess],
    reports: dict[multiprocessing.connection.Connection, int],
    codes: dict[int, int],
    errors: dict[int, str],
    settle_s: float = 1.0,
) -> str:
    """The message for a failed run, root cause first.

    When one rank dies or raises, its peers soon fail too (a collective loses
    its partner), and their reports may arrive first; so wait ``settle_s`` for
    the rest, and put ranks that died without a word ahead of those that raised.
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        for connection in _ready(reports, 0.05):
            report = _receive(reports, connection)
            if report is not None and report[1] == "error":
                errors.setdefault(report[0], str(report[2]))
    silent = [
        rank for rank, process in enumerate(processes)
        if process.exitcode not in (None, 0) and rank not in errors and rank not in codes
    ]
    first_rank, first_traceback = next(iter(errors.items()))
    lines = first_traceback.strip().splitlines()
    failed = f"rank {first_rank} failed: {lines[-1] if lines else 'unknown error'}"
    others = ", ".join(str(rank) for rank in sorted(set(errors) - {first_rank}))
    also = f" (then also: rank {others})" if others else ""
    if silent:
        died = "; ".join(_died(rank, processes[rank]) for rank in silent)
        return f"{died}; then {failed}{also}\n\n{first_traceback}"
    return f"{failed}{also}\n\n{first_traceback}"


def _stop(processes: Sequence[multiprocessing.process.BaseProcess], wait_s: float) -> None:
    """Give the ranks ``wait_s`` seconds to exit; terminate, then kill, any still running."""
    deadline = time.monotonic() + wait_s
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is not None:
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def check_torchrun_options(nproc: int | None, port: int | None, world_size: int) -> None:
    """Under torchrun, ``--nproc`` is torchrun's business and ``--port`` is unused.

    torchrun's own option is ``--nproc-per-node`` (its parser refuses the
    abbreviation ``--nproc`` as ambiguous), and an ``--nproc`` written after
    ``-m syncbn check`` reaches syncbn, not torchrun. So ``--nproc`` is
    accepted only when it equals torchrun's ``WORLD_SIZE`` (the total over all
    nodes, a redundant but true statement); any other value is refused with
    the torchrun command that gives that many ranks, rather than ignored, so
    nobody believes a check ran on ranks it never had.

    Raises:
        UsageError: with the fix.
    """
    if nproc is not None and nproc != world_size:
        raise UsageError(
            f"--nproc {nproc} disagrees with torchrun's WORLD_SIZE={world_size}; under "
            "torchrun the ranks are torchrun's (WORLD_SIZE = --nnodes x --nproc-per-node), "
            f"so set their count with torchrun's own option, e.g. `torchrun --nproc-per-node "
            f"{max(nproc, 1)} -m syncbn ...`, and leave --nproc out"
        )
    if port is not None:
        raise UsageError(
            "--port is for locally spawned ranks; under torchrun pass --master-port to torchrun"
        )
