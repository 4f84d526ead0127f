"""``syncbn.join``: uneven numbers of batches per rank, on torch's generic join machinery.

A rank that has run out of batches keeps taking part in every SyncBatchNorm
collective of the ranks still training, with an empty batch: count 0, sums 0,
the same step keys. The active ranks therefore get the statistics of the
active ranks' batches exactly, and nobody waits forever.

How:

- At entry every rank creates a *join group* of the same ranks
  (``dist.new_group``); while the context is active every SyncBatchNorm
  collective of the layers' group runs on it (an observer in
  ``_comm._all_reduce_op``), so it never interleaves with DDP's gradient
  all-reduces on the original group.
- Every rank records the SyncBatchNorm collectives of each iteration (one
  iteration: from one forward of ``model`` to the next) in order: phase, layer,
  C, the input's shape and dtype, the module (found by its unique name, else by
  a forward pre-hook).
- Join's main hook runs on a joined rank once per iteration of the others. It
  replays the last recorded iteration on copies of the layers, in the recorded
  order: each forward on an empty input ``(0, …)`` (the copies' running
  statistics follow the active ranks' bit for bit, and with them the shift
  every forward key folds in), each backward on a zero gradient. With DDP,
  DDP's own join hook runs in a thread meanwhile: the active ranks'
  SyncBatchNorm collectives and DDP's wait for each other (the forward behind
  DDP's buffer broadcast, DDP's bucket all-reduces behind the backward), so
  neither hook may finish before the other starts.
- Once a rank has joined (the notify all-reduce counts the active ranks), the
  active ranks check each collective against their own last iteration: one
  that differs (a data-dependent branch, a layer skipped in the last step)
  cannot be shadowed. The active rank then sends a buffer with step key 0 into
  the joined ranks' pending replay (their out-of-step check fails at once) and
  raises :class:`SyncBatchNormError` naming join as the cause; the joined
  ranks raise one too. The groups cannot be used after that (DDP's shadow
  thread still waits), so the job should end.
- syncbn's joinable is the first (its forward pre-hook on ``model`` notifies
  the context), then DDP's: gradients are divided by the initial world size,
  as DDP's ``join()`` does by default. The post hook copies the replayed
  running statistics into the joined rank's layers, then DDP broadcasts the
  final model from the last joiner.
"""

from __future__ import annotations

import copy
import threading
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
    call: int
    module: nn.Module | None

    def same_as(self, other: _Event) -> bool:
        return (self.phase, self.layer, self.channels, self.numel) == (
            other.phase, other.layer, other.channels, other.numel)

    def describe(self) -> str:
        return f"{_comm.layer_label(self.layer)} {self.phase} (C={self.channels})"


def _sequence(events: list[_Event]) -> str:
    shown = ", ".join(e.describe() for e in events[:8])
    return shown + (", …" if len(events) > 8 else "")


