"""Paddle's BatchNorm conventions, translated once into the core's vocabulary.

This is the only module of ``syncbn.paddle_compat`` that knows what a Paddle
argument means numerically; the layers in ``_layers.py`` are shells around it.

==========================  ==============================================================
Paddle                      core (``syncbn.functional.synchronized_batch_norm``)
==========================  ==============================================================
``momentum`` m              ``decay = float32(m)``: the EMA *keep* rate,
                            ``running ← decay·running + (1 − decay)·batch``
``epsilon``                 ``eps = float32(epsilon)``
running variance            the **biased** batch variance σ² (``unbiased_var=False``)
one value per channel       ``single_value="identity"``: when the *global* batch has exactly
                            one value per channel, the input is returned unchanged and the
                            running statistics are not touched
``data_format``             which axis holds C (:class:`LayoutRule`); channel-last input is
                            viewed with C at dim 1 (``x.movedim(-1, 1)``; a 3-D one as
                            ``(N·L, C)``), normalized, and viewed back, so it comes in and
                            goes out channel-last, without a copy
training flag, flags        :func:`statistics_mode`: normalize with batch or running
                            statistics, and whether to update the running ones
==========================  ==============================================================

Why float32: Paddle stores ``momentum`` and ``epsilon`` as float32 operator
attributes whatever the data type, so for float64 data ``momentum=0.9`` acts as
``0.8999999761581421`` and ``epsilon=1e-5`` as ``9.999999747378752e-06``. Using
the rounded values makes float64 results agree with Paddle's to ~1e-12 instead
of ~1e-9.

The statistics, per channel over every value of the (global) batch, ``m`` values:

    μ = (1/m)·Σx,   σ² = (1/m)·Σ(x − μ)²                       (biased)
    y = γ·(x − μ)/√(σ² + ε) + β
    _mean ← decay·_mean + (1 − decay)·μ,   _variance ← decay·_variance + (1 − decay)·σ²

With running statistics, ``y = γ·(x − _mean)/√(_variance + ε) + β`` and its
gradients are those of this affine map (the statistics are constants).

Two gradient quirks of Paddle are deliberately **not** reproduced: (1) with one of
``weight``/``bias`` absent or frozen, Paddle's kernel returns no gradient for the
other one; here each present, trainable parameter gets its gradient. (2) In eval
mode with trainable statistics (``BatchNorm(trainable_statistics=True)`` or
``BatchNorm1D/2D/3D(use_global_stats=False)``), Paddle's backward mixes the batch
statistics with the just-updated running ones; here the gradient is the exact
gradient of the forward, which used the batch statistics.
"""

from __future__ import annotations

import difflib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _comm
from .._activation import Activation
from .._autograd import SingleValuePolicy, is_recomputing
from ..functional import synchronized_batch_norm
from ._activations import LEAKY_RELU_SLOPE

__all__ = [
    "BATCH_NO_UPDATE",
    "BATCH_UPDATE",
    "LAYOUT_1D",
    "LAYOUT_2D",
    "LAYOUT_3D",
    "LAYOUT_BATCHNORM",
    "LAYOUT_SYNC",
    "RUNNING",
    "SINGLE_VALUE",
    "UNBIASED_RUNNING_VAR",
    "Conventions",
    "LayoutRule",
    "StatsMode",
    "batch_norm",
    "conventions",
    "from_channels_first",
    "fused_activation",
    "parameter_dtype",
    "statistics_mode",
    "to_channels_first",
    "to_float32",
]

UNBIASED_RUNNING_VAR = False
"""Paddle's running variance takes the biased batch variance σ² (torch: σ²·m/(m − 1))."""

SINGLE_VALUE: SingleValuePolicy = "identity"
"""Paddle returns the input unchanged for a training batch of one value per channel."""


