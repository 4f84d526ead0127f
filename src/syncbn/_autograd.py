"""The autograd Function of training-mode batch normalization over a process group.

Forward (one collective)::

    local moments (Σx, m2)  →  all_reduce [Σx, Σx², count]  →  μ, σ² of the global batch
    y = w·(x − μ)·invstd + β,   invstd = 1/√(σ² + eps)

Backward (one collective)::

    local [Σdy, Σdy·x̂]  →  all_reduce  →  dx = a·dy + b·x + c   (see input_grad_coefficients)
    grad_weight = local Σdy·x̂,  grad_bias = local Σdy   (DDP sums them, as for torch)

The normalization and the gradient reductions use torch's own batch-norm
kernels with the *global* statistics plugged in, so the layout (channels_last
included) is handled by the fastest kernel torch has for it. Only the input and
O(C) values are saved for backward.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from . import _comm, _stats
from ._activation import Activation

SingleValuePolicy = Literal["raise", "identity"]
"""What a training step does when the global batch has one value per channel:
``"raise"`` torch's error (Torch), ``"identity"`` return the input, stats untouched (Paddle)."""


def single_value_error(count: int) -> ValueError:
    """torch's error for a training batch with one value per channel."""
    return ValueError(
        f"Expected more than 1 value per channel when training, got input size {count}"
    )


def is_recomputing() -> bool:
    """True while autograd runs a backward pass: a forward now is a checkpoint's recompute.

    ``torch.utils.checkpoint`` (reentrant or not) runs the forward again inside
    backward; the batch statistics must be recomputed (with their collective, on
    every rank alike) but the running statistics must not move a second time.
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _scale_shift(inv_std: Tensor, weight: Tensor | None,
                 bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(w·invstd, β)`` in the accumulation dtype: the inference kernel's weight and bias."""
    scale = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
    return scale, None if bias is None else bias.to(inv_std.dtype)


def normalize(x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None,
              bias: Tensor | None) -> Tensor:
    """``w·(x − μ)·invstd + β`` with per-channel ``μ``, ``invstd`` in the accumulation dtype.

    Runs torch's inference batch-norm kernel with ``var = 1``, ``eps = 0`` and the
    scale ``w·invstd``: it keeps the input's dtype and memory format.
    """
    scale, shift = _scale_shift(inv_std, weight, bias)
    return torch.batch_norm(x, scale, shift, mean, torch.ones_like(inv_std), False, 0.0, 0.0,
                            False)


def normalize_(x: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None,
               bias: Tensor | None) -> Tensor:
    """:func:`normalize` written into ``x``: the same kernel, so bitwise the same numbers.

    The kernel is elementwise, so its ``out=`` may alias the input.
    """
    scale, shift = _scale_shift(inv_std, weight, bias)
    unused = inv_std.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        x, scale, shift, mean, torch.ones_like(inv_std), False, 0.0, 0.0,
        out=x, save_mean=unused, save_invstd=unused.clone(),
    )
    return x


def affine_map(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale·x + shift`` per channel, in ``x``'s dtype and memory format."""
    zeros = torch.zeros_like(scale)
    ones = torch.ones_like(scale)
    return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)


