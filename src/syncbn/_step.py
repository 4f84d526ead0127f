"""The lean training step: decided once per signature, then only the kernels the math needs.

Everything that depends only on a layer's settings and the input's signature
(shape, dtype, device, memory format, group, mode) is decided once and cached in a
:class:`StepPlan`: the reduction dims, the local count, the step keys, the constant
tails of the packed buffers, the views the step writes into, and which kernels
suit the layout. The steady-state step (eager, no mask, no in-place activation,
at least 2 values per channel on this rank) then runs one of two forms of the same
math, by the device policy (:func:`host_math`, ``_policy``):

**CPU** (:func:`_host_step`): the host is the device, and a NumPy operation on a
few hundred values costs a fraction of a torch dispatch, so the O(C) work (the
shift, the packing, the merge, the running-statistics update, backward's
coefficients) runs in float64 NumPy on tensors the step owns (the layer's small
tensors come in by one ``cat`` and the running buffers go back by ``copy_``: a NumPy
view of a caller's tensor would pin its storage), and torch runs only the
input-sized kernels: 16 per layer-step with an all-reduce, 16 + 2W with gloo's
all_gather (``_comm.gathers``), one fewer on channels_last near 0 (counted by
``syncbn.cli.kernels``; torch's own BatchNorm: 3, the floor 7)::

    forward    d = x − s;  [Σd, Σd²] (two sums, or torch's statistics kernel on
               channels_last, there on x itself when every |s| ≤ 4 running σ:
               :func:`near_shift`);  sum over ranks [Σd, Σd², n, key];  y = a·x + (β − a·μ)
               (torch's inference kernel, or a multiply-add: channels_last, large 2-D)
    backward   [Σdy, Σdy·x̂] (torch's backward reduction);  sum over ranks;
               dx = (x − μ)·b + c' + a·dy  (inference kernel or multiply-add, then one)

**Accelerators** (and CPU layers with bfloat16 parameters, which NumPy cannot view):
the same steps in torch ops on the device, N kept there (no host read):
:func:`merge` and :func:`update_running_`, shared with the general path.

Two plain sums of the deviations beat torch's statistics kernel on contiguous
inputs, N-C-spatial and 2-D (20 against 40 µs on (4, 64, 8, 8), 0.8 against 3.1 ms
on (8, 64, 56, 56)); on channels_last the kernel's single pass wins, and near 0
(every shift within 4 running σ) it runs on ``x`` itself, one pass fewer
(:func:`near_shift`). The deviations from a shift near the mean lose nothing to
cancellation, so float32 sums keep the variance to a few float32 roundings (~2e-7
relative, whatever the count). The kernel accumulates in float32, so its error,
that of torch's own BatchNorm on the same input, grows with the values per channel
(measured on N(0.3, 1), max over channels: 3e-7 at 256, 1.1e-6 at 4096, 2.8e-6 at
16384); on 2-D inputs it would save two kernels but measured no faster in the step
(1.46–1.80 against 1.43–1.87 ms on (256, 1024)), so 2-D keeps the sums and their
precision.

The shift ``s`` is a function of the layer's state alone (:func:`shift_from_state`),
so every rank holds it bitwise alike and a resumed or unpickled layer continues
bitwise; a layer whose state holds no usable mean (its first step, no running
statistics, ``momentum=0``, the Paddle flavour, the functional form) exchanges
one first (:func:`exchange_shift`: one more collective of the same size). Every
rank of a group runs the same merge (host or torch, decided alike on every rank),
so all hold bitwise identical statistics whichever path their own batch takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import _comm, _policy, _stats


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What one layer's training step does for one input signature (built once, cached).

    Holds the constant tensors and views the step reads or writes: ``shift_eps`` is
    rewritten (row 0, the shift) by every step that uses the plan, and read before
    the step returns, so steps that share a plan (equal layers) must not interleave
    (they do not: a step runs to its end on one thread).
    """

    channels: int
    ndim: int
    dims: list[int]
    count: int  # local values per channel
    acc: torch.dtype
    eps: float
    reads: bool  # host reads allowed (see _policy): the O(C) work runs in NumPy
    group_name: str
    site: _comm.CallSite
    key_forward: int
    key_backward: int
    shape_c: list[int]  # [1, C, 1, …]: a per-channel vector against the input
    tail_forward: Tensor  # float64 [n, key]
    tail_backward: Tensor  # [0, key] in the accumulation dtype (exact: keys < 2**20)
    ones: Tensor  # (C,) acc: the unit variance of the inference kernel
    shift_eps: Tensor  # (2, C) acc: row 0 the step's shift (written each step), row 1 eps
    shift: Tensor  # shift_eps[0]
    shift_view: Tensor  # shift_eps[0] viewed as shape_c
    shift_host: Any  # a NumPy view of shift_eps[0] (CPU), else None
    exponents: Tensor  # (2, 1) acc: [−½, −1]
    nothing: Tensor  # an empty acc tensor: the inference kernel's unused outputs
    sixteen_bit: bool
    affine: bool  # y and dx as broadcast multiply-adds (channels_last, large 2-D), else
    # torch's inference batch-norm kernel (NCHW: 0.34 against 1.0 ms on (8, 64, 56, 56))
    reuse: bool  # the output's buffer holds the deviations first (large float32/64 inputs:
    # one input-sized allocation fewer, whose page faults cost more than the kernels)
    stats_kernel: bool  # the deviations' moments by torch's statistics kernel (one pass:
    # channels_last), else by two sums (NCHW, 2-D: 4x faster there than that kernel)