def to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float (0.9 → 0.8999999761581421)."""
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


@dataclass(frozen=True)
class Conventions:
    """``momentum`` and ``epsilon`` as the core takes them.

    Attributes:
        decay: ``float32(momentum)``, the weight of the old running value.
        eps: ``float32(epsilon)``, added to the variance.
    """

    decay: float
    eps: float


def _real(value: object, name: str, layer: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{layer}: expected {name} to be a real number, got {type(value).__name__} "
            f"({value!r}). Fix: pass e.g. {name}={example}."
        )
    return float(value)


def conventions(momentum: object, epsilon: object, layer: str) -> Conventions:
    """Validate Paddle's ``momentum``/``epsilon`` and translate them (see :class:`Conventions`).

    Raises:
        TypeError: either is not a real number.
        ValueError: ``momentum`` is outside [0, 1], or ``epsilon`` is negative or not finite.
    """
    m = _real(momentum, "momentum", layer, "0.9")
    if not 0.0 <= m <= 1.0:
        raise ValueError(
            f"{layer}: expected momentum in [0, 1], got {m!r}; in Paddle it is the weight of "
            "the old running value (running ← momentum·running + (1 − momentum)·batch). "
            "Fix: pass e.g. momentum=0.9 (a Torch momentum p is Paddle's 1 − p)."
        )
    eps = _real(epsilon, "epsilon", layer, "1e-5")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(
            f"{layer}: expected a finite epsilon >= 0, got {eps!r}. Fix: pass e.g. epsilon=1e-5."
        )
    return Conventions(decay=to_float32(m), eps=to_float32(eps))


# --- data_format → channel axis ------------------------------------------------------------------

_BY_RANK = {2: "BatchNorm1D", 3: "BatchNorm1D", 4: "BatchNorm2D", 5: "BatchNorm3D"}


@dataclass(frozen=True)
class LayoutRule:
    """The ``data_format`` strings a layer accepts, where each puts C, and the input ranks.

    Attributes:
        layer: the layer's name, for messages.
        formats: ``data_format`` → True when C is the last axis (else C is dim 1).
            May hold aliases Paddle accepts without documenting them.
        documented: the formats named in messages.
        ranks: accepted input ranks.
        shapes: the accepted shapes, in words, for messages.
        argument: the argument's name (the old ``BatchNorm`` calls it ``data_layout``).
        any_case: ASCII letter case is ignored. True only for the old ``BatchNorm``,
            whose ``data_layout`` goes straight to Paddle's C++ operator, which
            upper-cases it (``StringToDataLayout``): ``'nhwc'`` and ``'Nchw'`` work
            there. ``BatchNorm1D/2D/3D`` and ``SyncBatchNorm`` compare ``data_format``
            with ``==`` in Python first, so there the case matters.
    """

    layer: str
    formats: Mapping[str, bool]
    documented: tuple[str, ...]
    ranks: tuple[int, ...]
    shapes: str
    argument: str = "data_format"
    any_case: bool = False

    def channel_last(self, data_format: object) -> bool:
        """Whether ``data_format`` puts C last (True) or at dim 1 (False).

        Raises:
            TypeError: ``data_format`` is not a str.
            ValueError: it is not one of :attr:`formats` (Paddle's text, plus the fix).
        """
        listed = " or ".join(self.documented) if len(self.documented) == 2 else (
            ", ".join(self.documented[:-1]) + " or " + self.documented[-1]
        )
        if not isinstance(data_format, str):
            raise TypeError(
                f"{self.layer}: expected {self.argument} to be a str ({listed}), got "
                f"{type(data_format).__name__} ({data_format!r}). "
                f"Fix: pass {self.argument}={self.documented[0]!r}."
            )
        # bytes.upper() changes ASCII letters only, as C's toupper in Paddle's operator
        key = data_format.encode().upper().decode() if self.any_case else data_format
        if key not in self.formats:
            close = difflib.get_close_matches(data_format.upper(), self.documented, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            case = " in any letter case" if self.any_case else ""
            raise ValueError(
                f"{self.layer}: expected {listed} for {self.argument}, got {data_format!r}. "
                f"{hint}Fix: pass one of {', '.join(map(repr, self.documented))}{case} "
                f"({self.shapes})."
            )
        return self.formats[key]

    def check_rank(self, ndim: int) -> None:
        """Raise Paddle's ``ValueError`` ("expected 4D input (got 3D input)") plus the fix."""
        if ndim in self.ranks:
            return
        if len(self.ranks) == 1:
            expected = f"{self.ranks[0]}D"
        elif len(self.ranks) == 2:
            expected = f"{self.ranks[0]}D or {self.ranks[1]}D"
        else:
            expected = f"{self.ranks[0]}D to {self.ranks[-1]}D"
        other = _BY_RANK.get(ndim)
        fix = (f"use {other} for {ndim}-D input" if other and other != self.layer
               else "reshape the input to one of those shapes")
        raise ValueError(
            f"expected {expected} input (got {ndim}D input): {self.layer} takes "
            f"{self.shapes}. Fix: {fix}."
        )


_ANY_RANK = "(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), or the same with C last"

LAYOUT_1D = LayoutRule(
    "BatchNorm1D",
    # 'NCHW'/'NHWC' are aliases Paddle accepts too (its converted layers carry them)
    {"NC": False, "NCL": False, "NLC": True, "NCHW": False, "NHWC": True},
    ("NC", "NCL", "NLC"),
    (2, 3),
    "(N, C) or (N, C, L) with 'NC'/'NCL', (N, L, C) with 'NLC'",
)
LAYOUT_2D = LayoutRule(
    "BatchNorm2D",
    {"NCHW": False, "NHWC": True},
    ("NCHW", "NHWC"),
    (4,),
    "(N, C, H, W) with 'NCHW' or (N, H, W, C) with 'NHWC'",
)
LAYOUT_3D = LayoutRule(
    "BatchNorm3D",
    {"NCDHW": False, "NDHWC": True, "NCHW": False, "NHWC": True},  # aliases as in Paddle
    ("NCDHW", "NDHWC"),
    (5,),
    "(N, C, D, H, W) with 'NCDHW' or (N, D, H, W, C) with 'NDHWC'",
)
LAYOUT_SYNC = LayoutRule(
    "SyncBatchNorm",
    {"NC": False, "NCL": False, "NCHW": False, "NCDHW": False,
     "NLC": True, "NHWC": True, "NDHWC": True},
    ("NCDHW", "NDHWC", "NCL", "NLC", "NC", "NCHW", "NHWC"),
    (2, 3, 4, 5),
    _ANY_RANK + " ('NLC', 'NHWC', 'NDHWC')",
)
LAYOUT_BATCHNORM = LayoutRule(
    "BatchNorm",
    {"NCHW": False, "NHWC": True},
    ("NCHW", "NHWC"),
    (2, 3, 4, 5),
    _ANY_RANK + " ('NHWC')",
    argument="data_layout",
    any_case=True,  # Paddle's operator upper-cases data_layout: 'nhwc' works
)


def to_channels_first(input: Tensor, channel_last: bool) -> Tensor:
    """A view of ``input`` with C at dim 1, without a copy.

    For C last, ``input.movedim(-1, 1)``: for a contiguous 4-D/5-D tensor this view is
    exactly torch's ``channels_last``/``channels_last_3d`` memory format, which the
    core keeps. 3-D input has no such format (the kernels would copy it to
    ``(N, C, L)`` order), so a contiguous ``(N, L, C)`` is viewed as ``(N·L, C)``
    instead: the same values per channel, hence the same statistics.
    """
    if not channel_last:
        return input
    if input.dim() == 3 and input.is_contiguous():
        return input.flatten(0, 1)
    return input.movedim(-1, 1)


def from_channels_first(output: Tensor, channel_last: bool, shape: tuple[int, ...]) -> Tensor:
    """Undo :func:`to_channels_first` for an input of ``shape`` (a view)."""
    if not channel_last:
        return output
    if output.dim() != len(shape):  # the (N·L, C) view of a 3-D input
        return output.view(shape)
    return output.movedim(1, -1)


# --- which statistics normalize, and which get updated -------------------------------------------


@dataclass(frozen=True)
class StatsMode:
    """What one forward does with the statistics.

    Attributes:
        batch_stats: normalize with the batch statistics (else with ``_mean``/``_variance``).
        update_running: update ``_mean``/``_variance`` from the batch (only with batch_stats).
    """

    batch_stats: bool
    update_running: bool


BATCH_UPDATE = StatsMode(batch_stats=True, update_running=True)
BATCH_NO_UPDATE = StatsMode(batch_stats=True, update_running=False)
RUNNING = StatsMode(batch_stats=False, update_running=False)


def statistics_mode(
    *,
    training: bool,
    use_global_stats: bool | None,
    trainable_statistics: bool | None = None,
    track_running_stats: bool = True,
) -> StatsMode:
    """Paddle's choice of statistics, as a pure function of the layer's flags.

    Paddle's ``batch_norm`` operator normalizes with the running statistics, and
    leaves them alone, when ``use_global_stats`` or (``is_test`` and not
    ``trainable_statistics``); otherwise it uses and updates the batch statistics.
    ``is_test`` is ``not training``. ``paddle.nn.functional.batch_norm`` (behind
    ``BatchNorm1D/2D/3D`` and ``SyncBatchNorm``) derives the operator's flags from
    its ``use_global_stats``: ``None`` → ``use_global_stats = not training`` and no
    trainable statistics; a bool → ``trainable_statistics = not use_global_stats``.
    That derivation happens here when ``trainable_statistics`` is None; the old
    ``BatchNorm`` passes its own bools.

    ======================================  ========  ============  ==============
    flags                                   training  statistics    update running
    ======================================  ========  ============  ==============
    use_global_stats None (1D/2D/3D, Sync)  True      batch         yes
    use_global_stats None                   False     running       no
    use_global_stats True                   any       running       no
    use_global_stats False (1D/2D/3D)       any       batch         yes
    BatchNorm: use_global_stats=False       True      batch         yes
    BatchNorm: use_global_stats=False       False     running       no
    BatchNorm: trainable_statistics=True    False     batch         yes
    track_running_stats=False (Sync)        any       batch         no
    ======================================  ========  ============  ==============
    """
    if not track_running_stats:
        return BATCH_NO_UPDATE
    if use_global_stats is None:
        use_global, trainable = not training, False
    else:
        use_global = use_global_stats
        trainable = (not use_global_stats) if trainable_statistics is None else trainable_statistics
    if use_global or not (training or trainable):
        return RUNNING
    return BATCH_UPDATE


def batch_norm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    mode: StatsMode,
    conventions: Conventions,
    process_group: _comm.ProcessGroup | None = None,
    site: _comm.CallSite | None = None,
    inplace_activation: Activation | None = None,
    call: int = -1,
) -> Tensor:
    """Paddle-convention batch normalization of a channels-first ``input`` (C at dim 1).

    ``weight``/``bias`` None act as 1/0. With ``mode.batch_stats`` the core
    normalizes with the statistics of the batch over ``process_group`` (None:
    this process only), biased running variance, ``decay = float32(momentum)``,
    and the one-value-per-channel identity; the running buffers are updated when
    ``mode.update_running`` (never inside a checkpoint's recompute). Otherwise
    ``F.batch_norm`` with the running statistics: the gradients are those of the
    affine map ``γ·(x − _mean)/√(_variance + ε) + β``.

    ``inplace_activation`` (batch statistics only) runs the core's in-place
    activated mode: ``input`` is overwritten with ``f(BN(x))``; the caller must
    not apply the activation again.
    """
    if not mode.batch_stats:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0,
                            conventions.eps)
    update = mode.update_running and not is_recomputing()
    return synchronized_batch_norm(
        input, running_mean if update else None, running_var if update else None, weight, bias,
        eps=conventions.eps, decay=conventions.decay, unbiased_var=UNBIASED_RUNNING_VAR,
        process_group=process_group, single_value=SINGLE_VALUE, site=site,
        inplace_activation=inplace_activation, call=call,
    )


