"""The autograd Function of training-mode batch normalization over a process group.

Forward (one collective)::

    local moments (Σx, m2)  →  sum over ranks [Σx, Σx², count]  →  μ, σ² of the global batch
    y = w·(x − μ)·invstd + β,   invstd = 1/√(σ² + eps)

Backward (one collective)::

    local [Σdy, Σdy·x̂]  →  sum over ranks  →  dx = a·dy + b·x + c   (input_grad_coefficients)
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

from . import _comm, _ops, _policy, _stats
from ._activation import Activation

SingleValuePolicy = Literal["raise", "identity"]
"""What a training step does when the global batch has one value per channel:
``"raise"`` torch's error (Torch), ``"identity"`` return the input, stats untouched (Paddle)."""


single_value_error = _comm.single_value_error


def _recomputing_now() -> bool:
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def is_recomputing() -> bool:
    """True while autograd runs a backward pass: a forward now is a checkpoint's recompute.

    ``torch.utils.checkpoint`` (reentrant or not) runs the forward again inside
    backward; the batch statistics must be recomputed (with their collective, on
    every rank alike) but the running statistics must not move a second time.
    Compiled code is never a recompute here: inside ``torch.compile`` a
    checkpoint's recompute is part of the backward graph, which does not re-run
    the state updates (those are the operators below, applied once per step).
    """
    if torch.compiler.is_compiling():
        return False
    return _recomputing_now()


def runs_op_body_directly(*tensors: Tensor | None) -> bool:
    """True where an operator's body may run as a plain Python call: eager code, no
    torch dispatch mode active (no tracing, no fake tensors), plain tensors only.

    Dispatching one of syncbn's operators costs a few µs a call on CPU (see ``_ops``),
    as much as an O(C) kernel; the body computes the same thing either way. Compiled
    and traced code always calls the operator (it must appear in the graph).
    """
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) is Tensor for t in tensors))


def _count_step(num_batches_tracked: Tensor) -> None:
    if not _recomputing_now():
        num_batches_tracked.add_(1)


@_ops.operator("count_step_", mutates_args=("num_batches_tracked",))
def _count_step_op(num_batches_tracked: Tensor) -> None:
    """``num_batches_tracked += 1``, except inside a checkpoint's recompute (eager or compiled)."""
    _count_step(num_batches_tracked)


@_ops.fake("count_step_")
def _(num_batches_tracked: Tensor) -> None:
    return None


def count_step_(num_batches_tracked: Tensor) -> None:
    """``num_batches_tracked += 1``, except inside a checkpoint's recompute: the operator
    ``syncbn::count_step_`` in compiled code, its body in eager code
    (:func:`runs_op_body_directly`)."""
    if runs_op_body_directly(num_batches_tracked):
        _count_step(num_batches_tracked)
    else:
        _count_step_op(num_batches_tracked)


def update_running_stats_(
    running_mean: Tensor | None, running_var: Tensor | None,
    mean: Tensor, batch_var: Tensor, count: Tensor, decay: float,
    num_batches_tracked: Tensor | None,
) -> None:
    """The running statistics after a compiled or traced step (:func:`_step.update_running_`).

    The mutating operator ``syncbn::update_running_stats_``, so that it runs once
    per step in compiled code too; it skips itself inside a checkpoint's recompute.
    ``count`` is the global count (a (1,) float64 tensor): no update where it is ≤ 1.
    """
    _update_running_stats_op(running_mean, running_var, mean, batch_var, count, decay,
                             num_batches_tracked)


@_ops.operator("update_running_stats_", mutates_args=("running_mean", "running_var"))
def _update_running_stats_op(
    running_mean: Tensor | None, running_var: Tensor | None,
    mean: Tensor, batch_var: Tensor, count: Tensor, decay: float,
    num_batches_tracked: Tensor | None,
) -> None:
    """See :func:`update_running_stats_`."""
    if _recomputing_now():
        return
    from . import _step

    if _policy.host_reads(count.device):  # CPU: N read on the host, a float weight (2 ops)
        total = float(count)
        merged = _step.Merged(mean, mean, batch_var, total, 1.0 if total > 1.0 else 0.0)
    else:  # the gate and the weight stay on the device
        merged = _step.Merged(mean, mean, batch_var, count.to(mean.dtype),
                              (count > 1).to(mean.dtype))
    _step.update_running_(running_mean, running_var, merged, decay, num_batches_tracked,
                          mean.dtype)


