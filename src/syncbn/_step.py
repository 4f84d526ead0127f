"""The lean training step: decided once per signature, then only the kernels the math needs.

Everything that depends only on a layer's settings and the input's signature
(shape, dtype, device, memory format, group, mode) is decided once and cached in a
:class:`StepPlan`: the reduction dims, the local count, the statistics method, the
step keys, the constant tails of the packed buffers. The steady-state step (eager,
no mask, no in-place activation, at least 2 values per channel on this rank) then
runs, per layer (CPU, float32, counted by ``syncbn.cli.kernels``):

forward (17 kernels)::

    num_batches_tracked += 1                                                    1
    s = c·running_mean  (the shift, see shift_from_state)                       1
    d = x − s;  (v, m) = var_mean(d);  pack [n·m, n·(v + m²), n, key] (float64)   4
    all_reduce (2C + 2 float64; on CPU the count and key are read: no kernel)   1
    q = [S₁, S₂]/(N − 1);  q₂ ← q₂ − q₁²·(N − 1)/N (= σ²·N/(N − 1), clamped ≥ 0)  3
    [μ, σ² + eps] = [s, eps] + q·(N − 1)/N;  [invstd, invstd²] = (σ² + eps)^[−½, −1]  2
    R = w·[invstd, invstd²];  running_mean, running_var ← lerp(μ, q₂)            3
    y = (x − μ)·R₁ + β        (torch's inference batch-norm kernel)               1

backward (8 kernels)::

    [Σdy, Σdy·x̂]  (torch's batch-norm backward reduction)                       1
    pack [Σdy, Σdy·x̂, 0, key] (float64);  all_reduce                            3
    [c', b] = −[Σdy, Σdy·x̂]·R/N                                                 2
    dx = (x − μ)·b + c' + R₁·dy   (inference kernel, then a multiply-add)         2

The shift ``s`` is a function of the layer's state alone (:func:`shift_from_state`),
so every rank holds it bitwise alike and a resumed or unpickled layer continues
bitwise; a layer whose state holds no usable mean (its first step, no running
statistics, ``momentum=0``, the Paddle flavour, the functional form) exchanges
one first (:func:`exchange_shift`: one more all-reduce of the same size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _comm, _policy, _stats

SMALL_NUMEL = 1 << 17
"""Up to this many input values (CPU), torch's batch-norm statistics kernel takes the local
moments (one kernel: 43 µs on (4, 64, 8, 8), against 144 µs for ``var_mean``'s Welford
reduction and ~25 µs plus one more dispatch for two sums); above it, and on accelerators,
two plain sums over the shifted input (0.38 ms on (8, 64, 56, 56) against 3.5 ms)."""


@dataclass(frozen=True)
class StepPlan:
    """What one layer's training step does for one input signature (built once, cached)."""

    channels: int
    ndim: int
    dims: tuple[int, ...]
    count: int  # local values per channel
    acc: torch.dtype
    sums: bool  # two plain sums (large inputs) instead of var_mean
    reads: bool  # host reads allowed (see _policy)
    key_forward: int
    key_backward: int
    tail_forward: Tensor  # [1, key] (var_mean) or [n, key] (sums) in the accumulation dtype
    scale_forward: Tensor | None  # float64 [n]*2C + [n, 1]: turns means into sums (var_mean)
    tail_backward: Tensor  # [0, key] in the accumulation dtype (keys < 2**20: exact)
    ones: Tensor  # (C,) acc: the unit variance of the inference kernel
    shift_eps: Tensor  # (2, C) acc: row 0 the step's shift (written each step), row 1 eps
    sixteen_bit: bool

    def shape_c(self) -> list[int]:
        return [1, self.channels, *([1] * (self.ndim - 2))]


_plans: dict[tuple[Any, ...], StepPlan] = {}
_MAX_PLANS = 512


def plan_for(x: Tensor, site: _comm.CallSite, eps: float) -> StepPlan:
    """The cached :class:`StepPlan` of this input signature and layer."""
    signature = (tuple(x.shape), x.dtype, x.device, x.stride(), site, eps,
                 _policy.host_reads(x.device))
    plan = _plans.get(signature)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _build_plan(x, site, eps)
        _plans[signature] = plan
    return plan


