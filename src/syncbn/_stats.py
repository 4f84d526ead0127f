"""Pure math of batch normalization statistics: no ``torch.distributed`` here.

Vocabulary (used everywhere in the core, never renamed):

- ``count``: number of values per channel, ``N·∏spatial`` (an int locally, a
  float64 tensor once summed over ranks: exact up to 2**53).
- ``mean``: per-channel mean; ``var``: per-channel *biased* variance;
  ``m2``: per-channel sum of squared deviations, ``m2 = count·var``.
- ``invstd``: ``1/√(var + eps)``.
- ``local_*``: over this rank's shard; ``global_*``: over every rank's shard.
- ``decay``: the keep-rate of the running-statistics EMA,
  ``running ← decay·running + (1 − decay)·batch``. Torch's ``momentum`` is
  ``1 − decay``; Paddle's ``momentum`` is ``decay``. No ``momentum`` enters here.

The cross-rank stage packs ``[Σ(x − s), Σ(x − s)², count, key]`` (``2C + 2``
float64 values, ``s`` a shift all ranks share) for one all-reduce; the packing is
built from centred local moments so that nothing is lost to cancellation (see
:func:`pack_local_moments`; the merge is ``syncbn._step.merge`` and, on CPU,
``syncbn._step.merge_on_host``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def reduce_dims(ndim: int) -> list[int]:
    """Every dim but the channel dim 1: ``[0, 2, 3, …]`` for an ``ndim``-d input."""
    return [0, *range(2, ndim)]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """View a per-channel vector ``(C,)`` as ``(1, C, 1, …)`` to broadcast against the input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for 16-bit floats, else ``dtype`` itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def local_count(shape: torch.Size) -> int:
    """Values per channel of an input of this shape: ``N·∏spatial`` (a host int, no sync)."""
    count = shape[0]
    for size in shape[2:]:
        count *= size
    return count


@dataclass(frozen=True)
class LocalMoments:
    """Centred moments of one rank's shard, in the accumulation dtype."""

    count: int | Tensor  # a host int, or (masked) a float64 tensor of shape ()
    total: Tensor  # Σx, shape (C,)
    centre: Tensor  # c = Σx / max(count, 1), the point m2 is taken about
    m2: Tensor  # Σ(x − c)²
    residual: Tensor | None = None  # Σ(x − c) when measured (float64 inputs), else derived


def torch_stats_kernel_applies(x: Tensor) -> bool:
    """Whether torch's fused batch-norm statistics kernel beats two plain reductions here.

    Measured on this project's 2-core CPU, (8, 64, 56, 56), one thread: it does
    for 16-bit inputs (0.39 ms against 10.6 ms for the mixed-dtype reductions),
    for channels-last layouts (0.34 ms against 0.84 ms) and on accelerators;
    it loses for contiguous N-C-spatial float32 CPU inputs (3.1 ms against
    0.89 ms). Its float accumulation is less exact than the two reductions at
    extreme offsets (relative error of σ² 6e-5 at μ/σ = 1e4, 3e-4 at 1e5,
    against ~1e-6), so 2-D float32/float64 inputs, where the reductions cost
    ~0.1 ms, keep the reductions, and so do float64 inputs of any layout.
    """
    if x.numel() == 0 or x.dtype == torch.float64:
        return False
    if x.dtype in (torch.float16, torch.bfloat16) or x.device.type != "cpu":
        return True
    if x.dim() < 4:
        return False
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return not x.is_contiguous() and x.is_contiguous(memory_format=layout)


def local_moments(x: Tensor, mask: Tensor | None = None) -> LocalMoments:
    """Centred moments of ``x`` over every dim but 1, in :func:`acc_dtype`.

    Either torch's statistics kernel (see :func:`torch_stats_kernel_applies`;
    a two-pass mean and biased variance, so ``m2 = count·var`` about the mean;
    given float32 scratch buffers it returns float32 statistics for 16-bit
    inputs), or two reductions: ``Σx``, then ``m2 = Σ(x − c)²`` with
    ``c = Σx/count`` (float64 inputs also keep ``Σ(x − c)``, the rounding of
    ``c``, see :func:`pack_local_moments`). An empty shard gives zeros
    (``c = 0``), so it contributes nothing and produces no NaN.

    With a ``mask`` (bool, the input's shape without dim 1; True = counts) only
    the valid positions count: ``count = Σm``, ``Σx·m`` and ``Σ((x − c)·m)²``;
    this costs one elementwise pass more than the unmasked reductions (``x·m``).
    """
    dtype = acc_dtype(x.dtype)
    if mask is not None:
        return _masked_moments(x, mask, dtype)
    count = local_count(x.shape)
    if torch_stats_kernel_applies(x):
        scratch = torch.zeros(x.size(1), dtype=dtype, device=x.device)
        # momentum 0: the scratch "running" buffers only fix the statistics' dtype
        mean, var = torch.batch_norm_update_stats(x, scratch, scratch.clone(), 0.0)
        return LocalMoments(count, mean * count, mean, var * count)
    dims = reduce_dims(x.dim())
    total = x.sum(dims, dtype=dtype)
    centre = total / max(count, 1)
    deviation = x - channel_view(centre, x.dim())
    residual = deviation.sum(dims)  # measured: the rounding of c costs nothing
    m2 = deviation.square_().sum(dims)
    return LocalMoments(count, total, centre, m2, residual)


