"""Input and argument validation: one checker per condition.

Each error says what was expected, what arrived and how to fix it, and uses
torch's exact text where torch rejects the same input.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

MIN_NDIM = 2
MAX_NDIM = 5
MAX_TIMEOUT_S = 1e7
"""The longest timeout accepted (~116 days): ``timedelta`` and gloo overflow far above it."""
MIN_TIMEOUT_S = 1e-3
"""The shortest timeout accepted: 1 ms. c10d takes a ``timedelta`` (whole microseconds) and
gloo counts whole milliseconds; a shorter timeout rounds to zero, which c10d reads as *no*
timeout (measured: ``timeout=1e-7`` waited out a 4 s straggler without an error)."""


def check_tensor(value: object, what: str = "input") -> Tensor:
    """Raise ``TypeError`` unless ``value`` is a ``torch.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"SyncBatchNorm expected {what} to be a torch.Tensor, got "
            f"{type(value).__name__}; convert it with torch.as_tensor(...)"
        )
    return value


def check_ndim(input: Tensor) -> None:
    """Input rank must be 2–5: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``."""
    ndim = input.dim()
    if ndim < MIN_NDIM:
        # torch's text for the same rejection
        raise ValueError(f"expected at least 2D input (got {ndim}D input)")
    if ndim > MAX_NDIM:
        raise ValueError(
            f"expected at most 5D input (got {ndim}D input): SyncBatchNorm takes "
            "(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); fold extra "
            "spatial dims into one, e.g. input.flatten(4)"
        )


def check_channels(input: Tensor, num_features: int | None) -> None:
    """Dim 1 must be non-zero and, when known, equal ``num_features``."""
    channels = input.size(1)
    if channels == 0:
        # torch's text for the same rejection
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"SyncBatchNorm expected input with {num_features} channels at dim 1, got "
            f"{channels} (input shape {tuple(input.shape)}); channels come second, "
            "(N, C, ...): permute channel-last data, or build the layer with "
            f"num_features={channels}"
        )


def check_floating(input: Tensor, layer_dtype: torch.dtype = torch.float32) -> None:
    """Batch normalization needs a floating-point input (the fix names the layer's dtype)."""
    if not input.is_floating_point():
        raise TypeError(
            "SyncBatchNorm expected a floating-point input (float16, bfloat16, float32 "
            f"or float64), got {input.dtype}; convert it with input.to({layer_dtype}) "
            "(the layer's dtype)"
        )


def check_per_channel(name: str, value: Tensor | None, channels: int) -> None:
    """A weight, bias or running buffer must be a 1-D tensor of ``channels`` values."""
    if value is None:
        return
    check_tensor(value, name)
    if value.dim() != 1 or value.numel() != channels:
        # torch's text ("running_mean should contain 3 elements not 4") plus the fix
        raise ValueError(
            f"{name} should contain {channels} elements not {value.numel()}: "
            f"expected shape ({channels},) to match the input's channels, got "
            f"{tuple(value.shape)}"
        )


def check_num_features(num_features: object) -> int:
    """``num_features`` must be a positive int."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(
            f"SyncBatchNorm expected num_features to be an int, got "
            f"{type(num_features).__name__} ({num_features!r})"
        )
    if num_features <= 0:
        raise ValueError(
            f"SyncBatchNorm expected num_features > 0, got {num_features}; it is the "
            "number of channels C of an (N, C, ...) input"
        )
    return num_features


def _real_number(value: object) -> float | None:
    """``value`` as a float when torch's modules would take it as a number, else ``None``.

    Python ints and floats, NumPy scalars and 0-d floating-point tensors count;
    bools do not.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):  # int, float, NumPy's scalar types
        return float(value)
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        return float(value.item())
    return None


def check_momentum(momentum: object, allow_none: bool) -> float | None:
    """Torch momentum: a number in [0, 1], or ``None`` (cumulative average) on modules.

    Returns it as a float (a 0-d tensor or a NumPy scalar as torch's BatchNorm
    takes them), or ``None``.
    """
    if momentum is None and allow_none:
        return None
    value = _real_number(momentum)
    if value is None:
        fix = "a float in [0, 1], or None for a cumulative average" if allow_none else (
            "a float in [0, 1]; the module computes 1/num_batches_tracked for None"
        )
        raise TypeError(f"expected momentum to be {fix}, got {momentum!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"expected momentum in [0, 1] (the weight of the new batch statistic), got "
            f"{momentum}"
        )
    return value


def check_eps(eps: object) -> None:
    """eps must be a non-negative number."""
    value = _real_number(eps)
    if value is None:
        raise TypeError(f"expected eps to be a float, got {eps!r}")
    if not value >= 0.0:
        raise ValueError(f"expected eps >= 0, got {eps}")


def check_train_eps(eps: float) -> None:
    """In training, eps must be positive (torch's text): a batch's variance can be 0."""
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def check_timeout(timeout: object) -> None:
    """A collective timeout: seconds in [:data:`MIN_TIMEOUT_S`, :data:`MAX_TIMEOUT_S`], or
    ``None`` (the group's own)."""
    if timeout is None:
        return
    value = _real_number(timeout)
    if value is None:
        raise TypeError(
            f"SyncBatchNorm expected timeout to be a number of seconds or None (the group's "
            f"own timeout), got {timeout!r}; pass e.g. timeout=30"
        )
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:  # `not <=`: NaN too
        raise ValueError(
            f"SyncBatchNorm expected {MIN_TIMEOUT_S:g} <= timeout <= {MAX_TIMEOUT_S:g} seconds, "
            f"got {timeout}{timeout_hint(value)}; pass e.g. timeout=30, or None for the "
            "group's own timeout"
        )


def timeout_hint(seconds: float) -> str:
    """Why a positive timeout below :data:`MIN_TIMEOUT_S` is refused (empty otherwise)."""
    if 0 < seconds < MIN_TIMEOUT_S:
        return (" (collective timeouts count whole milliseconds: a shorter one rounds to "
                "zero, which torch.distributed reads as no timeout at all)")
    return ""


def check_mask(input: Tensor, mask: object) -> None:
    """A mask is ``None`` or a bool tensor of the input's shape without dim 1, on its device."""
    if mask is None:
        return
    expected = (input.size(0), *input.shape[2:])
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"SyncBatchNorm expected mask to be None or a bool tensor of shape {expected} "
            f"(the input's shape without the channel dim), got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"SyncBatchNorm expected mask to be a bool tensor (True = the position counts), "
            f"got {mask.dtype}; pass e.g. mask=lengths_mask.bool()"
        )
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"SyncBatchNorm expected mask of shape {expected} (the input's shape "
            f"{tuple(input.shape)} without the channel dim 1), got {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise ValueError(
            f"SyncBatchNorm expected mask on the input's device {input.device}, got "
            f"{mask.device}; move it with mask.to(input.device)"
        )


def check_param_dtypes(input: Tensor, *params: Tensor | None) -> None:
    """Parameters and buffers share the input's dtype, or are float32 for a 16-bit input.

    torch's own kernels reject other mixes (e.g. a float64 input on a float32
    layer); checking here keeps the synchronized path and the local fallback alike.
    """
    allowed = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16):
        allowed.add(torch.float32)
    for param in params:
        if param is not None and param.dtype not in allowed:
            raise TypeError(
                f"SyncBatchNorm got a {input.dtype} input for a layer whose parameters and "
                f"buffers are {param.dtype}; convert one to the other, e.g. input.to("
                f"{param.dtype}) or layer.to({input.dtype})"
            )
