"""Functional synchronized batch normalization: validates, then picks the path.

The three paths, chosen by named predicates:

- **running statistics** (``training=False``): ``F.batch_norm`` with the running
  buffers. No communication at all, so one rank may evaluate alone.
- **local fallback** (:func:`local_fallback_applies`): no process group is
  initialized, or the group has one rank. The global batch *is* the local batch,
  so ``F.batch_norm`` gives the identical result; it is used as is.
- **synchronized**: :class:`~syncbn._autograd.SyncBatchNormFunction`, one
  sum over the ranks forward and one backward (``syncbn._comm``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _comm, _policy, _stats, _step
from ._activation import Activation
from ._autograd import (
    SingleValuePolicy,
    SyncBatchNormFunction,
    global_moments,
    is_recomputing,
    runs_op_body_directly,
    update_running_stats_,
)

__all__ = ["local_fallback_applies", "sync_batch_norm"]


def local_fallback_applies(process_group: _comm.ProcessGroup | None) -> bool:
    """True when synchronizing cannot change the result: no group, or a group of one rank.

    ``process_group`` is a *resolved* group (see ``resolve_group``): ``None``
    means ``torch.distributed`` is unavailable or not initialized.
    """
    return process_group is None or _comm.group_size(process_group) == 1


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: _comm.ProcessGroup | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch normalization whose training statistics are those of the whole process group.

    ``y = weight·(x − μ)/√(σ² + eps) + bias`` per channel (dim 1), where in
    training μ and the biased σ² are taken over every value of the channel on
    every rank of ``process_group`` (default: the world), and the running
    buffers, when given, take ``running ← (1 − momentum)·running + momentum·batch``
    with the unbiased global variance ``σ²·N/(N − 1)``. Out of training the
    running buffers normalize and nothing is communicated. The signature and
    semantics are those of ``torch.nn.functional.batch_norm`` plus the group
    and the mask.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``,
            any memory format; float16/bfloat16 compute statistics in float32.
            A rank may hold zero samples: it still joins the collectives.
        running_mean, running_var: ``(C,)`` buffers updated in place in training
            (``None``: not tracked); required when ``training=False``.
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        training: use (and synchronize) batch statistics.
        momentum: weight of the new batch statistic in the running update.
        eps: added to the variance.
        process_group: group to synchronize over; ``None`` means the world.
        mask: ``None``, or a bool tensor of the input's shape without dim 1
            (``(N, L)`` for ``(N, C, L)``), True where a position counts: in
            training μ and σ² are those of the True positions of every rank
            (every position is still normalized with them), and the running
            variance is unbiased over the global valid count; a global valid
            count of 0 or 1 leaves the running buffers unchanged. Out of
            training the mask changes nothing.

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Raises:
        TypeError: ``input`` is not a floating-point tensor, ``mask`` is not a bool
            tensor, or ``process_group`` is not a ProcessGroup.
        ValueError: input rank outside 2–5, zero channels, a buffer or parameter
            of the wrong size, a mask of the wrong shape or device, missing running
            buffers out of training, a bad ``momentum``/``eps``, an unusable group,
            or (torch's text) a training batch with one value per channel over the
            whole group, or eps ≤ 0 in training.
    """
    _checks.check_tensor(input)
    _checks.check_ndim(input)
    _checks.check_channels(input, None)
    _checks.check_floating(input)
    momentum_value = _checks.check_momentum(momentum, allow_none=False)
    _checks.check_eps(eps)
    channels = input.size(1)
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        _checks.check_per_channel(name, value, channels)
    _checks.check_param_dtypes(input, weight, running_mean)
    _checks.check_mask(input, mask)

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "sync_batch_norm with training=False normalizes with the running "
                "statistics, but running_mean or running_var is None; pass both "
                "buffers, or training=True to use batch statistics"
            )
        return F.batch_norm(input, running_mean, running_var, weight, bias, False,
                            momentum_value or 0.0, eps)

    return batch_norm_train(input, running_mean, running_var, weight, bias, momentum_value, eps,
                            process_group, site=None, mask=mask)


