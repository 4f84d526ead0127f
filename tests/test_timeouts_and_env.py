"""Timeouts and the environment knobs: refused when they cannot mean what they say (issue 19).

Item 11: a timeout under 1 ms rounds to a zero ``timedelta``/gloo milliseconds, which
torch.distributed reads as *no* timeout. Measured before the fix (2 gloo ranks after a
warm-up step, rank 1 4 s late): ``timeout=1e-7`` waited 4.00 s and returned without an
error, and so did ``SYNCBN_TIMEOUT=1e-9``; ``timeout=1e-3`` raised after 0.002 s and
``timeout=0.5`` after 0.50 s. Now all three ways to set it (the layer, the variable, the
Paddle flavour) refuse it, and 1 ms itself is a real timeout.

Item 15: ``SYNCBN_DEBUG=2`` or ``=debug`` silently meant off; now refused, listing
what is accepted.

Item 14: under ``torch.compile`` both variables are read when the layer is traced;
the documented behaviour is checked here.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

import harness
import syncbn
from syncbn import _checks, _comm
from syncbn import paddle_compat as pnn
from syncbn._comm import DEBUG_ENV, TIMEOUT_ENV

_TOO_SHORT = (r"\(collective timeouts count whole milliseconds: a shorter one rounds to zero, "
              r"which torch\.distributed reads as no timeout at all\)")


# --- item 11: the layer argument, the variable, the Paddle flavour ---------------------------


@pytest.mark.parametrize("timeout", [1e-7, 1e-9, 5e-4, 0.000999])
def test_layer_refuses_a_timeout_below_one_millisecond(timeout: float) -> None:
    with pytest.raises(ValueError, match=(
            rf"SyncBatchNorm expected 0\.001 <= timeout <= 1e\+07 seconds, got {timeout} "
            rf"{_TOO_SHORT}; pass e\.g\. timeout=30")):
        syncbn.SyncBatchNorm(3, timeout=timeout)


@pytest.mark.parametrize("timeout", [1e-3, 0.25, 1e7])
def test_timeouts_from_one_millisecond_are_accepted(timeout: float) -> None:
    assert syncbn.SyncBatchNorm(3, timeout=timeout).timeout == timeout
    assert pnn.SyncBatchNorm(3, timeout=timeout).timeout == timeout


@pytest.mark.parametrize("text", ["1e-9", "1e-7", "0.0005"])
def test_syncbn_timeout_variable_refuses_below_one_millisecond(
        monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, text)
    message = (rf"{TIMEOUT_ENV} must be a number of seconds from 0\.001 to 1e\+07, got "
               rf"'{text}' {_TOO_SHORT}; set e\.g\. {TIMEOUT_ENV}=60, or unset it")
    with pytest.raises(ValueError, match=message):
        _comm.env_timeout()
    layer = syncbn.SyncBatchNorm(3)  # read at the training forward, before anything counts
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0 and layer._syncbn_calls == 0


@pytest.mark.parametrize(("text", "seconds"), [("0.001", 1e-3), (" 2.5 ", 2.5), ("", None)])
def test_syncbn_timeout_variable_accepts_from_one_millisecond(
        monkeypatch: pytest.MonkeyPatch, text: str, seconds: float | None) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, text)
    assert _comm.env_timeout() == seconds


@pytest.mark.parametrize("timeout", [1e-7, 5e-4, 1e8])
def test_paddle_flavour_refuses_a_timeout_it_cannot_keep(timeout: float) -> None:
    hint = f" {_TOO_SHORT}" if timeout < 1 else ""
    with pytest.raises(ValueError, match=(
            rf"SyncBatchNorm: expected timeout to be a positive number of seconds \(0\.001 to "
            rf"1e\+07\) or None \(the group's own timeout\), got {timeout!r}{hint}\. Fix: pass "
            r"e\.g\. timeout=60\.")):
        pnn.SyncBatchNorm(3, timeout=timeout)


def test_why_the_bound_is_one_millisecond() -> None:
    assert timedelta(seconds=1e-7) == timedelta(0)  # what c10d got before: no timeout
    assert timedelta(seconds=_checks.MIN_TIMEOUT_S) == timedelta(milliseconds=1)  # gloo's unit


STRAGGLE_S = 1.5
"""How late rank 1 joins the collective."""


def _straggler() -> dict[str, Any]:
    """Rank 0 waits at most 1 ms for rank 1, which is STRAGGLE_S late (a fresh subgroup:
    the timed-out group is aborted, the pool's world group stays usable)."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=3.0))
    rank = dist.get_rank()
    layer = syncbn.SyncBatchNorm(3, process_group=group)
    layer(torch.randn(4, 3))  # both ranks on time: the group's connections are made
    layer.timeout = 1e-3 if rank == 0 else None
    if rank == 1:
        time.sleep(STRAGGLE_S)
    start = time.monotonic()
    try:
        layer(torch.randn(4, 3))
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error),
                "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_one_millisecond_is_a_real_timeout(record_property: Any) -> None:
    """The smallest accepted timeout does not round to "no timeout": rank 0 raises long
    before the straggler arrives."""
    waiting, _late = harness.run_ranks(2, _straggler)
    assert waiting["error"] == "SyncBatchNormError", waiting
    assert "did not complete within 0.001 s" in waiting["message"], waiting
    assert waiting["seconds"] < STRAGGLE_S / 2, waiting
    record_property("seconds_to_error", round(waiting["seconds"], 4))