def _masked_moments(x: Tensor, mask: Tensor, dtype: torch.dtype) -> LocalMoments:
    """Selected, not multiplied: a NaN or inf at a masked-out position never reaches the sums
    (``NaN·0`` is NaN)."""
    valid = mask.unsqueeze(1)  # (N, 1, …)
    dims = reduce_dims(x.dim())
    count = mask.sum(dtype=torch.float64)
    total = torch.where(valid, x, 0).sum(dims, dtype=dtype)
    centre = total / count.clamp_min(1.0).to(dtype)
    deviation = torch.where(valid, x.to(dtype) - channel_view(centre, x.dim()), 0)
    residual = deviation.sum(dims)
    m2 = deviation.square_().sum(dims)
    return LocalMoments(count, total, centre, m2, residual)


def pack_local_moments(moments: LocalMoments, shift: Tensor | None = None) -> Tensor:
    """Pack ``[Σ(x − s) (C), Σ(x − s)² (C), count (1), 0 (1)]`` in float64 for one all-reduce.

    ``s`` is a per-channel ``shift`` that every rank holds alike (the layer's
    last global mean, else its running mean, see ``syncbn._step.merge``;
    ``None`` means 0). The sums are rebuilt from the centred moments by the exact
    identities, with ``d = c − s`` and ``r = Σ(x − c)``,

        Σ(x − s) = r + count·d,      Σ(x − s)² = m2(c) + d·(2r + count·d),

    which hold for *any* centre ``c``, so rounding in ``c`` costs nothing. The
    terms are formed in float64; the last slot is the step key's (set by the
    collective).
    """
    total, centre, m2 = torch.stack([moments.total, moments.centre, moments.m2]).double()
    count = moments.count
    if isinstance(count, Tensor):
        n: Tensor | float = count
        count_slot = count.reshape(1)
    else:
        n = float(count)
        count_slot = total.new_full((1,), n)
    direct = total if shift is None else total - shift * n  # Σx − count·s
    d = centre if shift is None else centre - shift
    if moments.residual is not None:  # measured: Σ(x − s) = r + count·d, exact to ε·|r|
        residual = moments.residual.double()
        s1 = torch.where(torch.isnan(residual), direct, residual + d * n)  # inf: as torch
    else:
        residual = total - centre * n
        s1 = direct
    s2 = torch.addcmul(m2, d, s1 + residual)  # m2 + d·(2r + count·d)
    return torch.cat([s1, s2, count_slot, count_slot.new_zeros(1)])  # C, C, 1, 1 -> 2C + 2


def invstd(var: Tensor, eps: float) -> Tensor:
    """``1/√(var + eps)``."""
    return (var + eps).rsqrt()


@dataclass(frozen=True)
class GradSums:
    """Per-channel reductions of the upstream gradient, in the accumulation dtype."""

    sum_dy: Tensor  # Σ dy
    sum_dy_xhat: Tensor  # Σ dy·x̂, with x̂ = (x − μ)·invstd


def input_grad_coefficients(
    sums: GradSums,
    count: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(a, b, c)`` with ``dx = a·dy + b·x + c`` (global sums, global N).

    Differentiating ``y = w·x̂ + β`` with ``x̂ = (x − μ)·invstd`` through μ and σ²
    of the global batch (Ioffe & Szegedy 2015, §3) gives

        dx = w·invstd·(dy − Σdy/N − x̂·Σ(dy·x̂)/N)

    so, expanding ``x̂``:

        a = w·invstd,   b = −a·invstd·Σ(dy·x̂)/N,   c = −a·Σdy/N − b·μ.
    """
    n = count.clamp_min(1.0).to(mean.dtype)
    a = inv_std if weight is None else weight.to(mean.dtype) * inv_std
    b = -a * inv_std * sums.sum_dy_xhat / n
    c = -a * sums.sum_dy / n - b * mean
    return a, b, c


def input_grad_coefficients_from_output(
    sums: GradSums,
    count: Tensor,
    inv_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(a, b, c)`` with ``dx = a·dz + b·z + c``, in terms of ``z = w·x̂ + β``.

    The in-place mode keeps ``z`` (recovered from the output), not ``x``.
    Substituting ``x̂ = (z − β)/w`` into :func:`input_grad_coefficients`' formula
    ``dx = w·invstd·(dz − Σdz/N − x̂·Σ(dz·x̂)/N)`` gives

        a = w·invstd,   b = −invstd·Σ(dz·x̂)/N,   c = −a·Σdz/N − b·β,

    with ``w = 1`` and ``β = 0`` for absent parameters (``sums`` hold ``Σdz`` and
    ``Σdz·x̂``).
    """
    n = count.clamp_min(1.0).to(inv_std.dtype)
    a = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
    b = -inv_std * sums.sum_dy_xhat / n
    c = -a * sums.sum_dy / n
    if bias is not None:
        c = c - b * bias.to(inv_std.dtype)
    return a, b, c