_plans: dict[tuple[Any, ...], StepPlan] = {}
_MAX_PLANS = 512


def plan_for(x: Tensor, site: _comm.CallSite, eps: float, group_name: str) -> StepPlan:
    """The cached :class:`StepPlan` of this input signature, layer and group."""
    signature = (tuple(x.shape), x.dtype, x.device, x.stride(), site, eps, group_name,
                 _policy.host_reads(x.device))
    plan = _plans.get(signature)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _build_plan(x, site, eps, group_name)
        _plans[signature] = plan
    return plan


def _build_plan(x: Tensor, site: _comm.CallSite, eps: float, group_name: str) -> StepPlan:
    channels, ndim = x.size(1), x.dim()
    count = _stats.local_count(x.shape)
    acc = _stats.acc_dtype(x.dtype)
    reads = _policy.host_reads(x.device)
    key_f = _comm.step_key(site.layer, "forward", channels, site.eps, site.decay)
    key_b = _comm.step_key(site.layer, "backward", channels, site.eps, site.decay)
    shape_c = [1, channels, *([1] * (ndim - 2))]
    shift_eps = torch.full((2, channels), float(eps), dtype=acc, device=x.device)
    return StepPlan(
        channels=channels, ndim=ndim, dims=_stats.reduce_dims(ndim), count=count, acc=acc,
        eps=float(eps), reads=reads, group_name=group_name, site=site, key_forward=key_f,
        key_backward=key_b, shape_c=shape_c,
        tail_forward=torch.tensor([float(count), float(key_f)], dtype=torch.float64,
                                  device=x.device),
        tail_backward=torch.tensor([0.0, float(key_b)], dtype=acc, device=x.device),
        ones=torch.ones(channels, dtype=acc, device=x.device),
        shift_eps=shift_eps, shift=shift_eps[0], shift_view=shift_eps[0].view(shape_c),
        shift_host=shift_eps[0].numpy() if reads else None,
        exponents=torch.tensor([[-0.5], [-1.0]], dtype=acc, device=x.device),
        nothing=torch.empty(0, dtype=acc, device=x.device),
        sixteen_bit=x.dtype in (torch.float16, torch.bfloat16),
        affine=not x.is_contiguous() or (ndim == 2 and x.numel() >= AFFINE_2D_NUMEL),
        reuse=x.numel() > LARGE_NUMEL and acc == x.dtype,
        stats_kernel=ndim > 2 and not x.is_contiguous(),
    )


AFFINE_2D_NUMEL = 1 << 14
"""From this many values a 2-D input is normalized by a broadcast multiply-add (46 against
90 µs on (256, 1024)); below, torch's inference kernel is as fast or faster."""

LARGE_NUMEL = 1 << 17
"""Above this many values the step writes the deviations into the output's buffer."""


def exchange_shift(x: Tensor, mask: Tensor | None, group_name: str | None,
                   site: _comm.CallSite | None, call: int) -> Tensor:
    """A shift every rank holds alike: the global mean, from one sum over ranks of ``2C + 2``
    float64 values ``[Σx, 0, count, key]`` (phase ``"shift"``); without a group, the local
    mean. Costs one collective: paid by a layer's first synchronized step in a process
    (and, in compiled code, by every step of a layer with no running mean to start from).
    """
    acc = _stats.acc_dtype(x.dtype)
    dims = _stats.reduce_dims(x.dim())
    with torch.no_grad():
        values = x.detach()
        if mask is None:
            total = values.sum(dims, dtype=torch.float64)
            count = total.new_full((1,), float(_stats.local_count(x.shape)))
        else:
            valid = mask.unsqueeze(1)
            total = torch.where(valid, values, 0).sum(dims, dtype=torch.float64)
            count = mask.sum(dtype=torch.float64).reshape(1)
        buffer = torch.cat([total, torch.zeros_like(total), count, count.new_zeros(1)])
        if group_name is not None:
            assert site is not None, "a group needs a CallSite"
            buffer = _comm.all_reduce_checked(buffer, group_name, site, "shift", call, x.shape)
        channels = total.numel()
        mean = buffer[:channels] / buffer[2 * channels:2 * channels + 1].clamp_min(1.0)
        return torch.where(torch.isfinite(mean), mean, 0.0).to(acc)