def batch_norm_train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    process_group: _comm.ProcessGroup | None,
    site: _comm.CallSite | None,
    inplace_activation: Activation | None = None,
    mask: Tensor | None = None,
    call: int = -1,
    num_batches_tracked: Tensor | None = None,
    steps: int | None = None,
) -> Tensor:
    """Training step in Torch's conventions: the local fallback or the synchronized core.

    ``momentum=None`` is the cumulative average, ``1/num_batches_tracked`` (the
    caller has counted this step). Inside a checkpoint's recompute the running
    buffers are left alone on both paths (torch's own BatchNorm updates them
    twice there, pytorch#96136). The in-place activated mode and masks always run
    the core (without a collective when the fallback applies), since
    ``F.batch_norm`` has neither.

    Raises:
        ValueError: ``eps ≤ 0`` (torch's text: the variance could be 0).
    """
    _checks.check_train_eps(eps)
    group = _comm.resolve_group(process_group)
    fallback = local_fallback_applies(group)
    if group is None and not torch.compiler.is_compiling():
        _comm.warn_if_launched_without_group()
    plain = fallback and inplace_activation is None and mask is None
    if plain and (momentum is not None or not torch.compiler.is_compiling()):
        if is_recomputing():
            # throwaway copies: F.batch_norm must save the same tensors as in the first
            # forward (a non-reentrant checkpoint checks that), without a second update
            running_mean = None if running_mean is None else running_mean.clone()
            running_var = None if running_var is None else running_var.clone()
        if momentum is None:  # eager only: the factor is a host number here
            tracked = 1.0 if num_batches_tracked is None else float(num_batches_tracked.item())
            momentum = 1.0 / max(tracked, 1.0)
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    if site is None:
        site = call_site(input, "sync_batch_norm", timeout_s=None, debug=None, eps=eps,
                         decay=1.0 - (0.0 if momentum is None else momentum))
    return synchronized_batch_norm(
        input, running_mean, running_var, weight, bias,
        eps=eps, decay=1.0 - (0.0 if momentum is None else float(momentum)), unbiased_var=True,
        process_group=None if fallback else group, single_value="raise", site=site,
        inplace_activation=inplace_activation, mask=mask, call=call,
        num_batches_tracked=num_batches_tracked, cumulative=momentum is None,
        steps=steps,
    )


def call_site(input: Tensor, layer: str, timeout_s: float | None, debug: bool | None,
              eps: float = 0.0, decay: float = 0.0) -> _comm.CallSite:
    """Describe a layer's collectives; ``None`` settings come from the environment.

    ``timeout_s=None`` reads ``SYNCBN_TIMEOUT`` (unset: the group's own timeout);
    ``debug=None`` reads ``SYNCBN_DEBUG``. ``eps`` and ``decay`` are compared
    across ranks in debug mode. Eager code caches the sites it made (by every input,
    the environment's text included), so a step builds none.
    """
    if torch.compiler.is_compiling():
        return _make_site(input, layer, timeout_s, debug, eps, decay)
    key = (layer, input.size(1), input.dtype, timeout_s, debug, float(eps), float(decay),
           os.environ.get(_comm.TIMEOUT_ENV), os.environ.get(_comm.DEBUG_ENV))
    site = _SITES.get(key)
    if site is None:
        site = _make_site(input, layer, timeout_s, debug, eps, decay)
        if len(_SITES) >= 4096:
            _SITES.clear()
        _SITES[key] = site
    return site


_SITES: dict[tuple[object, ...], _comm.CallSite] = {}


def _make_site(input: Tensor, layer: str, timeout_s: float | None, debug: bool | None,
               eps: float, decay: float) -> _comm.CallSite:
    return _comm.CallSite(
        layer=layer, channels=input.size(1), dtype=input.dtype,
        timeout_s=_comm.env_timeout() if timeout_s is None else timeout_s,
        debug=_comm.env_debug() if debug is None else debug, eps=float(eps), decay=float(decay),
    )