# --- item 15: SYNCBN_DEBUG ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "on"), [
    ("1", True), ("true", True), ("YES", True), (" On ", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False), ("  ", False),
])
def test_syncbn_debug_accepted_values(monkeypatch: pytest.MonkeyPatch, text: str,
                                      on: bool) -> None:
    monkeypatch.setenv(DEBUG_ENV, text)
    assert _comm.env_debug() is on


def test_syncbn_debug_unset_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert _comm.env_debug() is False


@pytest.mark.parametrize("text", ["2", "debug", "enable", "y"])
def test_syncbn_debug_unknown_values_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                 text: str) -> None:
    """Before: each of these silently meant off."""
    monkeypatch.setenv(DEBUG_ENV, text)
    message = (rf"{DEBUG_ENV} must be one of 1, true, yes, on \(debug checks on\) or 0, false, "
               rf"no, off or empty \(off\), in any letter case, got '{text}'; set {DEBUG_ENV}=1, "
               r"or unset it")
    with pytest.raises(ValueError, match=message):
        _comm.env_debug()
    layer = syncbn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 3))
    assert int(layer.num_batches_tracked) == 0 and layer._syncbn_calls == 0
    layer.debug = False  # the layer's own setting wins: the variable is not read
    layer(torch.randn(4, 3))


# --- item 14: read when torch.compile traces the layer -------------------------------------


def test_compiled_layers_read_the_variables_when_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    """As documented (README, modules.SyncBatchNorm): set after the first compiled step,
    the variables are not read again until torch._dynamo.reset() and a new trace."""
    for name in (DEBUG_ENV, TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    torch._dynamo.reset()
    layer = syncbn.SyncBatchNorm(3)
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(4, 3)
    compiled(x)
    monkeypatch.setenv(DEBUG_ENV, "not-a-value")  # a value every eager step refuses
    monkeypatch.setenv(TIMEOUT_ENV, "1e-9")
    compiled(x)  # the traced graph runs: the variables were read at trace time
    assert int(layer.num_batches_tracked) == 2
    monkeypatch.delenv(DEBUG_ENV)
    torch._dynamo.reset()  # a new trace reads them again
    with pytest.raises(ValueError, match=rf"{TIMEOUT_ENV} must be a number of seconds"):
        compiled(x)
    torch._dynamo.reset()