def shift_from_state(running_mean: Tensor | None, steps: int | None, decay: float,
                     cumulative: bool, out: Tensor, host: Any = None, state: Any = None
                     ) -> bool:
    """Write the shift ``s`` into ``out`` from the layer's state; False where the state holds
    none (then :func:`exchange_shift`).

    The running mean, bias-corrected as Adam corrects its moments: after ``k``
    updates from 0 with keep-rate ``decay``, ``r_k = (1 − decay)·Σ decay^(k−j)·μ_j``,
    so ``r_k/(1 − decay^k)`` is a weighted average of past batch means, a few σ
    from this batch's. ``steps`` is ``num_batches_tracked`` with this step counted
    (a host int: read on CPU, mirrored by the module on accelerators), so
    ``k = steps − 1``; the cumulative average (``momentum=None``) is unbiased as it
    is. No running mean, no count (the functional form, the Paddle flavour),
    ``k = 0`` (a first step: the running mean is only its initial value) or
    ``decay = 1`` (``momentum=0``: it never moves) → False. Being a function of
    the ``state_dict`` (``running_mean``, ``num_batches_tracked``), it is alike on
    every rank in step and continues bitwise after a resume. Non-finite values
    (a NaN batch poisoned the running mean) count as 0, so the batch statistics
    stay those of the batch, as torch's. ``host``, a NumPy view of ``out`` (CPU host
    math, see :func:`host_math`), computes it there (``state``: the running mean's values
    as :func:`host_copy` gives them, if the caller holds them); otherwise one torch
    multiply, checked on the host where reads are allowed, else by one ``nan_to_num_``.
    """
    factor = _shift_factor(running_mean is not None, steps, decay, cumulative)
    if factor is None:
        return False
    assert running_mean is not None
    if host is not None:
        if state is None:
            (state,) = host_copy(running_mean)
        np.multiply(state, factor, out=host, dtype=host.dtype)
        if not np.isfinite(host).all():
            np.nan_to_num(host, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return True
    torch.mul(running_mean, factor, out=out)
    if not _policy.host_reads(out.device) or not _policy.all_finite(out):
        out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return True


def host_math(device: torch.device, *tensors: Tensor | None) -> bool:
    """Whether a step's O(C) work runs on the host in NumPy (:func:`_host_step`): eager CPU
    code (see ``_policy``) whose parameters and running buffers NumPy can view (plain
    tensors; bfloat16 has no NumPy dtype). Every rank of a group decides alike, so all
    run the same merge and hold bitwise identical statistics, whichever path their own
    batch takes."""
    return (_policy.host_reads(device) and not torch.compiler.is_compiling()
            and all(t is None or (t.dtype in _HOST_DTYPES and type(t) in _PLAIN)
                    for t in tensors))


_PLAIN = (Tensor, torch.nn.Parameter)
"""Tensors NumPy views: plain ones (a tensor subclass, e.g. a DTensor, keeps the torch path)."""


_HOST_DTYPES = (torch.float32, torch.float64, torch.float16)


def lean_applies(x: Tensor, mask: Tensor | None, inplace: bool, group_name: str | None) -> bool:
    """Whether the lean step runs: eager, no dispatch mode, plain tensors, a group, no mask,
    no in-place activation, and at least 2 values per channel on this rank."""
    return (group_name is not None and mask is None and not inplace
            and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and type(x) is Tensor
            and _stats.local_count(x.shape) >= 2)


def lean_batch_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, *, eps: float, decay: float,
    unbiased_var: bool, group_name: str, site: _comm.CallSite, call: int,
    num_batches_tracked: Tensor | None, cumulative: bool, steps: int | None,
    update_running: bool, plan: StepPlan | None = None, on_host: bool | None = None,
) -> Tensor:
    """The steady-state synchronized training step (see the module docstring); ``plan``
    and ``on_host`` (:func:`host_math`'s answer for these tensors), if the caller holds them."""
    if plan is None:
        plan = plan_for(x, site, eps, group_name)
    if on_host is None:
        on_host = host_math(x.device, weight, running_mean, running_var)
    if on_host:
        return _host_step(plan, x, running_mean, running_var, weight, bias, decay=decay,
                          unbiased_var=unbiased_var, call=call,
                          num_batches_tracked=num_batches_tracked, cumulative=cumulative,
                          steps=steps, update_running=update_running)
    key = plan.key_forward
    state = None if running_mean is None else running_mean.detach()
    if state is not None and plan.reads:  # ranks whose running means differ are out of step
        key = _comm.fold_state(key, state)
    if not shift_from_state(state, steps, decay, cumulative, plan.shift):
        plan.shift.copy_(exchange_shift(x, None, group_name, site, call))
    xd = x.detach()
    # into an output laid out like the input: a broadcast subtraction on channels_last
    # otherwise takes torch's slow path (1.9 ms against 0.2 ms on (8, 64, 56, 56))
    d = torch.sub(xd, plan.shift_view, out=torch.empty_like(xd, dtype=plan.acc))
    # float64 sums: the packing is then one same-dtype cat (one kernel on CUDA)
    first = d.sum(plan.dims, dtype=torch.float64)
    second = d.square_().sum(plan.dims, dtype=torch.float64)
    packed = torch.cat([first, second, plan.tail_forward])  # [Σd, Σd², n, key]
    host = None
    if plan.reads:
        host = packed.numpy()
        host[-1] = key
    counts = _comm.reduce_checked_(packed, group_name, site, "forward", call, x.shape, key,
                                   host=host)
    merged = merge(packed, plan.shift_eps, counts, plan.acc, unbiased_var, plan.exponents)
    powers = merged.inverse_powers  # [invstd, invstd²]
    scales = powers if weight is None else powers * weight.detach()
    if update_running:
        update_running_(running_mean, running_var, merged, decay,
                        num_batches_tracked if cumulative else None, plan.acc)
    scale = scales[0]
    y = torch.batch_norm(x.detach(), scale, _acc_bias(bias, plan), merged.mean, plan.ones,
                         False, 0.0, 0.0, False)
    out: Tensor = LeanBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, merged.mean, powers[0], scale, scales,
        (plan, call, merged.total, False, y))
    return out



