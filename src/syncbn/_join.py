"""``syncbn.join``: uneven numbers of batches per rank, on torch's generic join machinery.

A rank that has run out of batches keeps taking part in every SyncBatchNorm
collective of the ranks still training, with an empty batch: count 0, sums 0,
the same step keys. The active ranks therefore get the statistics of the
active ranks' batches exactly, and nobody waits forever.

Groups. At entry every rank of the job exchanges (one all-gather over the
default group) the ranks of its layers' group and of its DDP group; then every
rank creates, in the same order, for each distinct layers' group a *shadow*
group (every SyncBatchNorm collective of those layers runs there while the
context is active: an observer in ``_comm._all_reduce_op``, so they never
interleave with DDP's gradient all-reduces) and a *control* group, and for
each DDP group of other ranks than its layers' a *loop* group (torch's rule
for ``new_group``: every rank, every group, one order).

Control messages. Every message on a control or loop group (gloo where it is
built in: host tensors, so reading one never waits for a device) is one SUM
all-reduce of :data:`_MESSAGE` float64 values, so any two messages pair
without a size mismatch:

- an *iteration slot*: each forward of ``model`` on an active rank posts 1,
  each round of a rank that has run out of batches posts 0; the sum is the
  number of active ranks (on the loop group: DDP's ranks; on the control
  group: the layers' ranks). Everyone has joined when it is 0.
- a *description*: in the first iteration, when some rank has run out of
  batches before any (it has nothing recorded to replay), the active ranks
  describe each SyncBatchNorm collective just before it runs (phase, the
  layer's index among the model's SyncBatchNorm layers, the input's shape and
  dtype) and the end of the iteration; values and their squares are summed,
  so ranks that disagree are seen by all.
- *poison*: a rank that leaves the context with an error posts
  :data:`_POISON` as its next message on each of its groups; whoever reads it
  (a rank waiting for the next iteration, or in the middle of a description)
  raises :class:`SyncBatchNormError` at once, naming that rank.

Recording and checking. Every rank records the SyncBatchNorm collectives of
each iteration (one iteration: from one forward of ``model`` to the next) in
order: phase, layer, C, the input's shape and dtype, the module (found by its
unique name, else by a forward pre-hook). Once a rank of the layers' group has
joined, the active ranks check each collective against their own last
iteration: one that differs (a data-dependent branch, a layer skipped in the
last step) cannot be shadowed; the active rank then sends a buffer with step
key 0 into the joined ranks' pending replay (their out-of-step check fails at
once) and raises, naming join as the cause; a collective after the recorded
ones raises likewise, and the joined ranks learn it from the poison.

Shadowing. A rank that has run out of batches runs rounds, one per iteration
of the others, until everyone has joined; each round, on one thread:

1. with DDP, what DDP's forward does on the active ranks (bucket rebuild,
   buffer broadcast, the "sync gradients?" all-reduce), then it starts the
   zero-gradient bucket all-reduces of DDP's backward without waiting;
2. the replay of its last recorded iteration on copies of its layers (or the
   described one): each forward on an empty input ``(0, …)`` in the layer's
   own layout (channel-last for Paddle's ``NHWC`` & co.), each backward on a
   zero gradient, in the recorded order (the copies' running statistics follow
   the active ranks' bit for bit, and with them each layer's shift and whether
   its forward first exchanges one: shift exchanges are routed, not recorded;
   a described forward is described before its shift exchange);
3. it posts the next iteration slot and waits for DDP's buckets, unless that
   slot brings poison.

Nothing waits on another thread, so an error leaves only pending work in
groups that are never destroyed, and the process exits normally. At the end
the copies' running statistics go into the joined rank's layers; with DDP the
final model is then broadcast from the last rank to join (DDP's post hook).
Gradients are divided by the initial world size, as DDP's ``join()`` does by
default. ``throw_on_early_termination=True`` is torch's ``Join`` unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.parallel import DistributedDataParallel

from . import _comm

__all__ = ["join"]

_ADVICE = ("under syncbn.join every iteration must run the same SyncBatchNorm layers in the "
           "same order, forward and backward, as the last one (no data-dependent branches "
           "through them, no layer skipped): a rank that has run out of batches shadows the "
           "others by replaying its last iteration. Give every rank the same number of "
           "batches (e.g. DistributedSampler(..., drop_last=True)) or pass "
           "throw_on_early_termination=True")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_DIMS = 5

# one control message: [tag, failed ranks' (rank + 1), fields..., squares of the fields...]
_FIELDS = ("kind", "phase", "layer", "channels", "numel", "dtype", "ndim", "d1", "d2", "d3",
           "d4", "call")
_MESSAGE = 2 + 2 * len(_FIELDS)
_POISON = float(2 ** 30)
"""A failed rank's tag: larger than any number of active ranks."""
_KIND_COLLECTIVE, _KIND_END = 1.0, 2.0
_UNCHECKED = ("call",)  # ranks may count a layer's calls differently; a mean still pairs
_ROW_WORDS_BITS = 62