class _Recorder:
    """The observer of one group: records iterations, checks them, routes to the join group."""

    def __init__(self, join_name: str, shadow: Any, rank: int) -> None:
        self.join_name = join_name
        self.shadow = shadow
        self.rank = rank
        self.by_name: dict[str, nn.Module] = {}  # layers whose name no other layer has
        self.pending: nn.Module | None = None  # else: the layer whose forward runs (a hook)
        self.current: list[_Event] = []
        self.reference: list[_Event] | None = None  # the previous iteration
        self.frozen = False  # this rank has joined: nothing more to record
        self.count_work: Any = None
        self.count_size = 0
        self._joined_others: bool | None = None

    def new_iteration(self, count_work: Any, size: int) -> None:
        """Called at each forward of the model (before its collectives)."""
        self.check_complete()
        self.reference = self.current
        self.current = []
        self.count_work, self.count_size, self._joined_others = count_work, size, None

    def others_joined(self) -> bool:
        """Whether some rank was not active in this iteration (waits for the notify count)."""
        if self._joined_others is None:
            if self.count_work is None:
                self._joined_others = False
            else:
                active = float(self.count_work.get_future().wait()[0].item())
                self._joined_others = active < self.count_size
        return self._joined_others

    def check_complete(self) -> None:
        """The iteration that ends ran every collective the joined ranks replay."""
        ref = self.reference
        if ref is None or self.frozen or len(self.current) >= len(ref):
            return
        if not self.others_joined():
            return
        missing = ref[len(self.current)]
        self._mismatch(missing)
        raise _comm.SyncBatchNormError(
            f"syncbn.join: this iteration ran {len(self.current)} SyncBatchNorm collectives, "
            f"the last one {len(ref)} ({_sequence(ref)}); a rank that has run out of batches "
            f"is waiting in {missing.describe()}, which will not come. {_ADVICE}"
        )

    def _mismatch(self, expected: _Event) -> None:
        timeout = 10.0
        _comm.send_mismatch(self.shadow, expected.numel, expected.device, timeout)

    def before(self, buffer: Tensor, layer: str, phase: str, channels: int, dtype: str,
               shape: list[int], call: int) -> str:
        if self.frozen or phase == "shift":
            # a shift exchange is part of its layer's forward, decided by the layer's state:
            # a replayed forward makes the same decision, so it is routed, not recorded
            return self.join_name
        module = None
        if phase == "forward":  # a layer of a unique name, else the one whose forward runs
            module = self.by_name.get(layer, self.pending)
            self.pending = None
        event = _Event(phase, layer, channels, buffer.numel(), getattr(torch, dtype),
                       buffer.device, tuple(shape), call, module)
        ref, j = self.reference, len(self.current)
        if ref is not None and (j >= len(ref) or not ref[j].same_as(event)) \
                and self.others_joined():
            if j < len(ref):
                self._mismatch(ref[j])
            there = (f"the last iteration ran {ref[j].describe()} there" if j < len(ref)
                     else f"the last iteration ran only {len(ref)}")
            raise _comm.SyncBatchNormError(
                f"syncbn.join: {event.describe()} is SyncBatchNorm collective {j + 1} of this "
                f"iteration, but {there} ({_sequence(ref)}), and a rank that has run out of "
                f"batches replays the last iteration, so it cannot take part. {_ADVICE}"
            )
        self.current.append(event)
        return self.join_name


class _Replayer:
    """A joined rank's copies of the recorded layers and the replay of one iteration."""

    def __init__(self, record: list[_Event]) -> None:
        self.record = record
        self.copies: dict[int, nn.Module] = {}
        self.originals: dict[int, nn.Module] = {}
        for event in record:
            if event.phase == "forward" and event.module is not None:
                key = id(event.module)
                if key not in self.copies:
                    self.originals[key] = event.module
                    self.copies[key] = copy.deepcopy(event.module)

    def replay(self) -> None:
        """One iteration: forwards on empty inputs, backwards on zero gradients, in order."""
        open_outputs: list[tuple[str, int, Tensor]] = []
        with torch.enable_grad():
            for event in self.record:
                if event.phase == "forward":
                    if event.module is None:
                        raise _comm.SyncBatchNormError(
                            f"syncbn.join: cannot replay {event.describe()}: its module was "
                            f"not found in the model given to syncbn.join. {_ADVICE}")
                    leaf = torch.zeros((0, *event.shape[1:]), dtype=event.dtype,
                                       device=event.device, requires_grad=True)
                    out = self.copies[id(event.module)](leaf.clone())
                    open_outputs.append((event.layer, event.call, out))
                    continue
                index = next((i for i in range(len(open_outputs) - 1, -1, -1)
                              if open_outputs[i][:2] == (event.layer, event.call)), None)
                if index is None:
                    raise _comm.SyncBatchNormError(
                        f"syncbn.join: cannot replay {event.describe()}: its forward was not "
                        f"in the same iteration. {_ADVICE}")
                out = open_outputs.pop(index)[2]
                torch.autograd.backward(out, torch.zeros_like(out))

    def run(self, rank: int) -> None:
        """Replay one iteration; errors say that join is the cause."""
        try:
            self.replay()
        except RuntimeError as error:
            raise _wrap(error, rank, self.record) from error

    def copy_back(self) -> None:
        """Give the joined rank's layers the running statistics the replays tracked."""
        with torch.no_grad():
            for key, original in self.originals.items():
                for name, buffer in self.copies[key].named_buffers():
                    target = original.get_buffer(name)
                    target.copy_(buffer)