def _host_step(
    plan: StepPlan, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, *, decay: float, unbiased_var: bool,
    call: int, num_batches_tracked: Tensor | None, cumulative: bool, steps: int | None,
    update_running: bool,
) -> Tensor:
    """The steady-state step on CPU: the input-sized work in torch's kernels, the O(C) work
    on the host.

    On CPU the host is the device, and a NumPy operation on a few hundred values costs
    a fraction of a torch dispatch, so the shift, the packing, the merge, the
    running-statistics update and (in backward) the gradient coefficients run in
    NumPy, in float64, on tensors of its own: the layer's small tensors come in by
    one ``cat`` (:func:`host_copy`) and the running buffers go back by ``copy_``.
    torch runs 10 kernels forward (that cat, the count's read, the deviations, two
    sums, the collective, the normalization, two write-backs; the module counts the step
    with one more; channels_last: the statistics kernel instead of the two sums, on ``x``
    itself where :func:`near_shift` allows, without the deviations) and 5 backward
    (gloo's all_gather adds its receive copies, see ``_comm.gathers``). The formulas
    are those of the torch path (:func:`merge`, :func:`update_running_`), rounded
    once into the accumulation dtype.
    """
    channels = plan.channels
    key = plan.key_forward
    w, b, state, old_var = host_copy(weight, bias, running_mean, running_var)
    if num_batches_tracked is not None:
        steps = int(num_batches_tracked.item())
    if state is not None:  # ranks whose running means differ are out of step
        assert running_mean is not None
        key = _comm.fold_key(key, state.astype(_NUMPY_DTYPES[running_mean.dtype]))
    if not shift_from_state(running_mean, steps, decay, cumulative, plan.shift,
                            plan.shift_host, state):
        plan.shift.copy_(exchange_shift(x, None, plan.group_name, plan.site, call))
    xd = x.detach()
    out = torch.empty_like(xd) if plan.reuse else None
    packed = torch.empty(2 * channels + 2, dtype=torch.float64)
    host = packed.numpy()
    # the deviations d = x − s, except where torch's statistics kernel may take x itself
    # (channels_last near 0, see near_shift: one pass fewer)
    direct = plan.stats_kernel and not plan.sixteen_bit and near_shift(plan.shift_host, old_var)
    d = xd if direct else torch.sub(
        xd, plan.shift_view, out=out if out is not None else torch.empty_like(xd, dtype=plan.acc))
    if plan.stats_kernel:  # one pass: torch's statistics kernel gives the mean m and the
        # biased variance v of d, so Σ(x − s) = n·m' and Σ(x − s)² = n·(v + m'²), with m' = m
        # about the shift (m' = m − s where d is x itself; m' is small: near the mean)
        mean_d, var_d = torch.batch_norm_update_stats(d, None, None, 0.0)
        m = mean_d.numpy().astype(np.float64)
        if direct:
            m -= plan.shift_host
        np.multiply(m, plan.count, out=host[:channels])
        host[channels:-2] = (var_d.numpy() + m * m) * plan.count
    else:
        host[:channels] = d.sum(plan.dims).numpy()
        host[channels:-2] = d.square_().sum(plan.dims).numpy()
    host[-2] = plan.count
    host[-1] = key
    _comm.reduce_checked_(packed, plan.group_name, plan.site, "forward", call, x.shape, key,
                          host=host)
    # rows 0-5 the forward's statistics (merge_on_host), 6-8 backward's coefficients
    stats = torch.empty((9, channels), dtype=plan.acc)
    merged = merge_on_host(host, plan.shift_host, plan.eps, unbiased_var, stats, w, b)
    if update_running:
        update_on_host(running_mean, running_var, merged, decay,
                       steps if cumulative else None, state, old_var)
    rows = stats.unbind()
    mean, inv_std, scale, offset = rows[0], rows[1], rows[2], rows[5]
    if plan.affine:  # y = a·x + (β − a·μ)
        shape = plan.shape_c
        y = torch.addcmul(offset.view(shape), xd, scale.view(shape),
                          out=out if out is not None else torch.empty_like(xd))
    elif out is not None:
        y = torch.ops.aten.native_batch_norm.out(
            xd, scale, _acc_bias(bias, plan), mean, plan.ones, False, 0.0, 0.0,
            out=out, save_mean=plan.nothing, save_invstd=plan.nothing)[0]
    else:
        y = torch.batch_norm(xd, scale, _acc_bias(bias, plan), mean, plan.ones, False, 0.0,
                             0.0, False)
    result: Tensor = LeanBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, mean, inv_std, scale, stats, (plan, call, None, True, y))
    return result


