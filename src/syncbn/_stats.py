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

The cross-rank stage packs ``[Σx, Σx², count]`` (``2C + 1`` float64 values) for
one all-reduce; the packing is built from centred local moments so that float32
inputs lose nothing to cancellation (see :func:`pack_local_moments`).
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

    count: int
    total: Tensor  # Σx, shape (C,)
    centre: Tensor  # c = Σx / max(count, 1), the point m2 is taken about
    m2: Tensor  # Σ(x − c)²


def torch_stats_kernel_applies(x: Tensor) -> bool:
    """Whether torch's fused batch-norm statistics kernel beats two plain reductions here.

    Measured on this project's 2-core CPU, (8, 64, 56, 56), one thread: it does
    for 16-bit inputs (0.39 ms against 10.6 ms for the mixed-dtype reductions),
    for channels-last layouts (0.34 ms against 0.84 ms) and on accelerators;
    it loses for contiguous N-C-spatial float32 CPU inputs (3.1 ms against
    0.89 ms). Its float accumulation is less exact than the two reductions at
    extreme offsets (relative error of σ² 6e-5 at μ/σ = 1e4, 3e-4 at 1e5,
    against ~1e-6), so 2-D float32/float64 inputs, where the reductions cost
    ~0.1 ms, keep the reductions.
    """
    if x.numel() == 0:
        return False
    if x.dtype in (torch.float16, torch.bfloat16) or x.device.type != "cpu":
        return True
    if x.dim() < 4:
        return False
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return not x.is_contiguous() and x.is_contiguous(memory_format=layout)


def local_moments(x: Tensor) -> LocalMoments:
    """Centred moments of ``x`` over every dim but 1, in :func:`acc_dtype`.

    Either torch's statistics kernel (see :func:`torch_stats_kernel_applies`;
    a two-pass mean and biased variance, so ``m2 = count·var`` about the mean;
    given float32 scratch buffers it returns float32 statistics for 16-bit
    inputs), or two reductions: ``Σx``, then ``m2 = Σ(x − c)²`` with
    ``c = Σx/count``. An empty shard gives zeros (``c = 0``), so it contributes
    nothing and produces no NaN.
    """
    count = local_count(x.shape)
    dtype = acc_dtype(x.dtype)
    if torch_stats_kernel_applies(x):
        scratch = torch.zeros(x.size(1), dtype=dtype, device=x.device)
        # momentum 0: the scratch "running" buffers only fix the statistics' dtype
        mean, var = torch.batch_norm_update_stats(x, scratch, scratch.clone(), 0.0)
        return LocalMoments(count, mean * count, mean, var * count)
    dims = reduce_dims(x.dim())
    total = x.sum(dims, dtype=dtype)
    centre = total / max(count, 1)
    deviation = x - channel_view(centre, x.dim())
    m2 = deviation.square_().sum(dims)
    return LocalMoments(count, total, centre, m2)


def pack_local_moments(moments: LocalMoments) -> Tensor:
    """Pack ``[Σx (C), Σx² (C), count (1)]`` in float64 for one sum-all-reduce.

    ``Σx²`` is rebuilt from the centred moments by the exact identity

        Σx² = m2(c) + c·(2·Σx − count·c),   where m2(c) = Σ(x − c)²,

    which holds for *any* centre ``c``, so rounding in ``c`` costs nothing. The
    terms are formed in float64, so the later cancellation in
    :func:`merge_global_moments` loses only ε₆₄·(μ/σ)² relative.
    """
    total, centre, m2 = torch.stack([moments.total, moments.centre, moments.m2]).double()
    # c·(2·Σx − count·c) = 2c·(Σx − (count/2)·c)
    sum_sq = torch.addcmul(m2, centre, torch.add(total, centre, alpha=-moments.count / 2),
                           value=2.0)
    count = total.new_full((1,), float(moments.count))
    return torch.cat([total, sum_sq, count])  # C, C, 1 -> (2C + 1)


@dataclass(frozen=True)
class GlobalMoments:
    """Statistics of the global batch, float64, shape (C,) each; ``count`` shape (1,)."""

    count: Tensor
    mean: Tensor
    var: Tensor  # biased


def merge_global_moments(packed: Tensor) -> GlobalMoments:
    """Global mean and biased variance from the summed packing of every rank.

    With ``S₁ = Σ_k Σx``, ``S₂ = Σ_k Σx²`` and ``N = Σ_k count_k`` (float64):

        μ = S₁ / N,    σ² = max(S₂/N − μ², 0).

    This is the all-reduce form of the pairwise merge of Chan, Golub & LeVeque
    ("Algorithms for computing the sample variance", 1983): summing
    ``m2_k + count_k·c_k²`` over ranks equals ``M2 + N·μ²``. In float64 the
    relative error of σ² is about ε₆₄·(μ/σ)²; float32 inputs with mean 1e4 and
    std 1 therefore keep ~1e-8 relative (E[x²]−E[x]² in float32 would lose all).
    With ``N = 0`` (every rank empty) the result is mean 0, var 0, never NaN.
    """
    channels = (packed.numel() - 1) // 2
    count = packed[-1:].clone()  # not a view: the buffer need not outlive this step
    mean, mean_sq = (packed[:-1] / count.clamp_min(1.0)).view(2, channels)
    var = torch.addcmul(mean_sq, mean, mean, value=-1.0).clamp_min_(0.0)
    return GlobalMoments(count, mean, var)


def invstd(var: Tensor, eps: float) -> Tensor:
    """``1/√(var + eps)``."""
    return (var + eps).rsqrt()


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stats: GlobalMoments,
    decay: float,
    unbiased_var: bool,
) -> None:
    """In place: ``running ← decay·running + (1 − decay)·batch``, where ``count > 0``.

    ``batch`` is the global mean, and the global variance: unbiased,
    ``σ²·N/(N − 1)`` (Torch), or biased ``σ²`` (Paddle). Computed in float64 and
    rounded once into the buffers' dtype, from values that are identical on every
    rank, so every rank ends with bitwise identical buffers. A step whose global
    batch is empty leaves the buffers untouched.
    """
    batch_var = stats.var
    if unbiased_var and running_var is not None:
        batch_var = batch_var * (stats.count / (stats.count - 1.0).clamp_min(1.0))
    pairs = [(r, b) for r, b in ((running_mean, stats.mean), (running_var, batch_var))
             if r is not None]
    if not pairs:
        return
    old = torch.stack([r for r, _ in pairs]).double()
    new = torch.stack([b for _, b in pairs])
    blended = torch.where(stats.count > 0, old * decay + new * (1.0 - decay), old)
    for (running, _), value in zip(pairs, blended, strict=True):
        running.copy_(value)


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
