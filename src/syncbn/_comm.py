"""The only module that calls ``torch.distributed``.

One sum over the group per direction, both through :func:`all_reduce_checked` and
both ``2C + 2`` values (the forward moments, or the backward gradient sums, then
a count slot and a step key): each rank hands the collectives ``16·(2C + 2)``
bytes per step in float64 (an all_gather then delivers ``W − 1`` such buffers to
each rank). Both are of one size whatever the direction, so any mispairing (ranks
at different layers, or one rank's backward against another's forward)
exchanges buffers of the same size and is caught by the step key.

The sum is an ``all_reduce``, except on gloo groups of at most
:data:`GATHER_MAX_RANKS` ranks (CPU): there it is an ``all_gather`` of every
rank's buffer and a sum of the rows in rank order, which takes half the message
rounds of gloo's all-reduce and measured 2.3–2.4× faster at 2 ranks
(:func:`gathers`). Every rank of a group decides alike (checked once per group by
:func:`agree_on_mode`).

Every collective knows its :class:`CallSite`; a failure or a timeout becomes a
:class:`SyncBatchNormError` that names the layer, the call, the phase and the
shape, and aborts the group so the process can still exit. Debug mode
(``SYNCBN_DEBUG=1`` or ``debug=True`` on the layer) first all-gathers a 6-value
fingerprint, so that ranks that disagree on the layer, the channels, the dtype,
the phase, eps or momentum raise a readable error instead of exchanging
mismatched buffers.

The collective is a ``torch.library`` operator (``syncbn::all_reduce``, defined by
``_ops``), so ``torch.compile(fullgraph=True)`` traces a layer without a graph break:
every host-side step (timeouts, checks, messages) happens inside the operator.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import functools
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops, _policy
from ._checks import MAX_TIMEOUT_S, MIN_TIMEOUT_S, timeout_hint

_c10d: Any
try:
    from torch.distributed import distributed_c10d as _c10d
except ImportError:  # a torch built without torch.distributed
    _c10d = None

ProcessGroup = Any
"""``torch.distributed.ProcessGroup`` (kept ``Any``: its stubs differ between torch releases)."""


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default group is initialized."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: ProcessGroup | None,
                  who: str = "SyncBatchNorm") -> ProcessGroup | None:
    """The group to synchronize over, or ``None`` when no synchronization is possible.

    ``None`` resolves to the default (world) group when one is initialized.
    ``who`` names the layer in error messages.

    Raises:
        TypeError: ``process_group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: it names a group while no default group is initialized, or
            this rank is not a member of it.
    """
    global _resolved_a_group
    if process_group is None:
        if not is_distributed():
            return None
        _resolved_a_group = True
        return dist.group.WORLD
    if not dist.is_available():
        raise ValueError(
            f"{who} got a process_group, but this build of torch has no "
            "torch.distributed; pass process_group=None to normalize locally"
        )
    if is_non_member(process_group):
        where = (f"global rank {dist.get_rank()}" if dist.is_initialized()
                 else "no process group is initialized")
        raise ValueError(
            f"{who}'s process_group does not include this rank ({where}): "
            "torch.distributed.new_group() returns a placeholder on ranks outside the "
            "group, where the layer can only evaluate (eval mode); train it on the "
            "group's ranks, or give each rank the group it belongs to"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who} expected process_group to be a torch.distributed.ProcessGroup "
            f"or None, got {type(process_group).__name__}; create one with "
            "torch.distributed.new_group(ranks)"
        )
    if not dist.is_initialized():
        raise ValueError(
            f"{who} got a process_group, but the default process group is not "
            "initialized (or was destroyed); call torch.distributed.init_process_group() "
            "first, or pass process_group=None to normalize locally"
        )
    try:
        dist.get_rank(process_group)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"{who}'s process_group is not registered with torch.distributed (it "
            "was destroyed, or belongs to an earlier init_process_group); create it again "
            "with torch.distributed.new_group(ranks) and give it to the layer"
        ) from error
    _resolved_a_group = True
    return process_group


_resolved_a_group = False
"""Whether a layer of this process resolved a process group (see :func:`_let_workers_finish`)."""


def is_non_member(process_group: object) -> bool:
    """Whether ``process_group`` is the placeholder ``torch.distributed.new_group()`` returns
    on a rank outside the new group (``GroupMember.NON_GROUP_MEMBER``)."""
    return (dist.is_available() and isinstance(process_group, int)
            and not isinstance(process_group, bool)
            and process_group == dist.GroupMember.NON_GROUP_MEMBER)


def default_group() -> ProcessGroup | None:
    """The default (world) group, or ``None`` when none is initialized (cheap: no lookup of
    ranks)."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def registered(process_group: ProcessGroup | None) -> bool:
    """Whether a group (``None``: nothing to look up) is still registered with
    torch.distributed: a dict lookup, cheap enough for every step."""
    if process_group is None:
        return True
    try:
        return process_group in _c10d._world.pg_names
    except (AttributeError, TypeError):  # another torch: resolve_group checks it instead
        return False