NEAR_SIGMAS = 4.0
"""How close to 0 (in running standard deviations) every channel's shift must be for the
statistics kernel to run on the input itself (:func:`near_shift`)."""


def near_shift(shift: Any, running_var: Any) -> bool:
    """Whether the CPU step may take torch's statistics kernel on ``x`` itself instead of on
    the deviations ``x − s`` (one read-and-write pass of the input fewer: 3.2–3.3 against
    3.5–3.9 ms per (8, 64, 56, 56) channels_last step, one rank): where every channel's
    shift, and so its mean, lies within :data:`NEAR_SIGMAS` running standard deviations
    of 0 (``|s| ≤ k·√running_var``; NumPy arrays; ``None`` without running statistics →
    False).

    Why it is safe there: the kernel accumulates in float32, so its mean carries an
    error of order ε·|μ| and its variance one of order ε·(|μ|/σ)² relative. Where
    ``|μ| ≲ 4σ`` that is the error of torch's own BatchNorm on the same values (the
    same kernel), and the merge (``Σd = n·(m − s)``, ``Σd² = n·(v + (m − s)²)`` in
    float64) adds none. Far from 0 (μ/σ = 1e4) the deviations keep the variance to a
    few roundings where the kernel on ``x`` would lose ~1e-4 of it, so they stay.
    16-bit inputs always take the deviations (in float32: the kernel's statistics of
    a 16-bit input come back in its dtype). A NaN or infinite running variance fails
    the test. The decision reads only the
    layer's state, so ranks in step decide alike, though nothing needs them to: the
    packed sums mean the same either way, and every rank merges the same sums.
    """
    if running_var is None:
        return False
    return bool(np.all(np.abs(shift) <= NEAR_SIGMAS * np.sqrt(running_var)))


def _acc_bias(bias: Tensor | None, plan: StepPlan) -> Tensor | None:
    """The bias as torch's inference kernel takes it (the accumulation dtype)."""
    if bias is None:
        return None
    bias = bias.detach()
    return bias if bias.dtype == plan.acc else bias.to(plan.acc)


def _shift_factor(state: bool, steps: int | None, decay: float, cumulative: bool
                  ) -> float | None:
    """The factor of :func:`shift_from_state`'s bias correction, or ``None`` where the state
    holds no usable mean."""
    if not state or steps is None or steps < 2:
        return None
    if cumulative:
        return 1.0
    if decay >= 1.0:
        return None
    return 1.0 / (1.0 - decay ** (steps - 1))


def host_copy(*tensors: Tensor | None) -> list[Any]:
    """The values of a layer's small floating CPU tensors (parameters, running buffers) as
    NumPy arrays (their common dtype), ``None`` for ``None``: one ``cat`` into a tensor of
    our own, viewed by NumPy. A NumPy view of the caller's tensor itself would make its
    storage unresizable for good (FSDP2 frees parameters by resizing theirs), so the host
    never views a tensor it does not own."""
    parts = [t.detach().reshape(-1) for t in tensors if t is not None]
    if not parts:
        return [None] * len(tensors)
    values = torch.cat(parts).numpy()
    out: list[Any] = []
    start = 0
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        end = start + tensor.numel()
        out.append(values[start:end])
        start = end
    return out


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class HostMerged(NamedTuple):
    """:func:`merge_on_host`'s statistics (the attributes of :class:`Merged` are there too)."""

    stats: Tensor  # (5, C), the accumulation dtype: [μ, invstd, a, −a/N, −a·invstd/N]
    host_mean: Any  # float64 NumPy arrays: μ, σ² + eps (σ² biased), the running variance's
    host_var_eps: Any  # target
    host_batch_var: Any
    total: float  # N
    update: float  # 1.0 where the running statistics move (N > 1), else 0.0

    @property
    def mean(self) -> Tensor:
        return self.stats[0]

    @property
    def inv_std(self) -> Tensor:
        return self.stats[1]

    @property
    def inverse_powers(self) -> Tensor:  # float64, for whoever inspects a merge
        return torch.from_numpy(np.stack([self.host_var_eps ** -0.5, 1.0 / self.host_var_eps]))

    @property
    def batch_var(self) -> Tensor:
        return torch.from_numpy(self.host_batch_var)