def fused_activation(act: str | None) -> Activation | None:
    """The core activation for Paddle's ``act`` in the in-place mode, or ``None``.

    Only the activations the core can invert in floating point fuse: ``None``
    (identity) and ``'leaky_relu'`` (Paddle's operator slope, float32 0.02).
    Every other ``act`` (``'elu'`` included: it saturates) is applied after the
    layer, out of place.
    """
    if act is None:
        return Activation("identity")
    if act == "leaky_relu":
        return Activation("leaky_relu", LEAKY_RELU_SLOPE)
    return None


def parameter_dtype(dtype: object, layer: str) -> torch.dtype:
    """The old ``BatchNorm(dtype=...)``: float32 / float64 (str or torch dtype); float16 → float32.

    Paddle keeps float16 layers' parameters in float32; so does this.

    Raises:
        TypeError: ``dtype`` is neither a str nor a torch.dtype.
        ValueError: it names another dtype.
    """
    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float32}
    by_dtype = {torch.float32: torch.float32, torch.float64: torch.float64,
                torch.float16: torch.float32}
    if isinstance(dtype, torch.dtype):
        if dtype in by_dtype:
            return by_dtype[dtype]
    elif isinstance(dtype, str):
        if dtype in names:
            return names[dtype]
    else:
        raise TypeError(
            f"{layer}: expected dtype to be 'float32', 'float64' or 'float16' (a str or "
            f"torch.dtype), got {type(dtype).__name__} ({dtype!r}). Fix: pass dtype='float32'."
        )
    raise ValueError(
        f"{layer}: expected dtype 'float32', 'float64' or 'float16' (float16 layers keep "
        f"float32 parameters, as in Paddle), got {dtype!r}. Fix: pass dtype='float32' or "
        "'float64'."
    )