@_ops.fake("update_running_stats_")
def _(running_mean: Tensor | None, running_var: Tensor | None,
      mean: Tensor, batch_var: Tensor, count: Tensor, decay: float,
      num_batches_tracked: Tensor | None) -> None:
    return None


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


def input_grad(x: Tensor, dz: Tensor, a: Tensor, b: Tensor, c: Tensor,
               mask: Tensor | None = None) -> Tensor:
    """``a·dz + b·x + c`` per channel (``a·dz + m·(b·x + c)`` with a mask), in ``x``'s
    dtype and memory format.

    One affine pass over ``x`` plus a fused multiply-add of ``dz``; 16-bit inputs
    compute the whole sum in float32 and round once (``a·dz`` and ``b·x + c``
    rounded apart cancel when ``dz`` is mostly a per-channel constant plus a multiple
    of x̂). A mask costs one more elementwise pass. The affine pass is torch's inference
    batch-norm kernel, except for float32/float64 inputs in another layout than
    N-C-spatial (channels_last), where a broadcast ``c + b·x`` into an output of
    the input's layout is faster (2.5 against 3.0 ms for the whole of ``dx`` on
    (8, 64, 56, 56) channels_last, one thread) and gives the same bits (compiled
    code keeps the kernel: dynamo refuses a non-contiguous ``out=``, and inductor
    fuses the passes anyway).
    """
    ndim = x.dim()
    if x.dtype in (torch.float16, torch.bfloat16):  # in float32, rounded once
        out = torch.addcmul(_stats.channel_view(c, ndim), x, _stats.channel_view(b, ndim))
        if mask is not None:
            out = torch.where(mask.unsqueeze(1), out, 0)
        return out.addcmul_(dz, _stats.channel_view(a, ndim)).to(x.dtype)
    if x.is_contiguous() or x.dtype != b.dtype or torch.compiler.is_compiling():
        out = affine_map(x, b, c)
    else:
        out = torch.addcmul(_stats.channel_view(c, ndim), x, _stats.channel_view(b, ndim),
                            out=torch.empty_like(x))
    if mask is not None:  # selected, not multiplied: NaN·0 is NaN
        out = torch.where(mask.unsqueeze(1), out, 0)
    return out.addcmul_(dz, _stats.channel_view(a, ndim))


def local_grad_sums(dy: Tensor, x: Tensor, mean: Tensor, inv_std: Tensor) -> _stats.GradSums:
    """``Σdy`` and ``Σdy·x̂`` over this rank's shard, from torch's backward reduction kernel."""
    if x.numel() == 0:  # zeros, but computed from dy: compiled code keeps this in backward
        zeros = dy.sum(_stats.reduce_dims(dy.dim()), dtype=mean.dtype)
        return _stats.GradSums(zeros, zeros.clone())
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, None, None, mean, inv_std, True, 0.0, [False, True, True]
    )
    return _stats.GradSums(sum_dy.to(mean.dtype), sum_dy_xhat.to(mean.dtype))


INPLACE_WEIGHT_FACTOR = 1000.0
"""In-place mode: every channel needs ``|w| ≥ INPLACE_WEIGHT_FACTOR·ε·|β|`` (``ε`` the input
dtype's machine epsilon), so x̂ = (z − β)/w, recovered from the stored output, is within
~1e-3 of exact (its error is about ε·(|x̂| + |β|/|w|))."""