def merge_on_host(host: Any, shift: Any, eps: float, unbiased_var: bool, stats: Tensor,
                  weight: Any, bias: Any = None) -> HostMerged:
    """:func:`merge` in float64 NumPy (CPU host math): from ``host = [S₁, S₂, N, key]``
    (a NumPy view of the summed packing) and the shift ``s`` (a NumPy array), writes
    ``stats`` (a (5, C) CPU tensor in the accumulation dtype) with
    ``[μ, invstd, a, −a/N, −a·invstd/N]`` and, with 6 rows, ``β − a·μ``;
    ``a = weight·invstd`` (``weight`` and ``bias`` NumPy arrays, or ``None``: 1 and 0);
    rows 3–4 times ``[Σdy, Σdy·x̂]`` are backward's ``[c', b]`` (see
    :class:`LeanBatchNormFunction`), row 5 the offset of ``y = a·x + (β − a·μ)``.

    With ``n = max(N, 1)``: ``μ = s + S₁/n``, ``σ² = max(S₂/n − (S₁/n)², 0)``,
    ``invstd = (σ² + eps)^(−½)``; the running variance takes ``σ²·N/(N − 1)`` (or ``σ²``
    with ``unbiased_var=False``), and moves only where ``N > 1``.
    """
    channels = shift.shape[0]
    total = float(host[-2])
    divisor = max(total, 1.0)
    moments = host[:2 * channels].reshape(2, channels) / divisor  # [S₁/n, S₂/n]
    var = moments[1] - moments[0] * moments[0]
    np.maximum(var, 0.0, out=var)
    mean = moments[0] + shift
    var_eps = var + eps
    inv_std = 1.0 / np.sqrt(var_eps)
    scale = inv_std if weight is None else weight * inv_std
    rows = stats.numpy()
    rows[0] = mean
    rows[1] = inv_std
    rows[2] = scale
    negative = scale * (-1.0 / divisor)
    rows[3] = negative
    rows[4] = negative * inv_std
    if len(rows) > 5:
        offset = -scale * mean
        rows[5] = offset if bias is None else offset + bias
    batch_var = var * (total / (total - 1.0)) if unbiased_var and total > 1.0 else var
    return HostMerged(stats, mean, var_eps, batch_var, total, 1.0 if total > 1.0 else 0.0)


def update_on_host(running_mean: Tensor | None, running_var: Tensor | None,
                   merged: HostMerged, decay: float, count: float | None,
                   old_mean: Any = None, old_var: Any = None) -> None:
    """:func:`update_running_` on the host (CPU host math): ``running ← (1 − w)·running +
    w·batch``, as torch's BatchNorm writes it (inf and NaN carried alike), with
    ``w = 1 − decay`` (or ``1/count``, the cumulative average, ``count`` the host value of
    ``num_batches_tracked``), computed in float64 and rounded once when copied into the
    buffers (one ``copy_`` each, so their autograd versions move as with any in-place
    op); where ``N > 1``. ``old_mean``/``old_var``: the buffers' values as
    :func:`host_copy` gives them, if the caller holds them."""
    if merged.update == 0.0:
        return
    weight = 1.0 - decay if count is None else 1.0 / max(count, 1.0)
    if (running_mean is not None and old_mean is None) or \
            (running_var is not None and old_var is None):
        old_mean, old_var = host_copy(running_mean, running_var)
    updates = [(running, old, batch) for running, old, batch in (
        (running_mean, old_mean, merged.host_mean),
        (running_var, old_var, merged.host_batch_var)) if running is not None]
    new = torch.empty((len(updates), merged.host_mean.shape[0]), dtype=torch.float64)
    for values, (_, old, batch) in zip(new.numpy(), updates, strict=True):
        values[...] = old  # float64 from here on
        values *= 1.0 - weight
        values += weight * batch
    for (running, _, _), value in zip(updates, new.unbind(), strict=True):
        running.copy_(value)


@dataclass(frozen=True)
class Merged:
    """Global statistics in the accumulation dtype, from the summed packing (a dataclass:
    torch 2.10's compile loses track of a NamedTuple's property)."""

    mean: Tensor  # μ
    inverse_powers: Tensor  # (2, C): [(σ² + eps)^(−1/2), (σ² + eps)^(−1)], σ² biased
    batch_var: Tensor  # the variance the running variance takes (unbiased or biased)
    total: float | Tensor  # N: a host float (CPU) or a (1,) tensor (accelerators)
    update: float | Tensor  # 1.0/0.0 or a tensor: whether the running statistics move (N > 1)

    @property
    def inv_std(self) -> Tensor:
        return self.inverse_powers[0]


