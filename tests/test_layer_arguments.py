"""The layer's arguments at their edges: integer input (the fix hint must work), momentum
given as a tensor or numpy scalar, infinite and huge timeouts.

These began as issue 15, item 10 (each failed on the core before its fix). The oracle
for accepted arguments is plain ``torch.nn.BatchNorm2d`` given the same argument: what
torch accepts, we accept, with the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import harness
import syncbn

# --- integer input: the fix hint must be one that works -------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_input_hint_is_one_that_works(dtype: torch.dtype) -> None:
    layer = syncbn.SyncBatchNorm(3)
    x = torch.ones(4, 3, 2, 2, dtype=dtype)
    with pytest.raises(TypeError) as info:
        layer(x)
    message = str(info.value)
    # torch refuses too ("batch_norm" not implemented for 'Long'); our text names the fix.
    # layer.to(<integer dtype>) cannot work: nn.Module.to only takes floating/complex dtypes.
    assert f"layer.to({dtype})" not in message, message
    assert "floating-point input" in message, message
    assert "input.to(torch.float32)" in message, message  # the layer's dtype
    with pytest.raises(TypeError, match="only accepts floating point or complex dtypes"):
        nn.Module().to(dtype)  # why the old hint is wrong


# --- momentum: what torch accepts --------------------------------------------------------------


TORCH_LEGAL_MOMENTA = {
    "tensor-f32": lambda: torch.tensor(0.1),
    "tensor-f64": lambda: torch.tensor(0.1, dtype=torch.float64),
    "numpy-f32": lambda: np.float32(0.1),
    "numpy-f16": lambda: np.float16(0.1),
}


@pytest.mark.parametrize("make", TORCH_LEGAL_MOMENTA.values(), ids=TORCH_LEGAL_MOMENTA.keys())
def test_momentum_accepted_like_torch(make: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    plain = nn.BatchNorm2d(3, momentum=make())  # torch accepts it and keeps it as given
    ours = syncbn.SyncBatchNorm(3, momentum=make())
    for _ in range(2):
        torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)


def test_momentum_torch_refuses_stays_refused() -> None:
    # not xfail: torch refuses these at forward (batch_norm(): argument 'momentum' must be
    # float); we refuse them at construction, and must keep doing so after the fix above
    for value in (torch.tensor([0.1]), np.array(0.1), "0.1"):
        with pytest.raises(TypeError, match="momentum"):
            syncbn.SyncBatchNorm(3, momentum=value)(torch.randn(4, 3))


# --- timeouts that overflow: a clear ValueError, or they work --------------------------------


def _forward_with_timeout(timeout: float | None, env: str | None) -> str:
    """One synchronized forward on this rank; the outcome as text."""
    previous = os.environ.get("SYNCBN_TIMEOUT")
    if env is not None:
        os.environ["SYNCBN_TIMEOUT"] = env
    try:
        layer = syncbn.SyncBatchNorm(3, timeout=timeout)
        layer(torch.randn(4, 3))
        return "ok"
    except Exception as error:  # the outcome is the result
        return f"{type(error).__name__}: {error}"
    finally:
        if previous is None:
            os.environ.pop("SYNCBN_TIMEOUT", None)
        else:
            os.environ["SYNCBN_TIMEOUT"] = previous


def _assert_works_or_clear_value_error(outcome: str, named: str) -> None:
    """Either the (huge) timeout works as "no practical limit", or it is refused up front
    with a ValueError that names it; never an OverflowError, never a false "timed out"."""
    if outcome == "ok":
        return
    assert outcome.startswith("ValueError: "), outcome
    assert named in outcome and "timeout" in outcome.lower(), outcome


def test_infinite_timeout_argument() -> None:
    # today: OverflowError from timedelta(seconds=inf) inside the collective
    for outcome in harness.run_ranks(2, _forward_with_timeout, float("inf"), None, timeout=60):
        _assert_works_or_clear_value_error(outcome, "inf")


def test_huge_timeout_environment_variable() -> None:
    # today: SYNCBN_TIMEOUT=1e10 makes the very first collective report "timed out" at once
    for outcome in harness.run_ranks(2, _forward_with_timeout, None, "1e10", timeout=60):
        _assert_works_or_clear_value_error(outcome, "SYNCBN_TIMEOUT")
