"""``SyncBatchNorm``, the Torch-flavour layer: a drop-in for ``torch.nn.SyncBatchNorm``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _checks, _comm, _policy, _stats, _step
from ._activation import Activation
from ._autograd import check_inplace, count_step_, is_recomputing, normalize_
from ._pickling import GROUP_LOST_ATTRIBUTE, GroupPicklingMixin, check_group_travelled
from .functional import (
    batch_norm_train,
    call_site,
    local_fallback_applies,
    synchronized_batch_norm,
)

__all__ = ["SyncBatchNorm"]


@dataclass(frozen=True)
class _FastPath:
    """What a layer decided for one input signature: reused while nothing it depends on
    changes (``SyncBatchNorm._fast_key``)."""

    key: tuple[object, ...]
    plan: _step.StepPlan
    decay: float
    cumulative: bool
    on_host: bool  # the O(C) work on the host (_step.host_math: CPU, NumPy-viewable dtypes)


class SyncBatchNorm(GroupPicklingMixin, _BatchNorm):
    r"""Batch normalization over the global batch of a process group, on any device and backend.

    Same constructor, parameters, buffers and ``state_dict`` keys as
    ``torch.nn.SyncBatchNorm``, and the same semantics: in training,
    ``y = (x − μ)/√(σ² + eps)·weight + bias`` with μ and the biased σ² of every
    value of the channel on every rank of ``process_group`` (default: the world);
    ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased global
    variance, ``momentum=None`` giving the cumulative average. In eval the running
    statistics normalize without any communication. Unlike torch's layer it trains
    on CPU (gloo) as well as on accelerators, with uneven and empty per-rank
    batches, using one collective of ``2C + 2`` values forward and one of ``2C + 2``
    backward (an all-reduce; on gloo groups of up to 4 ranks an all_gather, which
    takes half the message rounds there: ``syncbn._comm.gathers``).

    Without an initialized process group, or with a group of one rank, it is
    exactly ``torch.nn.BatchNorm{1,2,3}d`` (see ``functional.local_fallback_applies``).

    Keyword-only extensions:

    - ``activation`` ('identity', 'relu', 'leaky_relu' with ``activation_param``
      the slope, default 0.01, 'elu' with ``activation_param`` α, default 1),
      applied to the output;
    - ``inplace=True`` (identity or leaky_relu, the activations invertible in
      floating point): overwrite the input with the output and save only the
      output for backward, recomputing the normalized values from it (In-Place
      ABN, arXiv:1712.02616): about half the activation memory of BatchNorm
      followed by a separate activation, same results;
    - ``timeout``: seconds (0.001 to 1e7: collective timeouts count whole
      milliseconds) one collective may take before a
      :class:`syncbn.SyncBatchNormError` naming this layer (default the
      ``SYNCBN_TIMEOUT`` variable, else the group's own timeout);
    - ``debug``: compare a fingerprint of layer, channels, dtype, phase, eps and
      momentum across ranks before every collective (default the ``SYNCBN_DEBUG``
      variable);
    - ``name``: how errors and the out-of-step checks tell this layer from
      others; ``convert_sync_batchnorm`` names every layer by its path in the model.
      Unnamed layers of equal size cannot be told apart by those checks.

    ``SYNCBN_TIMEOUT`` and ``SYNCBN_DEBUG`` are read at every eager training
    forward, but under ``torch.compile`` when the layer is traced: changed after the
    first compiled step, they are ignored until ``torch._dynamo.reset()`` (or a new
    ``torch.compile``) and a new trace.

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``,
        contiguous or channels_last(_3d); output of the same shape and memory format.
    """

    process_group: _comm.ProcessGroup | None
    _syncbn_input_ndim: int | None
    """Rank of the last input seen, so ``revert_sync_batchnorm`` can pick BatchNorm1d/2d/3d."""
    _syncbn_source_cls: type[_BatchNorm] | None
    """The class ``convert_sync_batchnorm`` replaced, restored by ``revert_sync_batchnorm``."""
    _syncbn_name: str | None
    """The layer's path in the model, set by ``convert_sync_batchnorm``, for error messages."""
    _syncbn_calls: int
    """Training forwards run so far on this rank, in eager mode (messages name it)."""
    _syncbn_steps: int | None
    """Host mirror of ``num_batches_tracked`` on accelerators (see ``_steps``)."""

    activation: Activation
    inplace: bool
    timeout: float | None
    debug: bool | None
    _syncbn_group_lost: bool
    """Set when unpickling dropped a custom process group (training then refuses to run)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: _comm.ProcessGroup | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str = "identity",
        activation_param: float | None = None,
        inplace: bool = False,
        timeout: float | None = None,
        debug: bool | None = None,
        name: str | None = None,
    ) -> None:
        _checks.check_num_features(num_features)
        _checks.check_eps(eps)
        _checks.check_momentum(momentum, allow_none=True)
        _comm.check_group_arg(process_group)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        _checks.check_timeout(timeout)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"SyncBatchNorm expected name to be a str or None, got {name!r}")
        self.activation = Activation.make(activation, activation_param)
        if inplace and not self.activation.invertible:
            raise ValueError(
                f"inplace=True needs an invertible activation, got {activation!r} "
                f"(param {self.activation.param:g}): the backward pass recomputes the "
                "normalized values from the output; use 'identity', 'leaky_relu' "
                "(slope > 0), or inplace=False ('elu' saturates at -alpha in floating point, "
                "where the input cannot be recovered)"
            )
        self.inplace = bool(inplace)
        self.process_group = process_group
        self.timeout = None if timeout is None else float(timeout)
        self.debug = debug
        self._syncbn_input_ndim = None
        self._syncbn_source_cls = None
        self._syncbn_name = name
        self._syncbn_group_lost = False
        self._syncbn_calls = 0
        self._syncbn_steps = None
        self._syncbn_fast: _FastPath | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_ndim(input)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; in training with global batch statistics (see the class doc).

        ``mask`` (bool, the input's shape without dim 1, True = counts) restricts the
        training statistics to the valid positions of every rank (padded batches);
        out of training it changes nothing.
        """
        fast = self.__dict__.get("_syncbn_fast")
        if fast is not None and mask is None and fast.key == self._fast_key(input):
            return self._forward_fast(input, fast)
        _checks.check_tensor(input)
        self._check_input_dim(input)
        _checks.check_channels(input, self.num_features)
        _checks.check_floating(input, next((t.dtype for t in (self.weight, self.running_mean)
                                             if t is not None), torch.float32))
        if not torch.compiler.is_compiling():  # for revert; compiled code writes no attribute
            self._syncbn_input_ndim = input.dim()
        _checks.check_param_dtypes(input, self.weight, self.running_mean)
        _checks.check_mask(input, mask)
        momentum = _checks.check_momentum(self.momentum, allow_none=True)
        if not self.training:
            return self._forward_eval(input, 0.0 if momentum is None else momentum, mask)
        # refuse before anything is counted
        if not torch.compiler.is_compiling():
            self._check_group()
        _checks.check_train_eps(self.eps)
        weight: Tensor | None = self.weight
        if self.inplace:
            weight = check_inplace(input, weight, self.bias, self.activation, self.layer_name)
        # reads SYNCBN_TIMEOUT / SYNCBN_DEBUG: a bad value is refused before anything counts
        site = call_site(input, self.layer_name, self.timeout, self.debug, eps=self.eps,
                         decay=1.0 - (0.0 if momentum is None else momentum))
        tracked = self.track_running_stats
        key = None
        if mask is None and not self.inplace and not torch.compiler.is_compiling():
            key = self._fast_key(input)  # before counting: the key holds the step's settings
        if tracked and self.num_batches_tracked is not None:
            count_step_(self.num_batches_tracked)
        call = -1
        if not torch.compiler.is_compiling():  # a Python counter would recompile every call
            call = self._syncbn_calls
            if not is_recomputing():
                self._syncbn_calls += 1
        if key is not None:
            self._syncbn_fast = self._plan_fast(input, key, site, momentum)
        out = batch_norm_train(
            input, self.running_mean if tracked else None, self.running_var if tracked else None,
            weight, self.bias, momentum, self.eps, self.process_group, site,
            inplace_activation=self.activation if self.inplace else None, mask=mask,
            call=call,
            num_batches_tracked=self.num_batches_tracked if tracked else None,
            steps=self._steps() if tracked else None,
        )
        return out if self.inplace else self.activation.apply(out)

    def _fast_key(self, input: Tensor) -> tuple[object, ...] | None:
        """Everything a training step's checks and decisions depend on, or ``None`` where the
        steady-state path cannot run (compiled or traced code, a tensor subclass, eval)."""
        if (not self.training or type(input) is not Tensor or torch.compiler.is_compiling()
                or torch._C._len_torch_dispatch_stack() > 0):
            return None
        weight = self._parameters.get("weight")
        running_mean = self._buffers.get("running_mean")
        group = self.process_group
        return (input.shape, input.dtype, input.device, input.stride(), self.momentum,
                self.eps, group, _comm.default_group(), _comm.registered(group), self.timeout,
                self.debug, self._syncbn_name, self.track_running_stats, self.inplace,
                self.activation, None if weight is None else weight.dtype,
                None if running_mean is None else running_mean.dtype,
                self.__dict__.get(GROUP_LOST_ATTRIBUTE, False), _comm.env_settings(),
                _policy.host_reads(input.device))

    def _plan_fast(self, input: Tensor, key: tuple[object, ...], site: _comm.CallSite,
                   momentum: float | None) -> _FastPath | None:
        """The steady-state path of this signature, where the lean core runs (see ``_step``)."""
        group = _comm.resolve_group(self.process_group)
        if group is None or local_fallback_applies(group):
            return None
        group_name = str(group.group_name)
        if not _step.lean_applies(input, None, False, group_name):
            return None
        plan = _step.plan_for(input, site, self.eps, group_name)
        tracked = self.track_running_stats
        on_host = _step.host_math(input.device, self.weight,
                                  self.running_mean if tracked else None,
                                  self.running_var if tracked else None)
        return _FastPath(key, plan, 1.0 - (0.0 if momentum is None else momentum),
                         momentum is None, on_host)

    def _forward_fast(self, input: Tensor, fast: _FastPath) -> Tensor:
        """A training step of a signature seen before: its checks passed then and nothing they
        depend on changed (:meth:`_fast_key`), so only the step itself runs."""
        buffers, params, attributes = self._buffers, self._parameters, self.__dict__
        counter = buffers.get("num_batches_tracked")
        tracked = self.track_running_stats and counter is not None
        recomputing = is_recomputing()
        call = attributes["_syncbn_calls"]
        if not recomputing:  # module attributes set through __dict__: Module.__setattr__
            attributes["_syncbn_calls"] = call + 1  # costs more than the step's kernels
        steps = None
        plan = fast.plan
        if tracked:
            assert counter is not None
            if not recomputing:
                counter.add_(1)
            # host math reads the count with the layer's other small tensors (_step.host_copy)
            steps = None if fast.on_host else self._steps()
        out = _step.lean_batch_norm(
            input, buffers.get("running_mean") if tracked else None,
            buffers.get("running_var") if tracked else None, params.get("weight"),
            params.get("bias"), eps=self.eps, decay=fast.decay, unbiased_var=True,
            group_name=plan.group_name, site=plan.site, call=call,
            num_batches_tracked=counter if tracked else None, cumulative=fast.cumulative,
            steps=steps, update_running=tracked and not recomputing, plan=plan,
            on_host=fast.on_host,
        )
        return self.activation.apply(out)

    def _steps(self) -> int | None:
        """``num_batches_tracked`` (this step counted) as a host int, for the shift.

        CPU: read (no kernel, no sync). Accelerators: a host mirror, read once after
        construction, ``load_state_dict`` or ``reset_running_stats`` and then counted
        along, so no step reads the device (see ``syncbn._policy``). ``None`` under
        compile (the compiled shift reads the count on the device).
        """
        counter = self._buffers.get("num_batches_tracked")
        if counter is None or counter.is_meta or torch.compiler.is_compiling():
            return None
        if _policy.host_reads(counter.device):
            steps = _policy.host_int(counter)
        else:
            mirror: int | None = self.__dict__.get("_syncbn_steps")
            if mirror is None:
                mirror = _policy.host_int(counter) - 1  # one host read; this step counted below
            steps = mirror if is_recomputing() else mirror + 1
        self.__dict__["_syncbn_steps"] = steps
        return steps

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._syncbn_steps = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        fast = self.__dict__.get("_syncbn_fast")
        if fast is not None:  # decisions tied to this layer's objects: a copy decides anew
            memo[id(fast)] = None
        copied: SyncBatchNorm = super().__deepcopy__(memo)
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("_syncbn_fast", None)
        super().__setstate__(state)  # type: ignore[no-untyped-call]

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state = dict(state)
        state.pop("_syncbn_fast", None)
        return state

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._syncbn_steps = None

    def _check_group(self) -> None:
        """The layer's group must be usable; errors name the layer."""
        check_group_travelled(self, self.layer_name,
                              "syncbn.convert_sync_batchnorm(model, process_group)")
        _comm.resolve_group(self.process_group, who=_comm.layer_label(self.layer_name))

    def _forward_eval(self, input: Tensor, factor: float, mask: Tensor | None = None) -> Tensor:
        """Eval never communicates (as torch): running statistics, or this rank's own
        batch statistics when none are tracked (over the mask's valid positions, if any)."""
        no_buffers = self.running_mean is None and self.running_var is None
        if no_buffers and mask is not None:
            out = synchronized_batch_norm(
                input, None, None, self.weight, self.bias, eps=self.eps, decay=1.0 - factor,
                unbiased_var=True, process_group=None, single_value="raise", mask=mask)
            return self.activation.apply(out)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, self.weight, self.bias))
        in_place = self.inplace and not no_buffers and not needs_grad
        if in_place:  # nothing to differentiate: overwrite the input
            assert self.running_mean is not None and self.running_var is not None
            inv_std = (self.running_var.to(_stats.acc_dtype(input.dtype)) + self.eps).rsqrt()
            normalize_(input, self.running_mean.to(inv_std.dtype), inv_std, self.weight,
                       self.bias)
            return self.activation.apply_(input)
        out = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                           no_buffers, factor, self.eps)
        return self.activation.apply(out)

    @property
    def layer_name(self) -> str:
        """How errors name this layer: its path in the model (set by convert), else a repr."""
        return self._syncbn_name or f"SyncBatchNorm({self.num_features})"

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else ", process_group=<custom>"
        # _NormBase.extra_repr is untyped in torch
        text: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return text + group

    convert_sync_batchnorm: ClassVar[Callable[..., torch.nn.Module]]
    """``SyncBatchNorm.convert_sync_batchnorm(module, process_group=None)``, as torch's: the
    same as :func:`syncbn.convert_sync_batchnorm`, which :mod:`syncbn.convert` attaches here
    (this module does not import it, so the two do not import each other)."""