def merge(packed: Tensor, shift_eps: Tensor, counts: tuple[float, float] | None,
          acc: torch.dtype, unbiased_var: bool, exponents: Tensor | None = None) -> Merged:
    """μ, ``(σ² + eps)^[−½, −1]`` and the running-variance target from ``[S₁, S₂, N, key]``
    summed over the ranks (``S₁ = Σ(x − s)``, ``S₂ = Σ(x − s)²``); ``shift_eps`` is
    ``[s, eps]`` (2, C); ``exponents`` the (2, 1) tensor ``[−½, −1]`` in ``acc``, if the
    caller holds one.

    ``μ = s + S₁/N`` and ``σ² = S₂/N − (S₁/N)²``: the all-reduce form of Chan, Golub
    & LeVeque's merge, exact to ε·((μ − s)/σ)² relative (see ``_stats``). Written so
    that the unbiased variance comes first: with ``q = [S₁, S₂]/(N − 1)``,
    ``σ²·N/(N − 1) = q₂ − q₁²·(N − 1)/N`` and ``[μ, σ² + eps] = [s, eps] + q·(N − 1)/N``.
    Every rank runs this same code on the same sums, so all hold bitwise identical
    statistics. ``N ≤ 1`` (every rank empty, or one value) gives ``μ = s + S₁``,
    ``σ² = 0`` and no running update. ``counts`` is the host ``(N, key sum)`` where
    host reads are allowed (see ``_policy``), else ``None`` and N stays on the device.
    """
    channels = shift_eps.size(1)
    sums = packed[:2 * channels].view(2, channels)
    q = torch.empty((2, channels), dtype=acc, device=packed.device)
    if exponents is None or torch.compiler.is_compiling():  # compiled: a constant of its own
        exponents = torch.tensor([[-0.5], [-1.0]], dtype=acc, device=packed.device)
    if counts is not None and counts[0] >= 2:
        count = counts[0]
        ratio = (count - 1.0) / count
        torch.div(sums, count - 1.0, out=q)
        q[1].addcmul_(q[0], q[0], value=-ratio).clamp_min_(0.0)
        both = torch.add(shift_eps, q, alpha=ratio)  # [μ, σ² + eps]
        batch_var = q[1] if unbiased_var else q[1] * ratio
        return Merged(both[0], torch.pow(both[1], exponents), batch_var, count, 1.0)
    update: float | Tensor
    if counts is not None:
        total_host = counts[0]
        divisor: float | Tensor = max(total_host, 1.0)
        torch.div(sums, divisor, out=q)
        update = 0.0
        total: float | Tensor = total_host
    else:  # N stays on the device (float64): no host read
        total = packed[2 * channels:2 * channels + 1]
        divisor = total.clamp_min(1.0)
        torch.div(sums, divisor, out=q)
        excess = total - 1.0
        update = excess.clamp(0.0, 1.0)  # N is a whole number: 1.0 where N > 1, else 0.0
    q[1].addcmul_(q[0], q[0], value=-1.0).clamp_min_(0.0)  # biased σ²
    both = shift_eps + q  # [μ, σ² + eps] (indexed, not unbound: torch 2.10's compile
    # loses the example values of unbind's outputs passed on to an autograd Function)
    batch_var = q[1]
    if unbiased_var and isinstance(divisor, Tensor):  # σ²·N/(N − 1), or σ² where N ≤ 1
        batch_var = q[1] * torch.div(divisor, excess.clamp_min(1.0))
    return Merged(both[0], torch.pow(both[1], exponents), batch_var, total, update)


def update_running_(running_mean: Tensor | None, running_var: Tensor | None, merged: Merged,
                    decay: float, num_batches_tracked: Tensor | None, acc: torch.dtype) -> None:
    """``running ← (1 − w)·running + w·batch`` with ``w = 1 − decay`` (or
    ``1/num_batches_tracked`` for the cumulative average), where ``N > 1``.

    With a host weight (N read on the host: CPU, where the compiled step's operator
    and the general path come here) the blend itself, both buffers at once: one
    ``_foreach_mul_`` by ``1 − w`` and one ``_foreach_add_`` of ``w·batch``, which
    carries inf and NaN exactly as torch's BatchNorm does (``lerp`` would turn an
    infinite running value into NaN). On the device (N, hence the gate, a tensor) the
    blend with a tensor weight: both buffers scaled by one ``_foreach_mul_``, then an
    ``addcmul_`` each. Eager CPU steps with NumPy-viewable buffers use
    :func:`update_on_host` instead.
    """
    if isinstance(merged.update, float) and merged.update == 0.0:
        return
    if num_batches_tracked is not None:
        if isinstance(merged.update, float) and _policy.host_reads(num_batches_tracked.device):
            weight: float | Tensor = 1.0 / max(_policy.host_int(num_batches_tracked), 1.0)
        else:
            weight = num_batches_tracked.to(acc).clamp_min(1.0).reciprocal()
    else:
        weight = 1.0 - decay
    if isinstance(merged.update, Tensor):
        weight = merged.update * weight
    pairs = [(running, batch) for running, batch in ((running_mean, merged.mean),
                                                     (running_var, merged.batch_var))
             if running is not None]
    runs = [running for running, _ in pairs]
    if isinstance(weight, Tensor):  # on the device: the blend, both buffers scaled at once
        torch._foreach_mul_(runs, (1.0 - weight).reshape(()))
        for running, batch in pairs:
            running.addcmul_(batch, weight)
        return
    batches = [batch if batch.dtype == running.dtype else batch.to(running.dtype)
               for running, batch in pairs]
    torch._foreach_mul_(runs, 1.0 - weight)
    torch._foreach_add_(runs, batches, alpha=weight)


def input_grad(x: Tensor, dy: Tensor, mean: Tensor, a: Tensor, b: Tensor, c_prime: Tensor,
               plan: StepPlan, c: Tensor | None = None) -> Tensor:
    """``dx = a·dy + b·(x − μ) + c' = a·dy + b·x + c`` per channel (``c = c' − b·μ``, given
    or computed here), in ``x``'s dtype and memory format.

    float32/float64: ``b·x + c`` as a broadcast multiply-add where the plan says so
    (channels_last, large 2-D), else torch's inference batch-norm kernel for
    ``(x − μ)·b + c'`` (unit variance, eps 0); then one multiply-add. 16-bit inputs:
    the whole sum in float32, rounded once (``a·dy`` and ``b·x + c`` rounded apart
    cancel badly when ``dy`` is mostly a per-channel constant plus a multiple of x̂).
    """
    shape = plan.shape_c
    if plan.sixteen_bit or plan.affine:
        if c is None:
            c = torch.addcmul(c_prime, b, mean, value=-1.0)
        if plan.sixteen_bit:
            out = torch.addcmul(c.view(shape), x, b.view(shape))
            return out.addcmul_(dy, a.view(shape)).to(x.dtype)
        out = torch.addcmul(c.view(shape), x, b.view(shape), out=torch.empty_like(x))
        return out.addcmul_(dy, a.view(shape))
    out = torch.batch_norm(x, b, c_prime, mean, plan.ones, False, 0.0, 0.0, False)
    return out.addcmul_(dy, a.view(shape))