def check_group_arg(process_group: object) -> None:
    """At construction or conversion: ``None``, a ProcessGroup (it may be initialized
    later), or the placeholder of a rank outside the group (:func:`is_non_member`).

    The placeholder is accepted as torch accepts it: every rank can build the same
    model with ``new_group(ranks)``'s result, and a layer holding it evaluates with
    its running statistics; only a synchronized training forward refuses it
    (:func:`resolve_group`). Anything else raises the error :func:`resolve_group`
    gives for it.
    """
    if (process_group is not None and not isinstance(process_group, dist.ProcessGroup)
            and not is_non_member(process_group)):
        resolve_group(process_group)


def group_size(process_group: ProcessGroup | None) -> int:
    """Number of ranks in the resolved group (1 without distributed)."""
    if process_group is None:
        return 1
    size: int = dist.get_world_size(process_group)
    return size


class SyncBatchNormError(RuntimeError):
    """A collective of a SyncBatchNorm layer failed, timed out, or ranks disagreed."""


DEBUG_ENV = "SYNCBN_DEBUG"
"""Set to 1 to exchange a fingerprint before every collective (see :func:`check_fingerprint`).

Read (:func:`env_debug`) at every eager training forward of a layer without ``debug=``;
under ``torch.compile``, when the layer is traced: a later change is ignored until
``torch._dynamo.reset()`` (or a new ``torch.compile``) and a new trace."""
TIMEOUT_ENV = "SYNCBN_TIMEOUT"
"""Seconds a rank waits for one collective of a layer (default: the group's own timeout).

Read (:func:`env_timeout`) as :data:`DEBUG_ENV` is: under ``torch.compile``, when the
layer is traced."""
WORLD_ENV = "WORLD_SIZE"
"""Set by torchrun and other launchers to the number of ranks of the job."""

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PHASES = ("forward", "backward", "shift")
"""A layer's collectives: the forward moments, the backward sums, and the shift exchange
of a layer with no shared reference point yet (see ``_stats.shift_policy``)."""


@dataclass(frozen=True)
class CallSite:
    """What a layer's collectives know besides the data: its name and settings.

    Everything here is fixed while a model trains (so a compiled graph can
    carry it as constants); what changes per call (the call count, the input's
    shape) travels beside it to the collective.
    """

    layer: str  # e.g. "backbone.layer1.0.bn1" (set by convert_sync_batchnorm) or a repr
    channels: int
    dtype: torch.dtype
    timeout_s: float | None  # None: the group's own timeout
    debug: bool
    eps: float = 0.0  # compared across ranks in debug mode
    decay: float = 0.0  # likewise (the EMA keep-rate)

    def describe(self, phase: str, call: object = "?", shape: tuple[int, ...] | None = None
                 ) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        where = "" if shape is None else f", input {tuple(shape)}"
        return (f"{layer_label(self.layer)} ({phase}, call {call}, C={self.channels}, "
                f"{dtype}{where})")


def layer_label(layer: str) -> str:
    """``SyncBatchNorm 'backbone.bn1'`` for a named layer, the name itself for a repr."""
    return layer if layer.endswith(")") and "(" in layer else f"SyncBatchNorm '{layer}'"


_DEBUG_ON = ("1", "true", "yes", "on")
_DEBUG_OFF = ("", "0", "false", "no", "off")


def env_debug() -> bool:
    """Whether :data:`DEBUG_ENV` asks for debug checks (unset or empty: no).

    Read when a layer's collectives are described: every eager training step, or
    once when ``torch.compile`` traces the layer (changing it then needs
    ``torch._dynamo.reset()`` or a new ``torch.compile``).

    Raises:
        ValueError: it is set to a value that is neither on nor off (e.g. ``2``,
            ``debug``); the message lists the accepted ones.
    """
    text = os.environ.get(DEBUG_ENV, "")
    value = text.strip().lower()
    if value in _DEBUG_ON:
        return True
    if value in _DEBUG_OFF:
        return False
    raise ValueError(
        f"{DEBUG_ENV} must be one of {', '.join(_DEBUG_ON)} (debug checks on) or "
        f"{', '.join(v for v in _DEBUG_OFF if v)} or empty (off), in any letter case, got "
        f"{text!r}; set {DEBUG_ENV}=1, or unset it"
    )