def effective_shift(running_mean: Tensor | None, num_batches_tracked: Tensor | None,
                    decay: float | None) -> Tensor | None:
    """Compiled code's shift ``s`` (float64), from the layer's state alone (no Python state
    may change under compile).

    The running mean, bias-corrected as Adam corrects its moments: after ``k``
    updates from 0 with keep-rate ``decay``, ``r_k = (1 − decay)·Σ decay^(k−j)·μ_j``,
    so ``r_k / (1 − decay^k)`` is a weighted average of past batch means. ``k`` is
    ``num_batches_tracked − 1`` (this step is already counted); without a counter,
    or for the cumulative average (``decay=None``, already unbiased), the running
    mean itself; non-finite values count as 0. At ``k = 0`` (a fresh layer's first
    compiled step) this is the initial running mean: that step's moments carry the
    cancellation error ε₆₄·((μ − s)/σ)² of a plain merge (eager code exchanges a
    shift instead, :func:`_step.exchange_shift`).
    """
    if running_mean is None:
        return None
    r = running_mean.detach().double()
    r = torch.where(torch.isfinite(r), r, 0.0)
    if num_batches_tracked is None or decay is None or decay >= 1.0:
        return r
    steps = (num_batches_tracked.detach() - 1).clamp_min(0).double()
    correction = 1.0 - torch.pow(torch.full_like(steps, decay), steps)
    return torch.where(correction > 1e-12, r / correction.clamp_min(1e-12), r)


def _shift(input: Tensor, mask: Tensor | None, running_mean: Tensor | None,
           num_batches_tracked: Tensor | None, decay: float, cumulative: bool,
           steps: int | None, group_name: str | None, site: _comm.CallSite | None,
           call: int, on_host: bool) -> Tensor:
    """The point every rank takes its moments about (accumulation dtype), by one rule.

    Eager code: the layer's state (:func:`_step.shift_from_state`), else one exchange
    (:func:`_step.exchange_shift`). Compiled code (no host value of the step count
    may steer it, and no collective may be added that depends on nothing): the
    bias-corrected running mean (:func:`effective_shift`), or 0 without one.
    """
    acc = _stats.acc_dtype(input.dtype)
    if torch.compiler.is_compiling():
        # no exchange in compiled code: its collective would depend on nothing before it
        # on an empty rank, and inductor may then move it ahead of earlier layers'
        # collectives; a layer without running statistics takes its moments about 0
        point = effective_shift(running_mean, num_batches_tracked,
                                None if cumulative else decay)
        if point is None:
            return torch.zeros(input.size(1), dtype=acc, device=input.device)
        return point.to(acc)
    out = torch.empty(input.size(1), dtype=acc, device=input.device)
    if _step.shift_from_state(running_mean, steps, decay, cumulative, out,
                              out.numpy() if on_host else None):
        return out
    return _step.exchange_shift(input, mask, group_name, site, call)