def inplace_blocker(x: Tensor, activation: Activation) -> str | None:
    """Why the in-place mode cannot run on ``x`` (with the fix), or ``None`` when it can.

    It needs an invertible activation and an input that autograd does not need:
    not a leaf that requires grad, not saved by the op that produced it (checked
    in eager mode; compiled code functionalizes the overwrite, and a *later*
    consumer of ``x`` that saved it is caught by autograd's version counter at
    backward). The weights are checked by :func:`checked_inplace_weight`; a
    leaky_relu slope must be at least the dtype's smallest normal number (below it,
    ``y = slope·z`` is subnormal or 0 and ``z = y/slope`` is lost, as a weight near 0
    loses x̂).
    """
    if activation.name == "leaky_relu" and x.is_floating_point():
        tiny = torch.finfo(x.dtype).tiny
        if 0 < activation.param < tiny:
            dtype = str(x.dtype).replace("torch.", "")
            return (
                f"inplace=True recovers z = y/slope from the output, but the leaky_relu slope "
                f"{activation.param:.3g} is below the smallest normal {dtype} number "
                f"{tiny:.3g}: y = slope·z is then subnormal or 0, so z (and the input "
                f"gradient) would be off by up to ~{min(1.0, tiny / activation.param * 1e-3):.2g}"
                f" relative; use a slope ≥ {tiny:.3g} (e.g. 0.01), inplace=False for this "
                "layer, or a wider dtype"
            )
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
    if torch.compiler.is_compiling():
        return None
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
    return None


def _inplace_weight_bad(weight: Tensor, bias: Tensor | None, dtype: torch.dtype
                        ) -> tuple[Tensor, Tensor, Tensor, float]:
    eps = torch.finfo(dtype).eps
    w = weight.detach().double().abs()
    b = torch.zeros_like(w) if bias is None else bias.detach().double().abs()
    return (w == 0) | (w < INPLACE_WEIGHT_FACTOR * eps * b), w, b, eps