def _build_plan(x: Tensor, site: _comm.CallSite, eps: float) -> StepPlan:
    channels, ndim = x.size(1), x.dim()
    count = _stats.local_count(x.shape)
    acc = _stats.acc_dtype(x.dtype)
    reads = _policy.host_reads(x.device)
    sums = not reads or (x.numel() > SMALL_NUMEL and x.is_contiguous())
    key_f = _comm.step_key(site.layer, "forward", channels, site.eps, site.decay)
    key_b = _comm.step_key(site.layer, "backward", channels, site.eps, site.decay)
    tail_f = torch.tensor([float(count) if sums else 1.0, float(key_f)], dtype=acc,
                          device=x.device)
    scale = None
    if not sums:
        scale = torch.full((2 * channels + 2,), float(count), dtype=torch.float64,
                           device=x.device)
        scale[-1] = 1.0
    return StepPlan(
        channels=channels, ndim=ndim, dims=tuple(_stats.reduce_dims(ndim)), count=count,
        acc=acc, sums=sums, reads=reads, key_forward=key_f,
        key_backward=key_b, tail_forward=tail_f, scale_forward=scale,
        tail_backward=torch.tensor([0.0, float(key_b)], dtype=acc, device=x.device),
        ones=torch.ones(channels, dtype=acc, device=x.device),
        shift_eps=torch.full((2, channels), float(eps), dtype=acc, device=x.device),
        sixteen_bit=x.dtype in (torch.float16, torch.bfloat16),
    )


def exchange_shift(x: Tensor, mask: Tensor | None, group_name: str | None,
                   site: _comm.CallSite | None, call: int) -> Tensor:
    """A shift every rank holds alike: the global mean, from one all-reduce of ``2C + 2``
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
                     cumulative: bool, out: Tensor) -> bool:
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
    stay those of the batch, as torch's: checked on the host where reads are allowed
    (CPU: no kernel), else by one ``nan_to_num_``.
    """
    if running_mean is None or steps is None or steps < 2:
        return False
    if cumulative:
        factor = 1.0
    elif decay >= 1.0:
        return False
    else:
        factor = 1.0 / (1.0 - decay ** (steps - 1))
    torch.mul(running_mean, factor, out=out)
    if not _policy.host_reads(out.device) or not _policy.all_finite(out):
        out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return True


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
    update_running: bool,
) -> Tensor:
    """The steady-state synchronized training step (see the module docstring)."""
    plan = plan_for(x, site, eps)
    shift_eps = plan.shift_eps
    s = shift_eps[0]
    with torch.no_grad():
        if not shift_from_state(running_mean, steps, decay, cumulative, s):
            s.copy_(exchange_shift(x, None, group_name, site, call))
        xd = x.detach()
        tail, key = _tail(plan, running_mean)
        # into an output laid out like the input: a broadcast subtraction on channels_last
        # otherwise takes torch's slow path (1.9 ms against 0.2 ms on (8, 64, 56, 56))
        d = torch.sub(xd, s.view(plan.shape_c()), out=torch.empty_like(xd, dtype=plan.acc))
        packed = None
        if not plan.sums:  # small CPU inputs: the moments of the deviations in one kernel
            if plan.ndim > 2:  # torch's batch-norm statistics: Σ/n (an inf stays inf), and
                # the biased variance, accumulated in float64 on CPU
                mean_d, var = torch.batch_norm_update_stats(d, None, None, 0.0)
            else:  # (N, C): var_mean is one kernel there (the statistics kernel two)
                var, mean_d = torch.var_mean(d, 0, correction=0)
            if plan.ndim > 2 or _policy.all_finite(mean_d):  # Welford's mean turns inf to NaN
                second = torch.addcmul(var, mean_d, mean_d)  # Σd²/n
                assert plan.scale_forward is not None
                # [n·m, n·(v + m²), n, key] in float64 (the multiply promotes)
                packed = torch.mul(torch.cat([mean_d, second, tail]), plan.scale_forward)
        if packed is None:  # two plain reductions of the deviations
            s1 = d.sum(plan.dims)
            s2 = d.square_().sum(plan.dims)
            if not plan.sums:
                tail = tail * tail.new_tensor([float(plan.count), 1.0])
            packed = torch.cat([s1, s2, tail]).double()
        counts = _comm.reduce_checked_(packed, group_name, site, "forward", call, x.shape, key)
        merged = merge(packed, shift_eps, counts, plan.acc, unbiased_var)
        powers = merged.inverse_powers  # [invstd, invstd²]
        scales = powers if weight is None else powers * weight.detach()
        if update_running:
            update_running_(running_mean, running_var, merged, decay,
                            num_batches_tracked if cumulative else None, plan.acc)
        mean = merged.mean
    out: Tensor = LeanBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, mean, powers[0], scales, plan, group_name, site, call,
        merged.total)
    return out


def _tail(plan: StepPlan, running_mean: Tensor | None) -> tuple[Tensor, int]:
    """The forward tail and key; on CPU the running mean's CRC is folded into the key
    (:func:`_comm.fold_state`, no kernel), so ranks whose running statistics differ are
    out of step."""
    if not plan.reads or running_mean is None:
        return plan.tail_forward, plan.key_forward
    key = _comm.fold_state(plan.key_forward, running_mean)
    first = float(plan.count) if plan.sums else 1.0
    return torch.tensor([first, float(key)], dtype=plan.acc), key