def env_timeout() -> float | None:
    """The timeout from :data:`TIMEOUT_ENV`, or ``None`` when unset.

    Read like :data:`DEBUG_ENV` (see :func:`env_debug`): every eager training
    step, or once when ``torch.compile`` traces the layer.

    Raises:
        ValueError: it is set but not a number of seconds from
            :data:`~syncbn._checks.MIN_TIMEOUT_S` (1 ms, the resolution of collective
            timeouts) to :data:`~syncbn._checks.MAX_TIMEOUT_S`.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S):  # `not <=`: NaN too
        raise ValueError(
            f"{TIMEOUT_ENV} must be a number of seconds from {MIN_TIMEOUT_S:g} to "
            f"{MAX_TIMEOUT_S:g}, got {text!r}{timeout_hint(value)}; set e.g. "
            f"{TIMEOUT_ENV}=60, or unset it for the group's own timeout"
        )
    return value


_warned_fallback = False


def warn_if_launched_without_group() -> None:
    """Warn once when a launcher says there are several ranks but no group is initialized.

    torchrun sets ``WORLD_SIZE``; without ``init_process_group`` every rank
    would silently normalize with its own batch only.
    """
    global _warned_fallback
    if _warned_fallback:
        return
    text = os.environ.get(WORLD_ENV, "").strip()
    if not text.isdigit() or int(text) <= 1 or is_distributed():
        return
    _warned_fallback = True
    warnings.warn(
        f"SyncBatchNorm: {WORLD_ENV}={text} says this job has several ranks, but no "
        "torch.distributed process group is initialized, so every rank normalizes with "
        "its own batch only (plain BatchNorm). Call torch.distributed.init_process_group() "
        "before training to synchronize the statistics.",
        RuntimeWarning, stacklevel=4,
    )


def _hint(debug: bool) -> str:
    causes = ("a rank may have skipped this layer (a data-dependent branch), run it in eval "
              "mode while the others train, called it a different number of times, skipped "
              "its backward (e.g. no gradient needed there), or died")
    if debug:
        return causes
    return f"{causes}; run with {DEBUG_ENV}=1 to find the rank and the layer"


STEP_KEY_BITS = 20
"""Every buffer carries one extra value, a key < 2**20 of (layer, phase, C)."""


def step_key(layer: str, phase: str, channels: int, eps: float = 0.0, decay: float = 0.0) -> int:
    """A number every rank computes alike at the same layer and phase: ``1 ≤ key ≤ 2**20``.

    It folds in the settings that change a layer's results (``eps`` and the EMA
    keep-rate ``decay``), so ranks whose layers differ in them are out of step
    too. It does not depend on how often the layer ran before, so ranks restored
    differently (one unpickled, one ``load_state_dict``) still agree.
    """
    text = f"{layer}#{phase}#{channels}#{float(eps)!r}#{float(decay)!r}"
    return zlib.crc32(text.encode()) % (1 << STEP_KEY_BITS) + 1


def env_settings() -> tuple[object, object]:
    """The raw values of :data:`TIMEOUT_ENV` and :data:`DEBUG_ENV` (a layer's decisions
    depend on them): read from ``os.environ``'s own mapping where it has one (no key
    encoding: a tenth of ``os.environ.get``'s cost, every step), else through it."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return data.get(_TIMEOUT_KEY), data.get(_DEBUG_KEY)
    return os.environ.get(TIMEOUT_ENV), os.environ.get(DEBUG_ENV)


_TIMEOUT_KEY = os.fsencode(TIMEOUT_ENV) if os.name != "nt" else TIMEOUT_ENV.upper()
_DEBUG_KEY = os.fsencode(DEBUG_ENV) if os.name != "nt" else DEBUG_ENV.upper()


def fold_key(key: int, data: Any) -> int:
    """``key`` with the CRC of ``data`` (a C-contiguous buffer) folded in."""
    return (key + zlib.crc32(data)) % (1 << STEP_KEY_BITS) + 1


def fold_state(key: int, running_mean: Tensor | None) -> int:
    """``key`` with a CRC of the running mean folded in (CPU tensors: read through a copy,
    :func:`_policy.host_bytes`), so that ranks whose running statistics differ are out of
    step as well."""
    if running_mean is None or not _policy.host_reads(running_mean.device):
        return key
    return fold_key(key, _policy.host_bytes(running_mean))


_broken_groups: list[ProcessGroup] = []


def _abort(process_group: ProcessGroup) -> str:
    """Abort a group whose collective failed, so its pending work ends and the process can exit.

    A timed-out gloo operation otherwise stays pending until the group's own
    timeout (30 minutes by default), and the interpreter waits for it at exit.
    Returns how the group was left, for the error message.
    """
    abort = getattr(process_group, "abort", None)
    if abort is None:
        return "this torch cannot abort the group"
    try:
        abort()
    except RuntimeError as error:  # some backends cannot abort; say so
        return f"aborting the group failed ({str(error).strip()[:120]})"
    _broken_groups.append(process_group)
    _keep_until_exit(process_group)
    return ("the process group was aborted (it cannot be used again; destroy it and "
            "re-initialize, or exit)")