def synchronized_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float,
    decay: float,
    unbiased_var: bool,
    process_group: _comm.ProcessGroup | None,
    single_value: SingleValuePolicy,
    site: _comm.CallSite | None = None,
    inplace_activation: Activation | None = None,
    mask: Tensor | None = None,
    call: int = -1,
    num_batches_tracked: Tensor | None = None,
    cumulative: bool = False,
    steps: int | None = None,
) -> Tensor:
    """Training-mode normalization with batch statistics of ``process_group``.

    The shared entry of every flavour's shell into the core: conventions come
    in already translated (``decay``, biased or unbiased running variance, the
    one-value policy). ``process_group=None`` normalizes with local statistics
    through the same code (no collective); a group needs a ``site`` (see
    :func:`call_site`) for its error messages. ``inplace_activation`` selects the
    in-place activated mode: the input is overwritten with ``f(BN(x))`` and only
    that output is saved; the caller checks it first (``_autograd.check_inplace``).
    ``call`` counts the layer's earlier training forwards (named in messages; −1
    unknown, as under ``torch.compile``, where no Python counter may change);
    ``num_batches_tracked`` (counted for this step already) bias-corrects compiled
    code's shift (:func:`effective_shift`); with ``cumulative`` the running
    average is ``decay = 1 − 1/num_batches_tracked``. ``steps`` is
    ``num_batches_tracked`` (this step counted) as a host int, from which eager code
    takes its shift (:func:`_step.shift_from_state`; ``None``: no state to take it
    from, so each call exchanges one first: one more all-reduce). Arguments are not
    validated here. The steady state runs
    :func:`_step.lean_batch_norm`; masks, the in-place mode, a rank with at most
    one value per channel and compiled code run the general path below, whose
    running statistics are updated by one operator that skips itself inside a
    checkpoint's recompute.
    """
    if process_group is not None and input.is_meta and not torch.compiler.is_compiling():
        raise ValueError(
            f"{_comm.layer_label(site.layer if site is not None else 'SyncBatchNorm')}: meta "
            "tensors hold no data, so their batch statistics cannot be synchronized over a "
            "process group; materialize the model first (e.g. model.to_empty(device='cpu') "
            "and load its weights), or use eval mode"
        )
    if process_group is not None and site is None:
        site = call_site(input, "SyncBatchNorm", timeout_s=None, debug=None, eps=eps,
                         decay=decay)
    group_name = None if process_group is None else str(process_group.group_name)
    if _step.lean_applies(input, mask, inplace_activation is not None, group_name):
        assert site is not None and group_name is not None
        return _step.lean_batch_norm(
            input, running_mean, running_var, weight, bias, eps=eps, decay=decay,
            unbiased_var=unbiased_var, group_name=group_name, site=site, call=call,
            num_batches_tracked=num_batches_tracked, cumulative=cumulative, steps=steps,
            update_running=(running_mean is not None or running_var is not None)
            and not is_recomputing(),
        )
    # CPU eager code merges on the host, as the lean step does (every rank alike)
    on_host = _step.host_math(input.device, weight, running_mean, running_var)
    point = _shift(input, mask, running_mean, num_batches_tracked, decay, cumulative, steps,
                   group_name, site, call, on_host)
    packed, ident = global_moments(input, mask, point.double(), group_name, site, call,
                                   single_value, state=running_mean)
    acc = _stats.acc_dtype(input.dtype)
    channels = input.size(1)
    compiling = torch.compiler.is_compiling()
    merged: _step.Merged | _step.HostMerged
    if on_host:
        merged = _step.merge_on_host(packed.numpy(), point.numpy(), eps, unbiased_var,
                                     torch.empty((5, channels), dtype=acc), None)
    else:
        counts = None
        if not compiling and _policy.host_reads(packed.device):
            tail = packed[-2:].tolist()
            counts = (tail[0], tail[1])
        shift_eps = torch.stack([point, torch.full_like(point, float(eps))])
        merged = _step.merge(packed, shift_eps, counts, acc, unbiased_var)
    count = packed[2 * channels:2 * channels + 1]
    # Function.apply is untyped in torch's stubs
    out: Tensor = SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, mask, merged.mean, merged.inv_std, count, ident, call, group_name,
        site, inplace_activation,
    )
    if running_mean is not None or running_var is not None:
        tracked = num_batches_tracked if cumulative else None
        if isinstance(merged, _step.HostMerged):
            if not is_recomputing():
                _step.update_on_host(running_mean, running_var, merged, decay,
                                     None if tracked is None else _policy.host_int(tracked))
        elif compiling or not runs_op_body_directly(running_mean, running_var):
            update_running_stats_(running_mean, running_var, merged.mean, merged.batch_var,
                                  count, decay, tracked)
        elif not is_recomputing():
            _step.update_running_(running_mean, running_var, merged, decay, tracked, acc)
    return out