@dataclass(frozen=True)
class Merged:
    """Global statistics in the accumulation dtype, from the summed packing."""

    mean: Tensor  # μ
    inverse_powers: Tensor  # (2, C): [(σ² + eps)^(−1/2), (σ² + eps)^(−1)], σ² biased
    batch_var: Tensor  # the variance the running variance takes (unbiased or biased)
    total: float | Tensor  # N: a host float (CPU) or a (1,) tensor (accelerators)
    update: float | Tensor  # 1.0/0.0 or a tensor: whether the running statistics move (N > 1)

    @property
    def inv_std(self) -> Tensor:
        return self.inverse_powers[0]


def merge(packed: Tensor, shift_eps: Tensor, counts: tuple[float, float] | None,
          acc: torch.dtype, unbiased_var: bool) -> Merged:
    """μ, ``(σ² + eps)^[−½, −1]`` and the running-variance target from ``[S₁, S₂, N, key]``
    summed over the ranks (``S₁ = Σ(x − s)``, ``S₂ = Σ(x − s)²``); ``shift_eps`` is
    ``[s, eps]`` (2, C).

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
    if counts is not None and counts[0] >= 2:
        count = counts[0]
        ratio = (count - 1.0) / count
        torch.div(sums, count - 1.0, out=q)
        q[1].addcmul_(q[0], q[0], value=-ratio).clamp_min_(0.0)
        both = torch.add(shift_eps, q, alpha=ratio)  # [μ, σ² + eps]
        batch_var = q[1] if unbiased_var else q[1] * ratio
        return Merged(both[0], _inverse_powers(both[1]), batch_var, count, 1.0)
    update: float | Tensor
    if counts is not None:
        total_host = counts[0]
        divisor: float | Tensor = max(total_host, 1.0)
        torch.div(sums, divisor, out=q)
        update = 0.0
        total: float | Tensor = total_host
    else:
        total_t = packed[2 * channels:2 * channels + 1]
        divisor = total_t.clamp_min(1.0)
        torch.div(sums, divisor, out=q)
        update = (total_t > 1).to(acc)
        total = total_t.to(acc)
    q[1].addcmul_(q[0], q[0], value=-1.0).clamp_min_(0.0)  # biased σ²
    both = shift_eps + q  # [μ, σ² + eps]
    batch_var = q[1]
    if unbiased_var and isinstance(divisor, Tensor):
        batch_var = q[1] * (divisor / (divisor - 1.0).clamp_min(1.0)).to(acc)
    return Merged(both[0], _inverse_powers(both[1]), batch_var, total, update)


_EXPONENTS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _inverse_powers(var_eps: Tensor) -> Tensor:
    """``[(σ² + eps)^(−1/2), (σ² + eps)^(−1)]`` as one (2, C) tensor, in one kernel."""
    if torch.compiler.is_compiling():  # no global tensor in a graph: a constant of its own
        fresh = torch.tensor([[-0.5], [-1.0]], dtype=var_eps.dtype, device=var_eps.device)
        return torch.pow(var_eps.unsqueeze(0), fresh)
    where = (var_eps.dtype, var_eps.device)
    cached = _EXPONENTS.get(where)
    if cached is None:
        cached = torch.tensor([[-0.5], [-1.0]], dtype=var_eps.dtype, device=var_eps.device)
        _EXPONENTS[where] = cached
    return torch.pow(var_eps.unsqueeze(0), cached)


def update_running_(running_mean: Tensor | None, running_var: Tensor | None, merged: Merged,
                    decay: float, num_batches_tracked: Tensor | None, acc: torch.dtype) -> None:
    """``running ← (1 − w)·running + w·batch`` with ``w = 1 − decay`` (or
    ``1/num_batches_tracked`` for the cumulative average), where ``N > 1``.

    Where host reads are allowed and every value involved is finite (checked on the
    host, no kernel), one ``lerp_`` per buffer, equal to the blend up to rounding;
    otherwise the blend itself, two ops per buffer, which carries inf and NaN exactly
    as torch's BatchNorm does (``lerp`` turns ``inf`` into NaN).
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
    lerp = (isinstance(weight, float) and _policy.host_reads(merged.mean.device)
            and _policy.all_finite(*[t for pair in pairs for t in pair]))
    for running, batch in pairs:
        if lerp:
            running.lerp_(batch.to(running.dtype), weight)
        elif isinstance(weight, float):
            running.mul_(1.0 - weight).add_(batch.to(running.dtype), alpha=weight)
        else:
            step = weight.to(running.dtype)
            running.mul_(1.0 - step).addcmul_(batch.to(running.dtype), step)