def _wrap(error: RuntimeError, rank: int, record: list[_Event]) -> RuntimeError:
    if str(error).startswith("syncbn.join"):
        return error
    return _comm.SyncBatchNormError(
        f"syncbn.join: rank {rank} has run out of batches and replays the SyncBatchNorm "
        f"collectives of its last iteration ({len(record)}: {_sequence(record)}), but the "
        f"ranks still training ran a different sequence ({str(error).strip()[:400]}). "
        f"{_ADVICE}")


class _SyncBNJoinable(Joinable):
    def __init__(self, context: _JoinContext) -> None:
        super().__init__()
        self._context = context

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _SyncBNJoinHook(self._context)

    @property
    def join_device(self) -> torch.device:
        return self._context.device

    @property
    def join_process_group(self) -> Any:
        return self._context.join_group


class _SyncBNJoinHook(JoinHook):
    """Shadows one iteration of the others; with DDP, DDP's own hook runs beside it.

    The active ranks' SyncBatchNorm collectives and DDP's wait for each other
    (the forward behind DDP's buffer broadcast, DDP's bucket all-reduces behind
    the backward), so on a joined rank DDP's main hook runs in a thread while
    the replay runs here: a replay that cannot match raises at once on this
    thread (DDP's thread is then left to its group's timeout).
    """

    def __init__(self, context: _JoinContext, ddp_hook: JoinHook | None = None) -> None:
        self._context = context
        self._ddp_hook = ddp_hook

    def main_hook(self) -> None:
        if self._ddp_hook is None:
            self._context.shadow_iteration()
            return
        errors: list[BaseException] = []

        def ddp_main() -> None:
            try:
                assert self._ddp_hook is not None
                self._ddp_hook.main_hook()
            except BaseException as error:  # re-raised on the main thread below
                errors.append(error)

        thread = threading.Thread(target=ddp_main, daemon=True, name="syncbn-join-ddp")
        thread.start()
        self._context.shadow_iteration()
        thread.join()
        if errors:
            raise errors[0]

    def post_hook(self, is_last_joiner: bool) -> None:
        self._context.finish()
        if self._ddp_hook is not None:
            self._ddp_hook.post_hook(is_last_joiner)


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
        self.join: Any = None
        self.recorder: _Recorder | None = None
        self.replayer: _Replayer | None = None
        self.handles: list[Any] = []
        self.group_name = ""
        self.shadow: Any = None
        self.join_group: Any = None
        self.device = torch.device("cpu")
        self.ddp = isinstance(model, DistributedDataParallel)

    def __enter__(self) -> _JoinContext:
        if not self.enable:
            return self
        inner = self.model.module if isinstance(self.model, DistributedDataParallel) \
            else self.model
        layers = [m for m in inner.modules() if hasattr(m, "_syncbn_calls")]
        groups = {id(g): g for g in (_comm.resolve_group(getattr(m, "process_group", None))
                                     for m in layers) if g is not None}
        if len(groups) > 1:
            raise ValueError(
                f"syncbn.join expected the SyncBatchNorm layers of the model to share one "
                f"process group, got {len(groups)}; join the model's parts separately or "
                "give them one group")
        if not groups:  # nothing synchronizes: only DDP's join, if any
            if isinstance(self.model, DistributedDataParallel):
                self.join = self.model.join(enable=True,
                                            throw_on_early_termination=self.throw)
                self.join.__enter__()
            return self
        group = next(iter(groups.values()))
        self.group_name = str(group.group_name)
        self.join_group = self.model.process_group if self.ddp else group
        self.device = next((t.device for t in (*inner.parameters(), *inner.buffers())),
                           torch.device("cpu"))
        self.shadow = _comm.new_group_like(group)
        rank = int(torch.distributed.get_rank())
        self.recorder = _Recorder(str(self.shadow.group_name), self.shadow, rank)
        recorder = self.recorder

        def layer_pre_hook(module: nn.Module, args: Any) -> None:
            if not recorder.frozen:
                recorder.pending = module

        names = [str(getattr(m, "layer_name", "")) for m in layers]
        for name, layer in zip(names, layers, strict=True):
            if names.count(name) == 1:
                recorder.by_name[name] = layer
            else:  # eager only: a compiled graph runs its hooks' side effects late
                self.handles.append(layer.register_forward_pre_hook(layer_pre_hook))
        self.joinable = _SyncBNJoinable(self)
        joinables: list[Joinable] = [self.joinable]
        if isinstance(self.model, DistributedDataParallel):
            joinables.append(self.model)
        self.join = Join(joinables, enable=True, throw_on_early_termination=self.throw,
                         divide_by_initial_world_size=True)
        hooks = getattr(self.join, "_join_hooks", None)
        if not isinstance(hooks, list) or len(hooks) != len(joinables):
            raise RuntimeError(
                "syncbn.join does not know this torch's Join (it runs DDP's join hook "
                "beside its own); use DistributedDataParallel.join() with "
                "throw_on_early_termination=True instead")
        # one hook: syncbn's replay on this thread, DDP's in a thread beside it
        self.join._join_hooks = [_SyncBNJoinHook(self, hooks[1] if len(hooks) > 1 else None)]
        size = int(torch.distributed.get_world_size(self.join_group))
        joinable = self.joinable

        def model_pre_hook(module: nn.Module, args: Any) -> None:
            work = Join.notify_join_context(joinable)
            recorder.new_iteration(work, size)

        self.handles.append(self.model.register_forward_pre_hook(model_pre_hook))
        _comm.set_join_observer(self.group_name, self.recorder)
        self.join.__enter__()
        return self

    def shadow_iteration(self) -> None:
        """Join's main hook on a joined rank: shadow one iteration of the others."""
        recorder = self.recorder
        assert recorder is not None
        if self.replayer is None:
            record = recorder.current
            if not record:
                raise _comm.SyncBatchNormError(
                    f"syncbn.join: rank {recorder.rank} has run out of batches before "
                    "running any SyncBatchNorm collective inside syncbn.join, so it "
                    f"cannot shadow the others. {_ADVICE}")
            self.replayer = _Replayer(record)
        self.replayer.run(recorder.rank)

    def finish(self) -> None:
        """Join's post hook: the replays' running statistics into this rank's layers."""
        if self.replayer is not None:
            self.replayer.copy_back()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.join is None:
            return
        failed = exc_type is not None
        try:
            if self.recorder is not None and exc_type is None:
                self.recorder.check_complete()
                self.recorder.frozen = True
            self.join.__exit__(exc_type, exc, tb)
        except BaseException:
            failed = True
            raise
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            if self.recorder is not None:
                _comm.set_join_observer(self.group_name, None)
            if self.shadow is not None and not failed:  # a failed one may still be busy
                _comm.destroy_group(self.shadow)


def join(model: nn.Module, enable: bool = True, throw_on_early_termination: bool = False
         ) -> _JoinContext:
    """Train with a different number of batches on each rank (like ``DDP.join()``).

    Inside ``with syncbn.join(model):`` a rank that has run out of batches keeps
    taking part in every SyncBatchNorm collective of the ranks still training
    with an empty batch, so they normalize with the exact statistics of the
    active ranks' batches and nobody hangs; when ``model`` is a
    ``DistributedDataParallel`` its own ``join()`` runs too (gradients divided
    by the initial world size, the final model broadcast from the last rank to
    join). Every iteration (one forward of ``model`` and its backward) must run
    the same SyncBatchNorm layers in the same order; one that differs while a
    rank has joined raises :class:`SyncBatchNormError` on the ranks. Every rank
    must enter the context (it creates a process group). ``enable=False``
    makes it a no-op; ``throw_on_early_termination=True`` makes every rank
    raise as soon as one runs out of batches.
    """
    return _JoinContext(model, enable, throw_on_early_termination)
