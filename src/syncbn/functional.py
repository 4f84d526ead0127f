"""Functional synchronized batch normalization: validates, then picks the path.

The three paths, chosen by named predicates:

- **running statistics** (``training=False``): ``F.batch_norm`` with the running
  buffers. No communication at all, so one rank may evaluate alone.
- **local fallback** (:func:`local_fallback_applies`): no process group is
  initialized, or the group has one rank. The global batch *is* the local batch,
  so ``F.batch_norm`` gives the identical result; it is used as is.
- **synchronized**: :class:`~syncbn._autograd.SyncBatchNormFunction`, one
  all-reduce forward and one backward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import _checks, _comm
from ._activation import Activation
from ._autograd import SingleValuePolicy, SyncBatchNormFunction, is_recomputing

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
) -> Tensor:
    """Batch normalization whose training statistics are those of the whole process group.

    ``y = weight·(x − μ)/√(σ² + eps) + bias`` per channel (dim 1), where in
    training μ and the biased σ² are taken over every value of the channel on
    every rank of ``process_group`` (default: the world), and the running
    buffers, when given, take ``running ← (1 − momentum)·running + momentum·batch``
    with the unbiased global variance ``σ²·N/(N − 1)``. Out of training the
    running buffers normalize and nothing is communicated. The signature and
    semantics are those of ``torch.nn.functional.batch_norm`` plus the group.

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

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Raises:
        TypeError: ``input`` is not a floating-point tensor, or ``process_group``
            is not a ProcessGroup.
        ValueError: input rank outside 2–5, zero channels, a buffer or parameter
            of the wrong size, missing running buffers out of training, a bad
            ``momentum``/``eps``, an unusable group, or (torch's text) a
            training batch with one value per channel over the whole group.
    """
    _checks.check_tensor(input)
    _checks.check_ndim(input)
    _checks.check_channels(input, None)
    _checks.check_floating(input)
    _checks.check_momentum(momentum, allow_none=False)
    _checks.check_eps(eps)
    channels = input.size(1)
    for name, value in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", weight), ("bias", bias)):
        _checks.check_per_channel(name, value, channels)
    _checks.check_param_dtypes(input, weight, running_mean)

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "sync_batch_norm with training=False normalizes with the running "
                "statistics, but running_mean or running_var is None; pass both "
                "buffers, or training=True to use batch statistics"
            )
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)

    return batch_norm_train(input, running_mean, running_var, weight, bias, momentum, eps,
                            process_group, site=None)


def batch_norm_train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    process_group: _comm.ProcessGroup | None,
    site: _comm.CallSite | None,
    inplace_activation: Activation | None = None,
) -> Tensor:
    """Training step in Torch's conventions: the local fallback or the synchronized core.

    Inside a checkpoint's recompute the running buffers are left alone on both
    paths (torch's own BatchNorm updates them twice there, pytorch#96136). The
    in-place activated mode always runs the core (without a collective when
    the fallback applies), since ``F.batch_norm`` has no such mode.
    """
    group = _comm.resolve_group(process_group)
    fallback = local_fallback_applies(group)
    if is_recomputing():
        if fallback and inplace_activation is None:
            # throwaway copies: F.batch_norm must save the same tensors as in the first
            # forward (a non-reentrant checkpoint checks that), without a second update
            running_mean = None if running_mean is None else running_mean.clone()
            running_var = None if running_var is None else running_var.clone()
        else:
            running_mean = running_var = None
    if fallback and inplace_activation is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    if fallback:
        group = None
    return synchronized_batch_norm(
        input, running_mean, running_var, weight, bias,
        eps=eps, decay=1.0 - float(momentum), unbiased_var=True,
        process_group=group, single_value="raise",
        site=site or call_site(input, "sync_batch_norm", call=0, timeout_s=None, debug=None),
        inplace_activation=inplace_activation,
    )


def call_site(input: Tensor, layer: str, call: int, timeout_s: float | None,
              debug: bool | None) -> _comm.CallSite:
    """Describe a layer's collective; ``None`` settings come from the environment.

    ``timeout_s=None`` reads ``SYNCBN_TIMEOUT`` (unset: the group's own timeout);
    ``debug=None`` reads ``SYNCBN_DEBUG``.
    """
    return _comm.CallSite(
        layer=layer, call=call, channels=input.size(1), dtype=input.dtype,
        shape=tuple(input.shape),
        timeout_s=_comm.env_timeout() if timeout_s is None else timeout_s,
        debug=_comm.env_debug() if debug is None else debug,
    )


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
) -> Tensor:
    """Training-mode normalization with batch statistics of ``process_group``.

    The shared entry of every flavour's shell into the core: conventions come
    in already translated (``decay``, biased or unbiased running variance, the
    one-value policy). ``process_group=None`` normalizes with local statistics
    through the same code (no collective); a group needs a ``site`` (see
    :func:`call_site`) for its error messages. ``inplace_activation`` selects the
    in-place activated mode: the input is overwritten with ``f(BN(x))`` and only
    that output is saved; the caller checks it first (``_autograd.check_inplace``).
    Arguments are not validated here.
    """
    # Function.apply is untyped in torch's stubs
    if process_group is not None and site is None:
        site = call_site(input, "SyncBatchNorm", call=0, timeout_s=None, debug=None)
    out: Tensor = SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        input, weight, bias, running_mean, running_var,
        eps, decay, unbiased_var, process_group, site, single_value, inplace_activation,
    )
    return out