def _keep_until_exit(process_group: ProcessGroup) -> None:
    """Never destroy a broken group, not even when the interpreter exits.

    Measured with gloo (torch 2.13, a peer alive but not taking part, group
    timeout 300 s): ``abort()`` returns at once but frees nothing; at exit the
    group's destructor joins gloo's worker thread, which still waits in the
    timed-out operation, so the process lived until the peer left or the group's
    timeout passed (42 s for a peer leaving after 40 s). One reference that is
    never released (the group is unusable anyway) makes that exit take 0.0 s.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(process_group))


_recent: collections.deque[Any] = collections.deque(maxlen=8)


def hold(work: Any) -> None:
    """Keep a finished work handle until 8 later ones have finished (or the process exits).

    A collective is marked complete on gloo's worker thread a moment before that
    thread drops its own reference to the handle. If this thread dropped its
    reference first, the handle, and its tensors, would be freed on the worker,
    which must take the GIL for that (a collective started in ``backward`` also holds
    the Python context torch stashes for the autograd engine); when the script exits
    right after its last collective, the interpreter may already be shutting down,
    and a thread that takes the GIL then is ended by ``pthread_exit``: SIGABRT at
    exit (see :func:`keep_work`). Held here, the handle is freed on this thread, by
    a later collective or the interpreter's own teardown.
    """
    _recent.append(work)


EXIT_GRACE_S = 0.02


@atexit.register
def _let_workers_finish() -> None:
    """At exit, give the collectives' worker threads the GIL for a moment (``EXIT_GRACE_S``).

    Other code's collectives (DDP's gradient buckets, a bare ``dist.all_reduce`` in a
    custom backward) are not held as :func:`hold` holds ours: a worker may be
    waiting for the GIL to free one when the script ends. Exit handlers run before
    the interpreter starts shutting down, so a worker that gets the GIL here
    finishes normally instead of being ended by the shutdown (SIGABRT). Measured:
    two gloo ranks timing a chain of SyncBatchNorm layers against one of local
    BatchNorms inside bare all-reduces (``tests/test_exit.py``), then
    ``destroy_process_group``: a rank exited −6 in 17 of 40 runs without this, 0 of
    40 with it. Only in a process where a SyncBatchNorm layer resolved a process
    group, or that still has a default group: a one-rank group (no SyncBatchNorm
    collective) whose script destroys it before exit still ran DDP's collectives
    (README's quick start exited −6 once in CI on torch 2.14.1 before this).
    """
    if _resolved_a_group or _agreed or is_distributed():
        time.sleep(EXIT_GRACE_S)


def keep_work(*handles: Any) -> None:
    """Never free these work handles (or futures): their collective may still be pending.

    A pending gloo collective ends on gloo's worker thread (a peer answers, or
    its connection closes when it exits), and if nothing else holds the handle
    the worker frees it there, with the tensors it holds. Freeing a tensor that
    Python has seen takes the GIL, and a thread that takes the GIL while the
    interpreter exits is ended by ``pthread_exit``, which unwinds through that
    ``noexcept`` destructor: ``std::terminate``, SIGABRT, exit code -6 instead of
    the error's 1 (measured: 4 exits in 6 of a rank that failed in
    ``syncbn.join`` while its poison message was pending). Every handle that an
    error leaves behind goes through here; the ones it holds are a few small
    tensors, kept for the process's lifetime.
    """
    for handle in handles:
        if handle is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(handle))


def _wait(work: Any, timeout_s: float | None, reads: bool = True) -> None:
    """Wait for ``work``: at most ``timeout_s`` where host reads are allowed (CPU), else
    plain ``wait()``, which only orders the streams on an accelerator (``wait(timeout)``
    would poll the device from the host until the collective ends); the group's own
    timeout and watchdog bound it there (see ``_policy``).

    Every wait of syncbn's comes here, so here the handle is kept from being freed on
    gloo's thread: held when it finished (:func:`hold`), kept for good when the wait
    failed (:func:`keep_work`: the collective may still be pending)."""
    try:
        if timeout_s is None or not reads:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout_s))
    except RuntimeError:
        keep_work(work)
        raise
    hold(work)


GATHER_MAX_RANKS = 4
"""Up to this many ranks, a gloo group sums syncbn's buffers as an all_gather (see
:func:`gathers`)."""


def gathers(process_group: ProcessGroup, tensor: Tensor) -> bool:
    """Whether syncbn sums ``tensor`` over the group as an ``all_gather`` of every rank's
    buffer and a local sum of the rows in rank order, rather than as an ``all_reduce``:
    on gloo groups of at most :data:`GATHER_MAX_RANKS` ranks, for CPU tensors under the
    host policy (``_policy``; the accelerator branch, forced on CPU by the tests, keeps
    the all-reduce it has on devices).

    gloo's all_reduce runs a reduce-scatter and then an all-gather, twice the
    message rounds of one all_gather, and syncbn's buffers (``2C + 2`` values) are
    small enough that the rounds, not the bytes, set the time. Measured on this
    repository's 2-core machine (torch 2.13, 130 float64, medians of 60 × 20 calls,
    two runs): 1136 and 1522 µs per all_reduce against 475 and 655 µs per all_gather
    at 2 ranks; 5.4 against 3.6 ms at 4 (oversubscribed).

    Why a cap on ``W``: the gather moves ``(W − 1)·n`` values into each rank where
    the ring all-reduce moves ``2(W − 1)/W·n``, and gloo copies each of the ``W``
    received rows out of its buffer (small copies, but ``W`` ops: a layer-step runs
    ``16 + 2W`` ops by ``syncbn.cli.kernels``' count, 16 with the all-reduce), which
    the cap keeps within the issue's bound of 25. Under ``syncbn.join`` the layers'
    collectives run on the join's shadow groups by all_reduce whatever this says
    (:func:`reduce_checked_`), so the join's replay and its mismatch messages
    (:func:`send_mismatch`) pair all-reduces as they always have.

    The sum of the rows is exact to one rounding per row, as the all-reduce's, and
    the same code on the same rows gives every rank bitwise the same result. NCCL
    keeps its all-reduce (its small all-reduces are latency-optimized, and a gather
    would add a kernel), as do CUDA tensors on gloo.

    The ranks of one collective must all gather or all reduce (an all_gather paired
    with an all_reduce waits for the timeout). The group's backend and size are alike
    on every rank; the tensor's device and the policy are each rank's own, so
    :func:`agree_on_mode` compares the answers once per group, before the first
    collective, and a disagreement (a gloo group mixing CPU and CUDA tensors) is an
    error on every rank at once. Under ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` torch wraps
    the backend in a checking wrapper: the wrapped backend decides.
    """
    if not _policy.host_reads(tensor.device) or process_group.size() > GATHER_MAX_RANKS:
        return False
    try:
        backend = process_group._get_backend(tensor.device)
    except (AttributeError, RuntimeError, ValueError):
        return False
    backend = getattr(backend, "wrapped_pg", backend)  # TORCH_DISTRIBUTED_DEBUG=DETAIL
    return isinstance(backend, getattr(dist, "ProcessGroupGloo", ()))


def _start_sum(tensor: Tensor, process_group: ProcessGroup, gather: bool
               ) -> tuple[Any, Tensor | None]:
    """Start summing ``tensor`` over the group (an all_gather where ``gather``, see
    :func:`gathers`, else an all_reduce); the work handle and, for a gather, the
    ``(W, numel)`` table that :func:`_finish_sum` sums once the work is done."""
    if gather:
        table = tensor.new_empty((process_group.size(), tensor.numel()))
        work = dist.all_gather(list(table.unbind()), tensor.reshape(-1), group=process_group,
                               async_op=True)
        return work, table
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group,
                           async_op=True), None


def _finish_sum(tensor: Tensor, table: Tensor | None) -> None:
    """Write the sum of ``table``'s rows, in rank order, into ``tensor`` (nothing after an
    all-reduce: ``table`` is ``None``). NumPy where it can view the dtype (no torch
    dispatch: this runs once per collective on the host)."""
    if table is None:
        return
    values = tensor.detach()
    if values.dim() == 1 and values.is_contiguous() and values.dtype in _NUMPY_SUMS:
        np.add.reduce(table.numpy(), axis=0, out=values.numpy())
    else:  # syncbn's buffers are 1-D float32/64; anything else by torch, row by row too
        values.copy_(table.sum(0).view_as(values))


_NUMPY_SUMS = (torch.float32, torch.float64)


def _all_reduce_sum(tensor: Tensor, process_group: ProcessGroup, site: CallSite, phase: str,
                    call: object, shape: tuple[int, ...], reads: bool = True,
                    note: str = "", gather: bool | None = None) -> None:
    """Sum over the group in place (see :func:`gathers`; ``gather`` overrides it), waiting
    at most ``site.timeout_s``; failures name the layer and the collective."""
    start = time.monotonic()
    if gather is None:
        gather = gathers(process_group, tensor)
    try:
        work, table = _start_sum(tensor, process_group, gather)
        _wait(work, site.timeout_s, reads)
        _finish_sum(tensor, table)
    except RuntimeError as error:
        elapsed = time.monotonic() - start
        if site.timeout_s is not None and elapsed >= 0.9 * site.timeout_s:
            what = f"did not complete within {site.timeout_s:g} s"
        else:
            what = f"failed after {elapsed:.2f} s"
        left = _abort(process_group)
        raise SyncBatchNormError(
            f"{site.describe(phase, call, shape)}: the "
            f"{'all_gather' if gather else 'all_reduce'} over "
            f"{group_size(process_group)} ranks {what} ({str(error).strip()[:300]}){note}; "
            f"{_hint(site.debug)}; {left}"
        ) from error


def _fingerprint(site: CallSite, phase: str) -> list[float]:
    layer_key = zlib.crc32(site.layer.encode())
    dtype_code = _DTYPE_CODES.index(site.dtype) if site.dtype in _DTYPE_CODES else -1
    return [float(layer_key), float(site.channels), float(dtype_code),
            float(PHASES.index(phase)), site.eps, site.decay]


_FIELDS = ("layer", "channels", "dtype", "phase", "eps", "momentum")


def check_fingerprint(site: CallSite, phase: str, process_group: ProcessGroup,
                      device: torch.device, call: object, shape: tuple[int, ...]) -> None:
    """Debug mode: all ranks compare (layer, C, dtype, phase, eps, momentum) first.

    A fixed-size all_gather of 6 float64 values per rank; on a mismatch every rank
    sees the same table, so all of them also gather the readable descriptions and
    raise the same :class:`SyncBatchNormError` naming the ranks that differ.
    """
    mine = torch.tensor(_fingerprint(site, phase), dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(group_size(process_group))]
    try:
        _wait(dist.all_gather(table, mine, group=process_group, async_op=True), site.timeout_s)
    except RuntimeError as error:
        left = _abort(process_group)
        raise SyncBatchNormError(
            f"{site.describe(phase, call, shape)}: the debug fingerprint exchange failed or "
            f"timed out ({str(error).strip()[:300]}); {_hint(site.debug)}; {left}"
        ) from error
    rows = torch.stack(table).cpu()
    differing = [name for j, name in enumerate(_FIELDS)
                 if not bool((rows[:, j] == rows[0, j]).all())]
    if not differing:
        return
    described: list[object] = [None] * len(table)
    text = (f"{site.describe(phase, call, shape)} eps={site.eps:g} "
            f"momentum={1.0 - site.decay:g}")
    dist.all_gather_object(described, text, group=process_group)
    lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(described))
    raise SyncBatchNormError(
        f"ranks disagree on {', '.join(differing)} at a SyncBatchNorm collective: {lines}. "
        "Every rank must run the same SyncBatchNorm layers, in the same order and mode, "
        "with the same channels, dtype, eps and momentum"
    )


def _group_by_name(group_name: str) -> ProcessGroup:
    """The registered group of that name (how a group travels through a compiled graph)."""
    return _c10d._resolve_process_group(group_name)


class JoinObserver(Protocol):
    """What :mod:`syncbn._join` installs for a group while ``syncbn.join`` is active."""

    def before(self, buffer: Tensor, layer: str, phase: str, channels: int, dtype: str,
               shape: list[int], call: int) -> str:
        """Record (and check) this collective; return the name of the group to run it on."""
        ...


_join_observers: dict[str, JoinObserver] = {}
"""Group name -> the observer of a ``syncbn.join`` in progress over that group."""


def set_join_observer(group_name: str, observer: JoinObserver | None) -> None:
    """Route the collectives of ``group_name`` through ``observer`` (``None`` removes it)."""
    if observer is None:
        _join_observers.pop(group_name, None)
    else:
        _join_observers[group_name] = observer


def rank_and_world() -> tuple[int, int]:
    """This process's rank in the default group and the number of ranks of the job."""
    return int(dist.get_rank()), int(dist.get_world_size())


def group_ranks(process_group: ProcessGroup) -> list[int]:
    """The global ranks of a group, in group-rank order."""
    return [int(r) for r in dist.get_process_group_ranks(process_group)]


def group_timeout(process_group: ProcessGroup) -> timedelta | None:
    """The group's own collective timeout, where this torch tells it (else ``None``)."""
    try:
        device = torch.device("cuda") if backend_name(process_group) == "nccl" \
            else torch.device("cpu")
        timeout = process_group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None
    return timeout if isinstance(timeout, timedelta) else None


def exchange_rows(row: list[int], timeout_s: float | None) -> list[list[int]]:
    """Every rank's ``row`` (ints, one length everywhere), all-gathered over the default group.

    Every rank of the job must call it. Waits at most ``timeout_s`` (``None``:
    the group's own timeout); a rank that does not come makes it raise
    :class:`SyncBatchNormError` (the default group is then aborted: it cannot be
    used again).
    """
    world = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) \
        if backend_name(world) == "nccl" else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    start = time.monotonic()
    try:
        _wait(dist.all_gather(table, mine, async_op=True), timeout_s)
    except RuntimeError as error:
        left = _abort(world)
        raise SyncBatchNormError(
            f"syncbn.join: every rank of the job must enter syncbn.join together (it creates "
            f"process groups), but the exchange over the {dist.get_world_size()} ranks failed "
            f"after {time.monotonic() - start:.2f} s ({str(error).strip()[:300]}); {left}"
        ) from error
    return [[int(v) for v in t.tolist()] for t in table]


def new_group_of(ranks: list[int], backend: str | None,
                 timeout: timedelta | None) -> ProcessGroup:
    """``dist.new_group(ranks)``: every rank of the job must call it, with the same ranks,
    in the same order as the others (torch's rule); ranks outside get a placeholder."""
    return dist.new_group(ranks=ranks, backend=backend, timeout=timeout)


def host_backend(backend: str | None) -> str | None:
    """The backend for small host-side messages: gloo (CPU tensors) where it is built in."""
    return "gloo" if dist.is_gloo_available() else backend


def destroy_group(process_group: ProcessGroup) -> None:
    """Destroy a group made by :func:`new_group_of` (only one with no pending work)."""
    dist.destroy_process_group(process_group)


def abort_group(process_group: ProcessGroup) -> None:
    """Abort a group whose work may be pending and never destroy it (see :func:`_abort`)."""
    _abort(process_group)


def keep_group(process_group: ProcessGroup) -> None:
    """Never destroy a group that may hold pending work (its destructor would wait for it)."""
    if not any(g is process_group for g in _broken_groups):
        _broken_groups.append(process_group)
        _keep_until_exit(process_group)


def post_sum(tensor: Tensor, process_group: ProcessGroup) -> Any:
    """Start a sum all-reduce of ``tensor`` in place over the group; its work handle."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group, async_op=True)


def wait_work(work: Any, timeout_s: float | None) -> None:
    """Wait for a work handle, at most ``timeout_s`` (``None``: the group's own timeout).

    Raises:
        RuntimeError: the collective failed or timed out (torch's error).
    """
    _wait(work, timeout_s)


def send_mismatch(process_group: ProcessGroup, numel: int, device: torch.device) -> None:
    """Take part in a peer's pending collective of ``numel`` float64 with step key 0.

    Keys are at least 1, so the peer's out-of-step check fails at once instead of
    waiting for a partner that will not come. Nothing waits for it (a peer may
    never come): the group must not be used again, and is never destroyed.
    """
    buffer = torch.zeros(numel, dtype=torch.float64, device=device)
    with contextlib.suppress(RuntimeError):  # best effort: an aborted group refuses at once
        # the collective a peer under syncbn.join runs (reduce_checked_: an all_reduce)
        keep_work(_start_sum(buffer, process_group, gather=False)[0])
    keep_group(process_group)


_agreed: set[tuple[str, int]] = set()
"""Groups whose ranks have compared their debug mode (see :func:`agree_on_mode`)."""


def agree_on_mode(process_group: ProcessGroup, group_name: str, site: CallSite, phase: str,
                  device: torch.device, call: object, shape: tuple[int, ...]) -> None:
    """Once per group and process, before its first SyncBatchNorm collective: every rank
    adds ``[debug on here, 1, gathers here]`` (3 float64, by an all_reduce whatever
    :func:`gathers` says) and reads the sum.

    Debug mode exchanges a fingerprint before each collective, so a rank in debug mode
    (``SYNCBN_DEBUG`` set on one node, or ``debug=True`` on one rank's layer) paired with
    ranks that are not would wait for a partner that never comes; likewise a rank that
    sums by all_gather paired with ranks that all-reduce (:func:`gathers`: a gloo group
    whose ranks hold CPU and CUDA tensors). Here every rank raises instead, at once,
    naming how many ranks differ. One host read, once (accelerators included). Its
    errors describe the collective it precedes.

    Raises:
        SyncBatchNormError: some ranks are in debug mode and others are not, or some
            ranks would sum by all_gather and others by all_reduce.
    """
    gather = gathers(process_group, torch.empty(0, device=device))
    flags = torch.tensor([1.0 if site.debug else 0.0, 1.0, 1.0 if gather else 0.0],
                         dtype=torch.float64, device=device)
    _all_reduce_sum(flags, process_group, site, phase, call, shape, gather=False,
                    note=" (the debug-mode check, once per group before its first collective)")
    debug_ranks, size, gathering = flags.tolist()
    _agreed.add((group_name, id(process_group)))
    if debug_ranks not in (0.0, size):
        raise SyncBatchNormError(
            f"{site.describe(phase, call, shape)}: debug mode is on for "
            f"{debug_ranks:.0f} of {size:.0f} ranks (this rank: "
            f"{'on' if site.debug else 'off'}); in debug mode every collective is preceded "
            f"by a fingerprint exchange, so every rank must agree: set {DEBUG_ENV} (or the "
            "layers' debug=) alike on every rank"
        )
    if gathering not in (0.0, size):
        raise SyncBatchNormError(
            f"{site.describe(phase, call, shape)}: {gathering:.0f} of {size:.0f} ranks would "
            f"sum by all_gather (gloo, CPU tensors) and the others by all_reduce (this rank: "
            f"{'all_gather' if gather else 'all_reduce'}, its input on {device}); the ranks "
            "of a group must pair the same collective: give every rank's layers inputs on "
            "the same kind of device"
        )


def reduce_checked_(buffer: Tensor, group_name: str, site: CallSite, phase: str, call: int,
                    shape: tuple[int, ...] | list[int] | torch.Size, key: int,
                    single_value_check: bool = False, host: Any = None
                    ) -> tuple[float, float] | None:
    """Sum ``buffer`` (float64, ``[…, count, key]``, the key already written) over the group
    in place: the one collective of the core, in eager code.

    Where host reads are allowed (``_policy.host_reads``: CPU) the two tail values
    are read back (``tolist``: no kernel) and returned as ``(global count, key
    sum)``; the key sum must be ``W·key`` (every rank at the same layer, phase and
    settings), else the ranks are out of step. On accelerators nothing is read
    (``None`` is returned) except in debug mode, whose fingerprint exchange comes
    first, and for ``single_value_check`` (a rank whose own count is ≤ 1): torch's
    error when the global count is 1. ``host`` is a NumPy view of ``buffer`` (CPU), from
    which the tail is read without a tensor op.

    Raises:
        SyncBatchNormError: the collective failed, timed out (the group is then
            aborted, so the process can exit), or the ranks were out of step.
        ValueError: torch's text, a global count of 1 with ``single_value_check``.
    """
    observer = _join_observers.get(group_name)
    if observer is not None:  # under syncbn.join: recorded, checked, run on the join's group
        group_name = observer.before(buffer, site.layer, phase, site.channels,
                                     str(site.dtype).replace("torch.", ""), list(shape), call)
    process_group = _group_by_name(group_name)
    shown: object = call if call >= 0 else "?"
    shape_t = tuple(shape)
    if (group_name, id(process_group)) not in _agreed:
        agree_on_mode(process_group, group_name, site, phase, buffer.device, shown, shape_t)
    if site.debug:
        check_fingerprint(site, phase, process_group, buffer.device, shown, shape_t)
    reads = host is not None or _policy.host_reads(buffer.device)
    # under syncbn.join every rank (active or replaying) sums by all_reduce, as the join's
    # mismatch messages do (send_mismatch): its shadow rounds keep the collective they
    # were built and tested with
    _all_reduce_sum(buffer, process_group, site, phase, shown, shape_t, reads,
                    gather=False if observer is not None else None)
    if not (reads or site.debug or single_value_check):
        return None
    if host is not None:
        count, total = float(host[-2]), float(host[-1])
    else:
        count, total = buffer[-2:].tolist()
    if reads or site.debug:
        size = process_group.size()
        if total != size * key:
            raise SyncBatchNormError(
                f"{site.describe(phase, shown, shape_t)}: the ranks are out of step: this "
                f"rank's collective was paired with another layer or phase on some rank, or "
                f"the ranks' settings (eps, momentum) or running statistics differ (step keys "
                f"sum to {total:.0f}, not {size}×{key}), so its values are wrong; "
                f"{_hint(site.debug)}"
            )
    if single_value_check and count == 1:
        raise single_value_error(1)
    return count, total


@_ops.operator("all_reduce")
def _all_reduce_op(
    buffer: Tensor, call_count: int, group_name: str, layer: str,
    phase: str, channels: int, dtype: str, shape: list[int], timeout_s: float, debug: bool,
    eps: float, decay: float, single_value_check: bool,
) -> Tensor:
    """The collective in compiled code, opaque to torch.compile (see :func:`all_reduce_checked`).

    Its site and step key are built once per set of constants (:func:`_op_site`), and on
    CPU the key goes in and the tail comes out through a NumPy view: no tensor op beyond
    the copy and the all-reduce."""
    site, key = _op_site(layer, phase, channels, dtype, timeout_s, debug, eps, decay)
    out, host = _keyed_copy(buffer, key)
    reduce_checked_(out, group_name, site, phase, call_count, shape, key, single_value_check,
                    host=host)
    return out


def _keyed_copy(buffer: Tensor, key: int) -> tuple[Tensor, Any]:
    """A copy of ``buffer`` with ``key`` in its last slot, and a NumPy view of the copy where
    host reads are allowed (CPU: the key is written and the tail read without a tensor op),
    else ``None``."""
    out = buffer.clone()
    host = out.numpy() if _policy.host_reads(out.device) else None
    if host is not None:
        host[-1] = key
    else:
        out[-1] = float(key)
    return out, host


@functools.lru_cache(maxsize=1024)
def _op_site(layer: str, phase: str, channels: int, dtype: str, timeout_s: float, debug: bool,
             eps: float, decay: float) -> tuple[CallSite, int]:
    """The :class:`CallSite` and step key of the compiled collective's constants."""
    site = CallSite(layer, channels, getattr(torch, dtype), None if timeout_s <= 0 else timeout_s,
                    debug, eps, decay)
    return site, step_key(layer, phase, channels, eps, decay)


@_ops.fake("all_reduce")
def _(buffer: Tensor, call_count: int, group_name: str, layer: str,
      phase: str, channels: int, dtype: str, shape: list[int], timeout_s: float, debug: bool,
      eps: float, decay: float, single_value_check: bool) -> Tensor:
    return torch.empty_like(buffer)


# A collective is a side effect: compiled code must run it on every rank even where its
# result feeds nothing that is kept (an empty rank's outputs), so neither FX nor inductor
# may eliminate it. (Effect tokens would also order it, but torch 2.13 cannot carry them
# through compiled autograd and checkpointed backward graphs.) The backward buffer is
# computed from the incoming gradient, so the partitioner keeps it in the backward graph.
torch.fx.node.has_side_effect(torch.ops.syncbn.all_reduce.default)


def single_value_error(count: int) -> ValueError:
    """torch's error for a training batch with one value per channel."""
    return ValueError(
        f"Expected more than 1 value per channel when training, got input size {count}"
    )


def all_reduce_checked(buffer: Tensor, group_name: str, site: CallSite, phase: str,
                       call: int, shape: tuple[int, ...] | list[int] | torch.Size,
                       single_value_check: bool = False, key: int | None = None,
                       state: Tensor | None = None) -> Tensor:
    """Sum ``buffer`` (float64, ``2C + 2`` values, the last a free slot for the step key)
    over the group and return the sum as a new tensor.

    Every direction sends buffers of one size, ``2C + 2``: the forward
    ``[Σ(x − s), Σ(x − s)², count, key]``, the backward ``[Σdy, Σdy·x̂, 0, key]``
    and the shift exchange ``[Σx, 0, count, key]``. The key (:func:`step_key`) is
    written into the last slot and checked as :func:`reduce_checked_` says.
    Compiled and traced code calls the operator ``syncbn::all_reduce`` (it
    returns a new tensor, so ``torch.compile`` keeps it whole, with no graph
    break, and never drops it); eager code runs the same steps directly.
    ``group_name`` is the group's ``group_name`` (a string travels through a
    compiled graph; the group itself is looked up inside the op). ``key`` overrides the
    step key in eager code; ``state`` (the running mean, forward phase) is folded into it
    (:func:`fold_state`).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        out: Tensor = _all_reduce_op(
            buffer, call, group_name, site.layer, phase, site.channels,
            str(site.dtype).replace("torch.", ""), list(shape),
            -1.0 if site.timeout_s is None else site.timeout_s, site.debug, site.eps,
            site.decay, single_value_check,
        )
        return out
    if key is None:
        key = fold_state(step_key(site.layer, phase, site.channels, site.eps, site.decay), state)
    out, host = _keyed_copy(buffer, key)
    reduce_checked_(out, group_name, site, phase, call, shape, key, single_value_check,
                    host=host)
    return out


def backend_name(process_group: ProcessGroup | None) -> str:
    """The group's backend name ('gloo', 'nccl', …), or 'none' without a group."""
    if process_group is None:
        return "none"
    return str(dist.get_backend(process_group))


__all__ = [
    "CallSite",
    "ProcessGroup",
    "SyncBatchNormError",
    "all_reduce_checked",
    "backend_name",
    "group_size",
    "is_distributed",
    "resolve_group",
]