class LeanBatchNormFunction(torch.autograd.Function):
    """``y = (x − μ)·w·invstd + β`` with global μ and invstd; exact gradients through them.

    ``scales`` holds ``[a, a·invstd]`` with ``a = w·invstd``; backward sums over the ranks
    ``[Σdy, Σdy·x̂]`` (``2C + 2`` float64 with the tail) and applies
    ``dx = a·dy + b·(x − μ) + c'`` with ``[c', b] = −[Σdy, Σdy·x̂]·[a, a·invstd]/N``,
    the expansion of ``dx = a·(dy − Σdy/N − x̂·Σ(dy·x̂)/N)`` (Ioffe & Szegedy 2015, §3;
    see ``_stats.input_grad_coefficients``). ``grad_weight = Σdy·x̂`` and
    ``grad_bias = Σdy`` stay local (DDP sums them).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                mean: Tensor, inv_std: Tensor, scale: Tensor, coefficients: Tensor,
                meta: tuple[StepPlan, int, Any, bool, Tensor]) -> Tensor:
        """Returns ``y``, normalized by the step. ``scale`` is ``a``; ``meta`` is the
        plan, the call count, an extra item, whether the step ran its O(C) work on the
        host, and ``y``. On the torch path ``coefficients`` is ``[a, a·invstd]`` and the
        extra item the global count N (a host float on CPU, a tensor on accelerators);
        with host math ``coefficients`` is the (9, C) stats tensor of
        :func:`merge_on_host` (rows 3-4: ``−[a, a·invstd]/N``; rows 6-8 receive
        backward's ``[c', b, c]``) and the extra item ``None``. Backward reads tensors
        only from ``saved_tensors``: a non-reentrant checkpoint swaps those for the
        recomputed forward's."""
        ctx.meta = meta[:4]
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, mean, inv_std, scale, coefficients)
        return meta[4]

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        plan, call, extra, on_host = ctx.meta
        if torch.is_grad_enabled():
            from ._autograd import double_backward_error

            raise double_backward_error(plan.site.layer)
        x, mean, inv_std, scale, coefficients = ctx.saved_tensors
        channels = plan.channels
        # unit weight: the sums do not depend on it, and without one the 2-D kernel builds it
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, plan.ones, None, None, mean, inv_std, True, 0.0, [False, True, True])
        offset = None
        if on_host:  # packed, read and combined on the host (see _host_step)
            # through a cat: sum_dy is also grad_bias, the caller's (see host_copy)
            packed = torch.empty(2 * channels + 2, dtype=torch.float64)
            host = packed.numpy()
            host[...] = torch.cat([sum_dy, sum_dy_xhat, plan.tail_backward]).numpy()
            _comm.reduce_checked_(packed, plan.group_name, plan.site, "backward", call,
                                  x.shape, plan.key_backward, host=host)
            # [c', b] = [Σdy, Σdy·x̂]·(−[a, a·invstd]/N), and c = c' − b·μ, in float64, into
            # the rows 6-8 of the forward's stats
            stats = coefficients.numpy()
            products = host[:2 * channels].reshape(2, channels) * stats[3:5]
            stats[6:8] = products
            stats[8] = products[0] - products[1] * stats[0]
            # (from the saved tensor: a checkpoint's recompute replaces it, not ``extra``)
            c_prime, b, offset = coefficients[6:9].unbind()
        else:
            coeffs = torch.empty((2, channels), dtype=plan.acc, device=x.device)
            packed = torch.cat([sum_dy, sum_dy_xhat, plan.tail_backward]).double()
            _comm.reduce_checked_(packed, plan.group_name, plan.site, "backward", call,
                                  x.shape, plan.key_backward,
                                  host=packed.numpy() if plan.reads else None)
            torch.div(packed[:2 * channels].view(2, channels), -extra, out=coeffs)
            coeffs.mul_(coefficients)
            c_prime, b = coeffs.unbind()
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = input_grad(x, dy, mean, scale, b, c_prime, plan, offset)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            weight_dtype = ctx.weight_dtype
            grad_weight = (sum_dy_xhat if sum_dy_xhat.dtype == weight_dtype
                           else sum_dy_xhat.to(weight_dtype))
        if ctx.needs_input_grad[2]:
            bias_dtype = ctx.bias_dtype
            grad_bias = sum_dy if sum_dy.dtype == bias_dtype else sum_dy.to(bias_dtype)
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None)