def inplace_weight_ok(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether every channel meets the in-place bound (a host read; for eager fallbacks)."""
    if weight is None:
        return True
    return not bool(_inplace_weight_bad(weight, bias, x.dtype)[0].any())


@torch.library.custom_op("syncbn::checked_inplace_weight", mutates_args=())
def _checked_inplace_weight(weight: Tensor, bias: Tensor | None, dtype: str, layer: str
                            ) -> Tensor:
    """``weight`` (a copy) after checking the in-place mode's bound; raises ``ValueError``."""
    bad, w, b, eps = _inplace_weight_bad(weight, bias, getattr(torch, dtype))
    if bool(bad.any()):
        channel = int(bad.nonzero()[0, 0])
        if float(w[channel]) == 0:
            raise ValueError(
                f"{_comm.layer_label(layer)}: inplace=True recovers x̂ = (y − bias)/weight "
                f"from the output, but channel {channel} has weight 0, so x̂ is lost; use "
                "inplace=False for this layer (or keep its weight away from 0)"
            )
        raise ValueError(
            f"{_comm.layer_label(layer)}: inplace=True recovers x̂ = (y − bias)/weight from the "
            f"output, but channel {channel} has weight {float(weight[channel]):.3g} and bias "
            f"{0.0 if bias is None else float(bias[channel]):.3g}: with {dtype} outputs x̂ "
            f"would be off by about ε·|bias|/|weight| = "
            f"{eps * float(b[channel]) / max(float(w[channel]), 1e-300):.2g} (the mode needs "
            f"|weight| ≥ {INPLACE_WEIGHT_FACTOR:g}·ε·|bias| and weight ≠ 0, ε = {eps:.3g}); "
            "use inplace=False for this layer, or a wider dtype"
        )
    return weight.clone()


@_checked_inplace_weight.register_fake
def _(weight: Tensor, bias: Tensor | None, dtype: str, layer: str) -> Tensor:
    return torch.empty_like(weight)


def _pass_grad_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    return None


def _pass_grad(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
    return grad, None, None, None


_checked_inplace_weight.register_autograd(_pass_grad, setup_context=_pass_grad_setup)


def check_inplace(x: Tensor, weight: Tensor | None, bias: Tensor | None, activation: Activation,
                  layer: str) -> Tensor | None:
    """Raise ``ValueError`` with :func:`inplace_blocker`'s reason, if any; returns the weight
    to use (checked against the bound of :data:`INPLACE_WEIGHT_FACTOR`, every step)."""
    reason = inplace_blocker(x, activation)
    if reason is not None:
        raise ValueError(reason)
    if weight is None:
        return None
    checked: Tensor = _checked_inplace_weight(weight, bias,
                                              str(x.dtype).replace("torch.", ""), layer)
    return checked


def _unit_where(ident: Tensor | None, value: Tensor, unit: float) -> Tensor:
    """``value``, or ``unit`` where the global batch has one value (Paddle's identity)."""
    if ident is None:
        return value
    return torch.where(ident, torch.full_like(value, unit), value)


def double_backward_error(layer: str) -> RuntimeError:
    """Why a backward with ``create_graph=True`` through a synchronized layer is refused."""
    return RuntimeError(
        f"{_comm.layer_label(layer)}: double backward (create_graph=True, e.g. a gradient "
        "penalty) through synchronized batch statistics is not supported: its backward "
        "pass is not differentiable across ranks. Compute the penalty through a layer in "
        "eval mode (running statistics), or use torch.nn.BatchNorm for that model"
    )


def global_moments(
    x: Tensor,
    mask: Tensor | None,
    shift: Tensor | None,
    group_name: str | None,
    site: _comm.CallSite | None,
    call: int,
    single_value: SingleValuePolicy,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The summed packing of the global batch (one collective), and Paddle's one-value flag.

    Local moments about ``shift``, one sum over ranks of ``2C + 2`` float64 values
    when ``group_name`` is given (else this rank's packing); the caller merges
    (``_step.merge``, the same code on every rank whatever its local path).
    Computed without autograd: the Function's backward differentiates through
    μ and σ² analytically. The flag (``ident``, a bool tensor) is returned only
    where the global count may be 1 and the policy is ``"identity"``.
    """
    with torch.no_grad():
        moments = _stats.local_moments(x.detach(), mask)
        packed = _stats.pack_local_moments(moments, shift)
        # a global count of 1 is only possible where the local count is <= 1 (a host int)
        few = mask is None and isinstance(moments.count, int) and moments.count <= 1
        if group_name is not None:
            assert site is not None, "a group needs a CallSite"
            packed = _comm.all_reduce_checked(  # C, C, 1, key -> 2C + 2 float64
                packed, group_name, site, "forward", call, x.shape,
                single_value_check=few and single_value == "raise", state=state)
        elif few and single_value == "raise" and moments.count == 1:
            raise single_value_error(1)
    channels = x.size(1)
    ident = None
    if few and single_value == "identity":
        ident = packed[2 * channels:2 * channels + 1] == 1
    return packed, ident


class SyncBatchNormFunction(torch.autograd.Function):
    """Normalization with given global statistics; exact gradients through them.

    The inputs ``mean``/``inv_std`` (accumulation dtype) and ``count`` come from
    :func:`global_moments`; backward differentiates through them analytically
    (see ``_stats.input_grad_coefficients``), with one collective of the
    gradient sums when ``group_name`` is given.

    With ``activation`` set (the in-place mode), the input's storage receives
    ``y = f(w·x̂ + β)`` and only ``y`` is saved; backward recomputes ``z`` and
    ``x̂`` from it (see :mod:`syncbn._activation`). The caller has checked that
    mode with :func:`inplace_blocker` / :func:`check_inplace` (before counting
    the step), so it is not checked again here.

    A ``mask`` (bool, the input's shape without dim 1) restricted the statistics
    to its True positions; every position is normalized with them, and
    ``dx = a·dy + m·(b·x + c)``: the statistics depend on valid positions only.
    ``ident`` (Paddle's one-value case) makes the layer the identity where True.

    The backward collective runs whenever backward runs, even where this rank
    needs no input gradient, so ranks that differ in ``requires_grad`` still
    pair their collectives and every input gradient is exact.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mask: Tensor | None,
        mean: Tensor,
        inv_std: Tensor,
        count: Tensor,
        ident: Tensor | None,
        call: int,
        group_name: str | None,
        site: _comm.CallSite | None,
        inplace_activation: Activation | None,
    ) -> Tensor:
        if ident is not None:  # y = x exactly: μ = 0, invstd = 1, w = 1, β = 0
            mean = _unit_where(ident, mean, 0.0)
            inv_std = _unit_where(ident, inv_std, 1.0)
            weight = None if weight is None else _unit_where(ident, weight, 1.0)
            bias = None if bias is None else _unit_where(ident, bias, 0.0)
        ctx.group_name = group_name
        ctx.site = site
        ctx.call = call
        ctx.shape = tuple(x.shape)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.activation = inplace_activation
        if inplace_activation is None:
            ctx.save_for_backward(x, weight, bias, mean, inv_std, count, mask, ident)
            return normalize(x, mean, inv_std, weight, bias)
        normalize_(x, mean, inv_std, weight, bias)
        inplace_activation.apply_(x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, mean, inv_std, count, mask, ident)
        return x

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        site: _comm.CallSite | None = ctx.site
        if torch.is_grad_enabled():
            raise double_backward_error(site.layer if site is not None else "SyncBatchNorm")
        saved, weight, bias, mean, inv_std, count, mask, ident = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        activation: Activation | None = ctx.activation
        if activation is None:  # saved is the input x
            x, dz = saved, dy
            centre, spread = mean, inv_std
        else:  # saved is the output y = f(z), z = w·x̂ + β
            dz = activation.grad_through(dy, saved)
            x = activation.inverse(saved)  # z, standing in for x below
            centre = torch.zeros_like(mean) if bias is None else bias.to(mean.dtype)
            scale = torch.ones_like(mean) if weight is None else weight.to(mean.dtype)
            spread = scale.reciprocal()  # Σdz·(z − β)/w = Σdz·x̂
        if mask is not None:
            # a masked-out position whose gradient is 0 adds 0·x̂ = 0, even where its value
            # is garbage (inf·0 would be NaN): it stands at x̂ = 0 in the sums
            keep = mask.unsqueeze(1) | (dz != 0)
            x = torch.where(keep, x, _stats.channel_view(centre.to(x.dtype), x.dim()))
        sums = local_grad_sums(dz, x, centre, spread)
        grad_weight = grad_bias = grad_input = None
        if need_weight:
            grad_weight = _unit_where(ident, sums.sum_dy_xhat, 0.0).to(ctx.weight_dtype)
        if need_bias:
            grad_bias = _unit_where(ident, sums.sum_dy, 0.0).to(ctx.bias_dtype)
        channels = mean.numel()
        packed = torch.cat([sums.sum_dy, sums.sum_dy_xhat]).double()  # C, C
        if ctx.group_name is not None:
            assert site is not None, "a group needs a CallSite"
            packed = _comm.all_reduce_checked(  # C, C, 0, key -> 2C + 2
                torch.cat([packed, packed.new_zeros(2)]), ctx.group_name, site, "backward",
                ctx.call, ctx.shape)[:2 * channels]
        if need_input:
            global_sums = _stats.GradSums(*packed.to(mean.dtype).chunk(2))
            if activation is None:
                a, b, c = _stats.input_grad_coefficients(global_sums, count, mean, inv_std,
                                                         weight)
            else:
                a, b, c = _stats.input_grad_coefficients_from_output(
                    global_sums, count, inv_std, weight, bias)
            if ident is not None:  # dx = dy where the global batch is one value
                a, b, c = (_unit_where(ident, a, 1.0), _unit_where(ident, b, 0.0),
                           _unit_where(ident, c, 0.0))
            grad_input = input_grad(x, dz, a, b, c, mask)
        return (grad_input, grad_weight, grad_bias, *(None,) * 9)