def input_grad(x: Tensor, dz: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a·dz + b·x + c`` per channel, in ``x``'s dtype and memory format.

    One affine pass over ``x`` plus a fused multiply-add of ``dz``; for 16-bit
    inputs the mixed-dtype multiply-add is torch's slow path (2.3–8.5 ms against
    1.3 ms on (8, 64, 56, 56) bfloat16), so ``a·dz`` is a second affine pass.
    """
    out = affine_map(x, b, c)
    if x.dtype in (torch.float16, torch.bfloat16):
        return out.add_(affine_map(dz, a, torch.zeros_like(a)))
    return out.addcmul_(dz, _stats.channel_view(a, x.dim()))


def local_grad_sums(dy: Tensor, x: Tensor, mean: Tensor, inv_std: Tensor) -> _stats.GradSums:
    """``Σdy`` and ``Σdy·x̂`` over this rank's shard, from torch's backward reduction kernel."""
    if x.numel() == 0:
        zeros = torch.zeros_like(mean)
        return _stats.GradSums(zeros, zeros.clone())
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, None, None, mean, inv_std, True, 0.0, [False, True, True]
    )
    return _stats.GradSums(sum_dy.to(mean.dtype), sum_dy_xhat.to(mean.dtype))


def inplace_blocker(x: Tensor, weight: Tensor | None, activation: Activation) -> str | None:
    """Why the in-place mode cannot run on ``x`` (with the fix), or ``None`` when it can.

    It needs an invertible activation, ``weight ≠ 0`` (to recover x̂ from the
    output), and an input that autograd does not need: not a leaf that requires
    grad, not saved by the op that produced it. (A *later* consumer of ``x`` that
    saved it is caught by autograd's version counter at backward.)
    """
    if not activation.invertible:
        return (
            f"inplace=True needs an invertible activation to recompute the normalized "
            f"values from the output, got {activation.name!r} (param {activation.param:g}); "
            "use 'identity' or 'leaky_relu' with a slope > 0 (elu saturates at -alpha, "
            "where the input is lost), or inplace=False"
        )
    if x.requires_grad and x.is_leaf:
        return ("inplace=True would overwrite the input, but it is a leaf tensor that requires "
                "grad; pass the output of another layer, or use inplace=False")
    storage = x.untyped_storage().data_ptr()
    producers = [x.grad_fn]
    base = x._base
    if base is not None:  # a view: the op that made its base may have saved the base
        producers.append(base.grad_fn)
    for grad_fn in producers:
        if grad_fn is None:
            continue
        for name in dir(grad_fn):
            if not name.startswith("_saved_"):
                continue
            saved = getattr(grad_fn, name, None)
            if isinstance(saved, Tensor) and saved.numel() > 0 and (
                saved.untyped_storage().data_ptr() == storage
            ):
                return (
                    f"inplace=True would overwrite the input, but autograd still needs it "
                    f"(saved by {type(grad_fn).__name__} for its backward); put the layer "
                    "after an op that does not save its output (e.g. a convolution), or use "
                    "inplace=False"
                )
    if weight is not None and bool((weight == 0).any()):
        return ("inplace=True recovers x̂ = (y − bias)/weight, but some weight entries are 0; "
                "use inplace=False for this layer (or keep its weight away from 0)")
    return None


def check_inplace(x: Tensor, weight: Tensor | None, activation: Activation) -> None:
    """Raise ``ValueError`` with :func:`inplace_blocker`'s reason, if any."""
    reason = inplace_blocker(x, weight, activation)
    if reason is not None:
        raise ValueError(reason)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics of the whole group; exact gradients through them.

    With ``activation`` set (the in-place mode), the input's storage receives
    ``y = f(w·x̂ + β)`` and only ``y`` is saved; backward recomputes ``z`` and
    ``x̂`` from it (see :mod:`syncbn._activation`). The caller has checked that
    mode with :func:`inplace_blocker` / :func:`check_inplace` (before counting
    the step), so it is not checked again here.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        decay: float,
        unbiased_var: bool,
        process_group: _comm.ProcessGroup | None,
        site: _comm.CallSite | None,
        single_value: SingleValuePolicy,
        inplace_activation: Activation | None,
    ) -> Tensor:
        moments = _stats.local_moments(x)
        packed = _stats.pack_local_moments(moments)
        if process_group is not None:
            assert site is not None, "a group needs a CallSite"
            packed = _comm.reduce_forward(packed, process_group, site)  # 2C + 1, + step key
        stats = _stats.merge_global_moments(packed)

        ctx.process_group = process_group
        ctx.site = site
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.identity = False
        ctx.activation = inplace_activation
        # A global count of 1 is only possible where the local count is <= 1, so
        # the host read (a device sync on accelerators) is confined to that case.
        if moments.count <= 1 and int(stats.count.item()) == 1:
            if single_value == "raise":
                raise single_value_error(1)
            ctx.identity = True
            if inplace_activation is not None:  # y = f(x): keep y for f' in backward
                inplace_activation.apply_(x)
                ctx.mark_dirty(x)
                ctx.save_for_backward(x)
                return x
            return x.clone()

        if not is_recomputing():  # a checkpoint's recompute must not update them twice
            _stats.update_running_stats(running_mean, running_var, stats, decay, unbiased_var)
        acc = _stats.acc_dtype(x.dtype)
        mean = stats.mean.to(acc)
        inv_std = _stats.invstd(stats.var, eps).to(acc)
        if inplace_activation is None:
            ctx.save_for_backward(x, weight, bias, mean, inv_std, stats.count)
            return normalize(x, mean, inv_std, weight, bias)
        normalize_(x, mean, inv_std, weight, bias)
        inplace_activation.apply_(x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, mean, inv_std, stats.count)
        return x

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        nones = (None,) * 9
        if ctx.identity:
            if ctx.activation is not None:
                (y,) = ctx.saved_tensors
                dy = ctx.activation.grad_through(dy, y)
            return (dy, None, None, *nones)
        saved, weight, bias, mean, inv_std, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        activation: Activation | None = ctx.activation
        if activation is None:  # saved is the input x
            x, dz = saved, dy
            sums = local_grad_sums(dz, x, mean, inv_std)
        else:  # saved is the output y = f(z), z = w·x̂ + β
            dz = activation.grad_through(dy, saved)
            x = activation.inverse(saved)  # z, standing in for x below
            shift = torch.zeros_like(mean) if bias is None else bias.to(mean.dtype)
            scale = torch.ones_like(mean) if weight is None else weight.to(mean.dtype)
            sums = local_grad_sums(dz, x, shift, scale.reciprocal())  # Σdz·(z − β)/w = Σdz·x̂
        grad_weight = sums.sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sums.sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_input = None
        if need_input:
            packed = torch.cat([sums.sum_dy, sums.sum_dy_xhat]).double()  # C, C -> 2C
            if ctx.process_group is not None:
                packed = _comm.reduce_backward(packed, ctx.process_group, ctx.site)
            global_sums = _stats.GradSums(*packed.to(mean.dtype).chunk(2))
            if activation is None:
                a, b, c = _stats.input_grad_coefficients(global_sums, count, mean, inv_std,
                                                         weight)
            else:
                a, b, c = _stats.input_grad_coefficients_from_output(
                    global_sums, count, inv_std, weight, bias)
            grad_input = input_grad(x, dz, a, b, c)
        return (grad_input, grad_weight, grad_bias, *nones)