def _weight_as(weight: float | Tensor, like: Tensor) -> float | Tensor:
    return weight if isinstance(weight, float) else weight.to(like.dtype)


def input_grad(x: Tensor, dy: Tensor, mean: Tensor, a: Tensor, b: Tensor, c_prime: Tensor,
               plan: StepPlan) -> Tensor:
    """``dx = a·dy + b·(x − μ) + c'`` per channel, in ``x``'s dtype and memory format.

    float32/float64: torch's inference batch-norm kernel gives ``(x − μ)·b + c'``
    (unit variance, eps 0), then one multiply-add. 16-bit inputs: the whole sum in
    float32, rounded once (``a·dy`` and ``b·x + c`` rounded apart cancel badly when
    ``dy`` is mostly a per-channel constant plus a multiple of x̂).
    """
    shape = plan.shape_c()
    if plan.sixteen_bit:
        c = torch.addcmul(c_prime, b, mean, value=-1.0)
        out = torch.addcmul(c.view(shape), x, b.view(shape))
        return out.addcmul_(dy, a.view(shape)).to(x.dtype)
    if not x.is_contiguous():  # channels_last: a broadcast multiply-add into x's layout is
        # faster than the inference kernel there (0.49 against 0.72 ms for dx, (8, 64, 56, 56))
        c = torch.addcmul(c_prime, b, mean, value=-1.0)
        out = torch.addcmul(c.view(shape), x, b.view(shape), out=torch.empty_like(x))
        return out.addcmul_(dy, a.view(shape))
    out = torch.batch_norm(x, b, c_prime, mean, plan.ones, False, 0.0, 0.0, False)
    return out.addcmul_(dy, a.view(shape))


class LeanBatchNormFunction(torch.autograd.Function):
    """``y = (x − μ)·w·invstd + β`` with global μ and invstd; exact gradients through them.

    ``scales`` holds ``[a, a·invstd]`` with ``a = w·invstd``; backward all-reduces
    ``[Σdy, Σdy·x̂]`` (``2C + 2`` float64 with the tail) and applies
    ``dx = a·dy + b·(x − μ) + c'`` with ``[c', b] = −[Σdy, Σdy·x̂]·[a, a·invstd]/N``,
    the expansion of ``dx = a·(dy − Σdy/N − x̂·Σ(dy·x̂)/N)`` (Ioffe & Szegedy 2015, §3;
    see ``_stats.input_grad_coefficients``). ``grad_weight = Σdy·x̂`` and
    ``grad_bias = Σdy`` stay local (DDP sums them).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                mean: Tensor, inv_std: Tensor, scales: Tensor, plan: StepPlan,
                group_name: str, site: _comm.CallSite, call: int,
                total: float | Tensor) -> Tensor:
        ctx.plan, ctx.group_name, ctx.site, ctx.call = plan, group_name, site, call
        ctx.total = total  # the forward's global count: a host float (CPU) or a tensor
        ctx.shape = tuple(x.shape)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, mean, inv_std, scales)
        if bias is not None and bias.dtype != plan.acc:  # a 16-bit layer: the kernel wants acc
            bias = bias.to(plan.acc)
        return torch.batch_norm(x, scales[0], bias, mean, plan.ones, False, 0.0, 0.0, False)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        site: _comm.CallSite = ctx.site
        if torch.is_grad_enabled():
            from ._autograd import double_backward_error

            raise double_backward_error(site.layer)
        x, mean, inv_std, scales = ctx.saved_tensors
        plan: StepPlan = ctx.plan
        channels = plan.channels
        # unit weight: the sums do not depend on it, and without one the 2-D kernel builds it
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, plan.ones, None, None, mean, inv_std, True, 0.0, [False, True, True])
        packed = torch.cat([sum_dy, sum_dy_xhat, plan.tail_backward]).double()
        _comm.reduce_checked_(packed, ctx.group_name, site, "backward", ctx.call, ctx.shape,
                              plan.key_backward)
        sums = packed[:2 * channels].view(2, channels)
        coeffs = torch.empty((2, channels), dtype=plan.acc, device=x.device)
        total = ctx.total
        if isinstance(total, float):
            torch.mul(sums, -1.0 / total, out=coeffs)
        else:
            torch.div(sums, -total, out=coeffs)
        coeffs.mul_(scales)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = input_grad(x, dy, mean, scales[0], coeffs[1], coeffs[0], plan)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return (grad_input, grad_weight, grad_bias, *(None,) * 8)