@dataclass(frozen=True)
class _Event:
    """One SyncBatchNorm collective of an iteration."""

    phase: str
    layer: str
    channels: int
    numel: int
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    call: float
    module: nn.Module | None

    def same_as(self, other: _Event) -> bool:
        return (self.phase, self.layer, self.channels, self.numel) == (
            other.phase, other.layer, other.channels, other.numel)

    def describe(self) -> str:
        return f"{_comm.layer_label(self.layer)} {self.phase} (C={self.channels})"


def _sequence(events: list[_Event]) -> str:
    shown = ", ".join(e.describe() for e in events[:8])
    return shown + (", …" if len(events) > 8 else "")


class _Channel:
    """Control messages on one group: fixed-size SUM all-reduces, paired in posting order."""

    def __init__(self, group: Any, device: torch.device, rank: int, what: str) -> None:
        self.group = group
        self.device = device
        self.rank = rank
        self.size = _comm.group_size(group)
        self.what = what  # "the layers' ranks" / "DDP's ranks", for messages
        self.unread: list[Any] = []  # posted messages not read yet: pending, maybe for good

    def post(self, tag: float = 0.0, fields: list[float] | None = None) -> tuple[Any, Tensor]:
        message = torch.zeros(_MESSAGE, dtype=torch.float64)
        message[0] = tag
        if tag >= _POISON:
            message[1] = self.rank + 1
        if fields is not None:
            values = torch.tensor(fields, dtype=torch.float64)
            message[2:2 + len(_FIELDS)] = values
            message[2 + len(_FIELDS):] = values * values
        message = message.to(self.device)
        work = _comm.post_sum(message, self.group)
        self.unread.append(work)
        return work, message

    def read(self, posted: tuple[Any, Tensor], timeout_s: float | None) -> Tensor:
        """The summed message; raises :class:`SyncBatchNormError` on failure or poison."""
        work, message = posted
        # from here _comm's wait owns the handle: held if it finishes, kept if it fails
        self.unread = [w for w in self.unread if w is not work]
        start = time.monotonic()
        try:
            _comm.wait_work(work, timeout_s)
        except RuntimeError as error:
            self.abandon()
            _comm.abort_group(self.group)
            raise _comm.SyncBatchNormError(
                f"syncbn.join: rank {self.rank} waited {time.monotonic() - start:.2f} s for "
                f"the other ranks of the join ({self.what}) and got no answer "
                f"({str(error).strip()[:300]}); a rank may have died or stopped taking part"
            ) from error
        summed = message.cpu()
        self.check(summed)
        return summed

    def abandon(self) -> None:
        """Leaving with an error: the unread messages are never freed (``_comm.keep_work``)."""
        _comm.keep_work(*self.unread)
        self.unread.clear()

    def check(self, summed: Tensor) -> None:
        failed = int(float(summed[0]) // _POISON)
        if failed == 0:
            return
        who = (f"rank {int(summed[1]) - 1}" if failed == 1
               else f"{failed} ranks (their ranks + 1 sum to {int(summed[1])})")
        raise _comm.SyncBatchNormError(
            f"syncbn.join: {who} left syncbn.join with an error (see its log), so rank "
            f"{self.rank} stops too instead of waiting for its next iteration; the join's "
            "process groups cannot be used again, end the job")

    def completed(self, posted: tuple[Any, Tensor]) -> bool:
        return bool(posted[0].is_completed())


def _fields(event: _Event, index: int) -> list[float]:
    dims = [*event.shape[1:_MAX_DIMS], *[0] * _MAX_DIMS][:_MAX_DIMS - 1]
    code = _DTYPES.index(event.dtype) if event.dtype in _DTYPES else -1
    return [_KIND_COLLECTIVE, float(event.phase == "backward"), float(index),
            float(event.channels), float(event.numel), float(code), float(len(event.shape)),
            *map(float, dims), event.call]


def _end_fields() -> list[float]:
    return [_KIND_END] + [0.0] * (len(_FIELDS) - 1)


class _Recorder:
    """The observer of one group: records iterations, checks them, routes to the shadow group."""

    def __init__(self, context: _JoinContext) -> None:
        self.context = context
        self.rank = context.rank
        self.by_name: dict[str, nn.Module] = {}  # layers whose name no other layer has
        self.index_of: dict[int, int] = {id(m): i for i, m in enumerate(context.layers)}
        self.first_named: dict[str, int] = {}  # a layer name -> the first layer of that name
        for i, m in enumerate(context.layers):
            self.first_named.setdefault(str(getattr(m, "layer_name", "")), i)
        self.iterations = 0  # forwards of the model inside the context
        self.pending: nn.Module | None = None  # else: the layer whose forward runs (a hook)
        self.current: list[_Event] = []
        self.reference: list[_Event] | None = None  # the previous iteration
        self.frozen = False  # this rank has joined: it replays, nothing more to record
        self.entered_at = -1  # the replayed event whose collectives started last
        self.described_ahead: tuple[str, float] | None = None  # a forward described at its shift
        self.slots: list[tuple[Any, Tensor]] = []  # this iteration's slots, not read yet
        self.joined_others = False  # a rank of the layers' group was not active this iteration
        self.describing = False  # this iteration is described to ranks with nothing recorded
        self.mismatch_sent = -1  # the position a mismatch was sent for, this iteration

    def new_iteration(self) -> None:
        """Called at each forward of the model, before its collectives."""
        self.check_complete()
        self.end_description()  # after check_complete: it may learn only now that some joined
        self.reference = self.current if self.iterations else None  # None: the first
        self.iterations += 1
        self.current = []
        self.joined_others, self.mismatch_sent = False, -1
        self.slots = self.context.post_slots(1.0)

    def read_slots(self) -> None:
        """The first collective of an iteration: who is active, and did anyone fail?"""
        if not self.slots:
            return
        slots, self.slots = self.slots, []
        active = [self.context.read(channel, posted, _comm.env_timeout())
                  for channel, posted in zip(self.context.channels, slots, strict=True)]
        self.context.layer_active = round(float(active[0][0]))
        self.joined_others = self.context.layer_active < self.context.control.size
        if self.joined_others and self.reference is None:
            self.describing = True  # a rank joined before its first iteration

    def end_description(self) -> None:
        if self.describing:
            self.describing = False
            control = self.context.control
            summed = self.context.read(control, control.post(0.0, _end_fields()),
                                       _comm.env_timeout())
            _decode(summed, self.context.layer_active, self.context)

    def check_complete(self) -> None:
        """The iteration that ends ran every collective the joined ranks replay."""
        self.read_slots()
        ref = self.reference
        if ref is None or self.frozen or len(self.current) >= len(ref) \
                or not self.joined_others:
            return
        missing = ref[len(self.current)]
        self.send_mismatch(len(self.current))
        raise _comm.SyncBatchNormError(
            f"syncbn.join: this iteration ran {len(self.current)} SyncBatchNorm collectives, "
            f"the last one {len(ref)} ({_sequence(ref)}); a rank that has run out of batches "
            f"is waiting in {missing.describe()}, which will not come. {_ADVICE}"
        )

    def send_mismatch(self, position: int) -> None:
        """Fail the joined ranks' replay of ``reference[position]`` at once (if not done yet)."""
        ref = self.reference
        if ref is None or position >= len(ref) or not self.joined_others \
                or self.mismatch_sent == position:
            return
        self.mismatch_sent = position
        _comm.send_mismatch(self.context.shadow, ref[position].numel, ref[position].device)

    def before(self, buffer: Tensor, layer: str, phase: str, channels: int, dtype: str,
               shape: list[int], call: int) -> str:
        if self.frozen:  # a replay's collective: the event it belongs to has started
            self.entered_at = self.context.replayer.position
            return self.context.shadow_name
        self.read_slots()  # once per iteration, at its first collective
        if phase == "shift":
            # a shift exchange is part of its layer's forward, decided by the layer's state:
            # a replayed forward makes the same decision, so it is routed, not recorded; a
            # forward being described is described now, before its shift exchange
            if self.describing:
                module = self.by_name.get(layer, self.pending)
                self.describe(_Event("forward", layer, channels, 2 * channels + 2,  # its buffer
                                     getattr(torch, dtype), buffer.device, tuple(shape),
                                     float(call), module))
                self.described_ahead = (layer, float(call))
            return self.context.shadow_name
        module = None
        if phase == "forward":  # a layer of a unique name, else the one whose forward runs
            module = self.by_name.get(layer, self.pending)
            self.pending = None
        event = _Event(phase, layer, channels, buffer.numel(), getattr(torch, dtype),
                       buffer.device, tuple(shape), float(call), module)
        if self.describing and self.described_ahead != (layer, float(call)):
            self.describe(event)
        self.described_ahead = None
        ref, j = self.reference, len(self.current)
        if ref is not None and self.joined_others and (j >= len(ref) or not ref[j].same_as(event)):
            self.send_mismatch(j)
            there = (f"the last iteration ran {ref[j].describe()} there" if j < len(ref)
                     else f"the last iteration ran only {len(ref)}")
            raise _comm.SyncBatchNormError(
                f"syncbn.join: {event.describe()} is SyncBatchNorm collective {j + 1} of this "
                f"iteration, but {there} ({_sequence(ref)}), and a rank that has run out of "
                f"batches replays the last iteration, so it cannot take part. {_ADVICE}"
            )
        self.current.append(event)
        return self.context.shadow_name

    def describe(self, event: _Event) -> None:
        """Tell the ranks that joined before their first iteration what comes next."""
        if event.phase == "forward":
            index = -1 if event.module is None else self.index_of.get(id(event.module), -1)
        else:  # a backward is matched to its forward by name and call: any layer of the name
            index = self.first_named.get(event.layer, -1)
        control = self.context.control
        summed = self.context.read(control, control.post(0.0, _fields(event, index)),
                                   _comm.env_timeout())
        _decode(summed, self.context.layer_active, self.context)  # the joined ranks' checks


def _decode(summed: Tensor, describers: int, context: _JoinContext) -> _Event | None:
    """A description from the active ranks: the next collective, or None at the iteration's end.

    ``describers`` active ranks each added their fields (and squares); the others 0.

    Raises:
        SyncBatchNormError: the active ranks described different collectives, or a layer
            that cannot be replayed.
    """
    n = len(_FIELDS)
    sums, squares = summed[2:2 + n].tolist(), summed[2 + n:].tolist()
    k = max(describers, 1)
    differ = [name for name, total, square in zip(_FIELDS, sums, squares, strict=True)
              if name not in _UNCHECKED and square * k != total * total]
    fields = {name: total / k for name, total in zip(_FIELDS, sums, strict=True)}
    if differ or fields["kind"] not in (_KIND_COLLECTIVE, _KIND_END):
        raise _comm.SyncBatchNormError(
            f"syncbn.join: a rank ran out of batches before its first iteration, so the "
            f"{describers} active rank(s) describe each SyncBatchNorm collective to it, but "
            f"they described different ones (their {', '.join(differ) or 'kind'} differ): "
            f"the ranks run different SyncBatchNorm layers. {_ADVICE}")
    if fields["kind"] == _KIND_END:
        return None
    index = int(fields["layer"])
    if not 0 <= index < len(context.layers):
        raise _comm.SyncBatchNormError(
            f"syncbn.join: a rank ran out of batches before its first iteration, and the "
            f"active ranks' SyncBatchNorm collective (C={int(fields['channels'])}) is not one "
            "of the SyncBatchNorm layers of the model given to syncbn.join (so its module "
            f"cannot be found and replayed). {_ADVICE}")
    module = context.layers[index]
    dims = [int(fields[f"d{i}"]) for i in range(1, int(fields["ndim"]))]
    return _Event("backward" if fields["phase"] else "forward",
                  str(getattr(module, "layer_name", "")), int(fields["channels"]),
                  int(fields["numel"]), _DTYPES[int(fields["dtype"])], context.device,
                  (0, *dims), fields["call"], module)


def _empty_input(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """An empty batch in the layer's own layout: ``(0, C, …)``, or ``(0, …, C)`` with C last.

    ``shape`` is channels-first (as the collective sees the input). Paddle's layers
    take channel-last input for ``'NLC'``, ``'NHWC'`` and ``'NDHWC'``.
    """
    dims: tuple[int, ...] = (0, *shape[1:])
    layout = getattr(type(module), "_layout", None)
    data_format = getattr(module, "data_format", None)
    if layout is not None and isinstance(data_format, str) and len(shape) > 2 \
            and layout.channel_last(data_format):
        dims = (0, *shape[2:], shape[1])
    return torch.zeros(dims, dtype=dtype, device=device, requires_grad=True)


class _Replayer:
    """A joined rank's copies of the layers and the replay of one iteration."""

    def __init__(self) -> None:
        self.record: list[_Event] | None = None
        self.copies: dict[int, nn.Module] = {}
        self.originals: dict[int, nn.Module] = {}
        self.position = 0  # the index of the event being replayed
        self.event: _Event | None = None  # the event being replayed, if any

    def copy_of(self, module: nn.Module) -> nn.Module:
        key = id(module)
        if key not in self.copies:
            self.originals[key] = module
            self.copies[key] = copy.deepcopy(module)
        return self.copies[key]

    def replay(self, events: Callable[[], _Event | None]) -> list[_Event]:
        """One iteration: forwards on empty inputs, backwards on zero gradients, in order."""
        open_outputs: list[tuple[str, float, Tensor]] = []
        done: list[_Event] = []
        self.position = 0
        with torch.enable_grad():
            while True:
                self.event = None
                event = events()
                if event is None:
                    return done
                self.event = event
                self.step(event, open_outputs)
                done.append(event)
                self.position += 1

    def step(self, event: _Event, open_outputs: list[tuple[str, float, Tensor]]) -> None:
        if event.phase == "forward":
            if event.module is None:
                raise _comm.SyncBatchNormError(
                    f"syncbn.join: cannot replay {event.describe()}: its module was "
                    f"not found in the model given to syncbn.join. {_ADVICE}")
            layer = self.copy_of(event.module)
            leaf = _empty_input(layer, event.shape, event.dtype, event.device)
            open_outputs.append((event.layer, event.call, layer(leaf.clone())))
            return
        index = next((i for i in range(len(open_outputs) - 1, -1, -1)
                      if open_outputs[i][:2] == (event.layer, event.call)), None)
        if index is None:
            raise _comm.SyncBatchNormError(
                f"syncbn.join: cannot replay {event.describe()}: its forward was not "
                f"in the same iteration. {_ADVICE}")
        out = open_outputs.pop(index)[2]
        torch.autograd.backward(out, torch.zeros_like(out))

    def copy_back(self) -> None:
        """Give the joined rank's layers the running statistics the replays tracked."""
        with torch.no_grad():
            for key, original in self.originals.items():
                for name, buffer in self.copies[key].named_buffers():
                    original.get_buffer(name).copy_(buffer)


class _DDPShadow:
    """What DDP's own join hook does on a joined rank, split so that nothing waits on a thread.

    The same steps as ``_DDPJoinHook.main_hook``, in the same order on DDP's group
    (bucket rebuild, buffer broadcast, the "sync gradients?" all-reduce, one
    all-reduce per bucket, the unused-parameter map), but the bucket all-reduces
    are only started before the SyncBatchNorm replay and waited for after it.
    """

    _NEEDS = ("_check_and_sync_module_buffers", "_check_global_requires_backward_grad_sync",
              "_match_unused_params_allreduce", "reducer")
    _REDUCER_NEEDS = ("_rebuild_buckets", "_get_zeros_like_grad_buckets", "_run_comm_hook",
                      "_push_all_rebuilt_params")

    def __init__(self, ddp: Any, hook: JoinHook) -> None:  # Any: DDP's private API
        missing = [n for n in self._NEEDS if not hasattr(ddp, n)] + [
            n for n in self._REDUCER_NEEDS if not hasattr(getattr(ddp, "reducer", None), n)]
        if missing:
            raise RuntimeError(
                "syncbn.join does not know this torch's DistributedDataParallel (it shadows "
                f"DDP's join steps itself; missing {', '.join(missing)}); use "
                "DistributedDataParallel.join() with throw_on_early_termination=True instead")
        self.ddp = ddp
        self.hook = hook
        self.sync = False

    def before_forward(self) -> None:
        ddp = self.ddp
        ddp.reducer._rebuild_buckets()
        ddp._check_and_sync_module_buffers()
        self.sync = bool(ddp._check_global_requires_backward_grad_sync(is_joined_rank=True))
        ddp.require_forward_param_sync = self.sync

    def start_backward(self) -> list[Any]:
        if not self.sync:
            return []
        reducer = self.ddp.reducer
        return [reducer._run_comm_hook(bucket)
                for bucket in reducer._get_zeros_like_grad_buckets()]

    def finish_backward(self, futures: list[Any]) -> None:
        for future in futures:
            future.wait()
        if not self.sync:
            return
        if self.ddp.find_unused_parameters:
            self.ddp._match_unused_params_allreduce()
        self.ddp.reducer._push_all_rebuilt_params()


class _SyncBNJoinable(Joinable):
    """Makes torch's ``Join`` configure DDP (and, with throw_on_early_termination, run)."""

    def __init__(self, context: _JoinContext) -> None:
        super().__init__()
        self._context = context

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return JoinHook()  # only torch's throw_on_early_termination path runs hooks: none here

    @property
    def join_device(self) -> torch.device:
        return self._context.device

    @property
    def join_process_group(self) -> Any:
        return self._context.join_group


def _bits(ranks: list[int], words: int) -> list[int]:
    out = [0] * words
    for r in ranks:
        out[r // _ROW_WORDS_BITS] |= 1 << (r % _ROW_WORDS_BITS)
    return out


def _unbits(words: list[int]) -> tuple[int, ...]:
    return tuple(i * _ROW_WORDS_BITS + b for i, w in enumerate(words)
                 for b in range(_ROW_WORDS_BITS) if w >> b & 1)


class _JoinContext:
    """The context manager ``syncbn.join`` returns."""

    def __init__(self, model: nn.Module, enable: bool, throw_on_early_termination: bool
                 ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"syncbn.join expected a torch.nn.Module (or a "
                            f"DistributedDataParallel), got {type(model).__name__}")
        self.model = model
        self.enable = enable
        self.throw = throw_on_early_termination
        self.ddp = model if isinstance(model, DistributedDataParallel) else None
        self.join: Any = None
        self.recorder: _Recorder | None = None
        self.replayer = _Replayer()
        self.ddp_shadow: _DDPShadow | None = None
        self.handles: list[Any] = []
        self.layers: list[nn.Module] = []
        self.group_name = ""
        self.shadow: Any = None
        self.shadow_name = ""
        self.control: _Channel = None  # type: ignore[assignment]  # set with the recorder
        self.channels: list[_Channel] = []  # control first, then the loop group's if another
        self.made: list[Any] = []  # groups this context created
        self.ddp_futures: list[Any] = []  # DDP's bucket all-reduces while pending: a
        # failure then leaves work in DDP's group
        self.failed = False
        self.join_group: Any = None
        self.device = torch.device("cpu")
        self.rank = 0
        self.layer_active = 0  # active ranks of the layers' group in this iteration

    # --- entry ---------------------------------------------------------------------------

    def __enter__(self) -> _JoinContext:
        if not self.enable:
            return self
        inner: nn.Module = self.ddp.module if self.ddp is not None else self.model
        self.layers = [m for m in inner.modules() if hasattr(m, "_syncbn_calls")]
        groups = {id(g): g for g in (_comm.resolve_group(getattr(m, "process_group", None))
                                     for m in self.layers) if g is not None}
        several = len(groups) > 1
        made: tuple[Any, Any, Any] = (None, None, None)
        if not self.throw and _comm.is_distributed():
            made = self._make_groups(None if several or not groups
                                     else next(iter(groups.values())), several)
        if several:
            raise ValueError(
                f"syncbn.join expected the SyncBatchNorm layers of the model to share one "
                f"process group, got {len(groups)}; join the model's parts separately or "
                "give them one group")
        if not groups:  # nothing synchronizes: only DDP's join, if any
            if self.ddp is not None:
                self.join = self.ddp.join(enable=True, throw_on_early_termination=self.throw)
                self.join.__enter__()
            return self
        group = next(iter(groups.values()))
        self.group_name = str(group.group_name)
        self.join_group = self.ddp.process_group if self.ddp is not None else group
        self.device = next((t.device for t in (*inner.parameters(), *inner.buffers())),
                           torch.device("cpu"))
        self.rank = _comm.rank_and_world()[0]
        joinables: list[Joinable] = [_SyncBNJoinable(self)]
        if self.ddp is not None:
            joinables.append(self.ddp)
        self.join = Join(joinables, enable=True, throw_on_early_termination=self.throw,
                         divide_by_initial_world_size=True)
        joinable = joinables[0]
        if self.throw:  # torch's Join as is: every rank raises once one has run out
            def notify(module: nn.Module, args: Any) -> None:
                Join.notify_join_context(joinable)

            self.handles.append(self.model.register_forward_pre_hook(notify))
            self.join.__enter__()
            return self
        self.shadow, control, loop = made
        self.made = [g for g in (self.shadow, control, loop) if g is not None]
        self.shadow_name = str(self.shadow.group_name)
        host = torch.device("cpu") if _comm.backend_name(control) == "gloo" else self.device
        self.control = _Channel(control, host, self.rank, "the layers' group")
        self.channels = [self.control]
        if loop is not None:
            self.channels.append(_Channel(loop, host, self.rank, "DDP's group"))
        if self.ddp is not None:
            hooks = getattr(self.join, "_join_hooks", None)
            if not isinstance(hooks, list) or len(hooks) != 2:
                raise RuntimeError(
                    "syncbn.join does not know this torch's Join (it runs DDP's join steps "
                    "beside its own); use DistributedDataParallel.join() with "
                    "throw_on_early_termination=True instead")
            self.ddp_shadow = _DDPShadow(self.ddp, hooks[1])
        self.recorder = recorder = _Recorder(self)
        self._install_hooks(recorder)
        _comm.set_join_observer(self.group_name, recorder)
        return self

    def _make_groups(self, group: Any, several: bool) -> tuple[Any, Any, Any]:
        """Agree with every rank of the job on the groups, then create them in one order.

        Returns this rank's (shadow, control, loop) groups; loop is None when DDP's
        ranks are the layers' ranks (the control group counts both).
        """
        rank, world = _comm.rank_and_world()
        words = (world + _ROW_WORDS_BITS - 1) // _ROW_WORDS_BITS
        status = 2 if several else (1 if group is None else 0)
        layer_ranks = [] if group is None else _comm.group_ranks(group)
        ddp_ranks = layer_ranks if self.ddp is None or group is None \
            else _comm.group_ranks(self.ddp.process_group)
        rows = _comm.exchange_rows([status, *_bits(layer_ranks, words),
                                    *_bits(ddp_ranks, words)], _comm.env_timeout())
        members = {r: (row[0], _unbits(row[1:1 + words]), _unbits(row[1 + words:]))
                   for r, row in enumerate(rows)}
        if several:  # this rank raises its own error
            return None, None, None
        broken = sorted(r for r, (s, _, _) in members.items() if s == 2)
        if broken:
            raise ValueError(
                f"syncbn.join: the SyncBatchNorm layers of rank(s) {broken} are on several "
                "process groups, so no rank can join; give the layers of each model one group")
        for r, (state, layer_set, loop_set) in members.items():
            if state != 0:
                continue
            disagree = [m for m in layer_set if members[m][:2] != (0, layer_set)] + [
                m for m in loop_set if members[m][0] != 0 or members[m][2] != loop_set]
            if disagree:
                other = members[disagree[0]]
                raise ValueError(
                    f"syncbn.join: ranks disagree on the process groups of the model: rank "
                    f"{r} has its SyncBatchNorm layers on ranks {list(layer_set)} and its DDP "
                    f"(or join) group on {list(loop_set)}, rank {disagree[0]} "
                    + ("has no SyncBatchNorm layers" if other[0] == 1 else
                       f"has {list(other[1])} and {list(other[2])}")
                    + "; every rank must join the same model on the same groups")
        layer_sets = sorted({layer for s, layer, _ in members.values() if s == 0})
        loop_sets = sorted({loop for s, layer, loop in members.values()
                            if s == 0 and loop != layer})
        mine = members[rank]
        backend = None if group is None else _comm.backend_name(group)
        host = _comm.host_backend(backend)  # control messages: host tensors, no device sync
        timeout = None if group is None else _comm.group_timeout(group)
        loop_timeout = None if self.ddp is None else _comm.group_timeout(self.ddp.process_group)
        shadow: Any = None
        control: Any = None
        loop: Any = None
        for ranks in layer_sets:
            here = ranks == mine[1]
            made = [_comm.new_group_of(list(ranks), kind if here else None,
                                       timeout if here else None) for kind in (backend, host)]
            if here:
                shadow, control = made
        for ranks in loop_sets:
            here = ranks == mine[2] and mine[2] != mine[1]
            made_loop = _comm.new_group_of(list(ranks), host if here else None,
                                           loop_timeout if here else None)
            if here:
                loop = made_loop
        return shadow, control, loop

    def _install_hooks(self, recorder: _Recorder) -> None:
        def layer_pre_hook(module: nn.Module, args: Any) -> None:
            if not recorder.frozen:
                recorder.pending = module

        names = [str(getattr(m, "layer_name", "")) for m in self.layers]
        for name, layer in zip(names, self.layers, strict=True):
            if names.count(name) == 1:
                recorder.by_name[name] = layer
            else:  # eager only: a compiled graph runs its hooks' side effects late
                self.handles.append(layer.register_forward_pre_hook(layer_pre_hook))

        def model_pre_hook(module: nn.Module, args: Any) -> None:
            recorder.new_iteration()

        self.handles.append(self.model.register_forward_pre_hook(model_pre_hook))

    # --- control messages ----------------------------------------------------------------

    def post_slots(self, tag: float) -> list[tuple[Any, Tensor]]:
        return [channel.post(tag) for channel in self.channels]

    def read(self, channel: _Channel, posted: tuple[Any, Tensor], timeout_s: float | None
             ) -> Tensor:
        return channel.read(posted, timeout_s)

    # --- a rank that has run out of batches ------------------------------------------------

    def _rounds(self) -> None:
        """Shadow the others' iterations until every rank has joined; then the post hooks."""
        recorder = self.recorder
        assert recorder is not None
        is_last_joiner = True
        slots = self.post_slots(0.0)
        while True:
            counts = [round(float(self.read(c, s, None)[0]))
                      for c, s in zip(self.channels, slots, strict=True)]
            if counts[-1] == 0:  # everyone (of DDP's group, or of the layers') has joined
                break
            is_last_joiner = False
            self.layer_active = counts[0]
            slots = self._shadow_round(counts[0] > 0)
        self.replayer.copy_back()
        if self.ddp_shadow is not None:
            self.ddp_shadow.hook.post_hook(is_last_joiner)

    def _shadow_round(self, layers_active: bool) -> list[tuple[Any, Tensor]]:
        """One iteration of the others; returns the next iteration's slots (already posted)."""
        futures: list[Any] = []
        if self.ddp_shadow is not None:
            self.ddp_shadow.before_forward()
            futures = self.ddp_shadow.start_backward()
            self.ddp_futures = futures
        if layers_active:
            self._replay()
        slots = self.post_slots(0.0)
        if self.ddp_shadow is not None:
            while not all(f.done() for f in futures):  # DDP's buckets, unless poison comes
                for channel, posted in zip(self.channels, slots, strict=True):
                    if channel.completed(posted):
                        channel.check(posted[1].cpu())
                time.sleep(0.001)
            self.ddp_shadow.finish_backward(futures)
            self.ddp_futures = []
        return slots

    def _replay(self) -> None:
        recorder = self.recorder
        assert recorder is not None
        replayer = self.replayer
        recorder.entered_at = -1
        record = replayer.record
        if record is None and recorder.iterations > 0:
            record = replayer.record = recorder.current
        events: Callable[[], _Event | None] = self._described  # joined before any iteration
        if record is not None:
            events = functools.partial(next, iter(record), None)
        try:
            done = replayer.replay(events)
        except (RuntimeError, ValueError) as error:  # SyncBatchNormError too
            event = replayer.event
            if event is not None and recorder.entered_at != replayer.position:
                # it failed before its collective, where the active ranks wait: fail theirs
                _comm.send_mismatch(self.shadow, event.numel, event.device)
            raise _wrap(error, self.rank, record or []) from error
        if replayer.record is None:
            replayer.record = done  # what the active ranks described, replayed from now on

    def _described(self) -> _Event | None:
        """The next collective the active ranks describe (None: their iteration ended)."""
        summed = self.read(self.control, self.control.post(0.0), None)
        return _decode(summed, self.layer_active, self)

    # --- exit ----------------------------------------------------------------------------

    def _fail(self) -> None:
        """Leaving with an error: release every rank that waits for this one, at once."""
        if self.failed:
            return
        self.failed = True
        recorder = self.recorder
        if recorder is not None and not recorder.frozen:
            recorder.describing = False
            recorder.send_mismatch(len(recorder.current))
        for channel in self.channels:
            with contextlib.suppress(RuntimeError):  # an aborted group refuses at once
                channel.post(_POISON)
            channel.abandon()
        for group in self.made:  # work may be pending there for good
            _comm.keep_group(group)
        if self.ddp_futures and self.ddp is not None:
            _comm.keep_group(self.ddp.process_group)
            _comm.keep_work(*self.ddp_futures)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.join is None:
            return
        if self.recorder is None:  # torch's Join (throw_on_early_termination, or DDP alone)
            try:
                self.join.__exit__(exc_type, exc, tb)
            finally:
                for handle in self.handles:
                    handle.remove()
                self.handles.clear()
            return
        recorder = self.recorder
        try:
            if exc_type is None:
                recorder.check_complete()
                recorder.end_description()
                recorder.frozen = True
                try:
                    self._rounds()
                except _comm.SyncBatchNormError:
                    raise
                except RuntimeError as error:  # a peer died, DDP's shadow failed, …
                    raise _comm.SyncBatchNormError(
                        f"syncbn.join: rank {self.rank} has run out of batches, and shadowing "
                        f"the ranks still training failed ({str(error).strip()[:400]}); a "
                        "rank may have died or left syncbn.join with an error (see its log)"
                    ) from error
        except BaseException:
            self._fail()
            raise
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            _comm.set_join_observer(self.group_name, None)
        if exc_type is not None:
            self._fail()
            return
        for group in self.made:
            _comm.destroy_group(group)


def _wrap(error: Exception, rank: int, record: list[_Event]) -> Exception:
    if str(error).startswith("syncbn.join"):
        return error
    if not record:
        return _comm.SyncBatchNormError(
            f"syncbn.join: rank {rank} ran out of batches before its first iteration and "
            f"replays what the active ranks describe, which failed ({str(error).strip()[:400]})"
            f". {_ADVICE}")
    return _comm.SyncBatchNormError(
        f"syncbn.join: rank {rank} has run out of batches and replays the SyncBatchNorm "
        f"collectives of its last iteration ({len(record)}: {_sequence(record)}), but the "
        f"ranks still training ran a different sequence ({str(error).strip()[:400]}). "
        f"{_ADVICE}")


def join(model: nn.Module, enable: bool = True, throw_on_early_termination: bool = False
         ) -> _JoinContext:
    """Train with a different number of batches on each rank (like ``DDP.join()``).

    Inside ``with syncbn.join(model):`` a rank that has run out of batches (also
    one with none at all) keeps taking part in every SyncBatchNorm collective of
    the ranks still training with an empty batch, so they normalize with the
    exact statistics of the active ranks' batches and nobody hangs; when
    ``model`` is a ``DistributedDataParallel`` its own ``join()`` runs too
    (gradients divided by the initial world size, the final model broadcast
    from the last rank to join). Every iteration (one forward of ``model`` and
    its backward) must run the same SyncBatchNorm layers in the same order; one
    that differs while a rank has joined raises :class:`SyncBatchNormError` on
    every rank, as does an error on any rank while others shadow it. Every rank
    of the job must enter the context together (it creates process groups).
    ``enable=False`` makes it a no-op; ``throw_on_early_termination=True`` makes
    every rank raise as soon as one runs out of batches.
    """
    return _JoinContext(model, enable, throw_on_early_termination)
