"""Faults on real gloo groups: each one a clear error within a bounded time, never a hang.

Every fault runs on gloo ranks with short, explicit timeouts, and every test
asserts the error type, what the message names (layer, phase, call, C, dtype,
shape, and the ranks where they can be known) and the measured time to the
error, which it also records (``record_property``; see docs/reliability.md and
``pytest tests/test_faults.py --junitxml=faults.xml -o junit_family=xunit1``).

Isolation. A fault that leaves a collective half-done poisons the group it ran
on, so each fault gets a fresh subgroup of the pooled ranks, created with its
own gloo timeout (``dist.new_group(..., timeout=...)``); the world group of the
pool stays in step and the pool is reused. Faults that kill a process (a rank
that exits; gloo aborting on a size mismatch) get a dedicated pool, closed after.

Rank-side functions catch the error they provoke and return what happened, so
the parent sees every rank's outcome, not only the first failure.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import harness
import syncbn
from syncbn._comm import DEBUG_ENV, TIMEOUT_ENV

LAYER_TIMEOUT_S = 2.0
"""The layers' ``timeout=``: how long a rank waits for one collective."""
GROUP_TIMEOUT_S = 3.0
"""gloo's own timeout of each fresh subgroup (the fallback when the layer sets none)."""
SLACK_S = 3.0
"""Allowance over a timeout for scheduling on a loaded 2-core machine."""
PROMPT_S = 1.5
"""Bound for errors that need no timeout (a mismatch seen in debug mode, a dead peer)."""
PATIENT_TIMEOUT_S = 10.0
"""The layers' timeout where the error must come from elsewhere (a closed connection)."""
CHANNELS = 6
BATCH = 5

Outcome = dict[str, Any]
"""What one rank saw: ``error`` (type name or None), ``message``, ``seconds`` to the error."""


# --- rank side ------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables in this rank for a while."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fresh_group() -> Any:
    """A new group of every rank with gloo timeout GROUP_TIMEOUT_S (a world collective)."""
    return dist.new_group(list(range(dist.get_world_size())),
                          timeout=timedelta(seconds=GROUP_TIMEOUT_S))


def _net(group: Any, channels: int = CHANNELS, layers: int = 1, *,
         timeout: float | None = LAYER_TIMEOUT_S, debug: bool | None = False) -> nn.Sequential:
    """Linear → BN (→ ReLU → Linear → BN): the SyncBatchNorm layers are named '1' and '4'."""
    torch.manual_seed(0)
    modules: list[nn.Module] = [nn.Linear(4, channels), nn.BatchNorm1d(channels)]
    for _ in range(layers - 1):
        modules += [nn.ReLU(), nn.Linear(channels, channels), nn.BatchNorm1d(channels)]
    model = syncbn.convert_sync_batchnorm(nn.Sequential(*modules), group)
    for module in model.modules():
        if isinstance(module, syncbn.SyncBatchNorm):
            module.timeout = timeout  # the knob under test: plain attributes, set any time
            module.debug = debug
    assert isinstance(model, nn.Sequential)
    return model


def _input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(dist.get_rank()),
                       dtype=dtype)


def _skip_one_layer(timeout_source: str) -> Outcome:
    """Rank 1 takes a branch that skips the model's only SyncBatchNorm (default mode)."""
    group = _fresh_group()
    layer_timeout = LAYER_TIMEOUT_S if timeout_source == "layer" else None
    env_timeout = str(LAYER_TIMEOUT_S) if timeout_source == "env" else None
    with _env(**{TIMEOUT_ENV: env_timeout}):
        model = _net(group, timeout=layer_timeout)
        skip = dist.get_rank() == 1  # stands for a data-dependent branch

        def step() -> None:
            hidden = model[0](_input())
            out = hidden if skip else model[1](hidden)
            out.sum().backward()

        return harness.attempt(step)


def _skip_first_of_two(debug: bool) -> Outcome:
    """Rank 1 skips layer '1' and goes on to layer '4' (same C, so equal buffer sizes).

    Forward only: in default mode the ranks' next collectives would differ in
    size, and gloo aborts the process on that (see the channel-mismatch test).
    """
    group = _fresh_group()
    model = _net(group, layers=2, debug=debug)
    skip = dist.get_rank() == 1

    def step() -> None:
        hidden = model[0](_input())
        if not skip:
            hidden = model[1](hidden)
        out = model[4](model[3](model[2](hidden)))
        if debug:
            out.sum().backward()

    return harness.attempt(step)


def _one_rank_in_eval(debug: bool) -> Outcome:
    group = _fresh_group()
    model = _net(group, debug=debug)
    if dist.get_rank() == 1:
        model.eval()  # e.g. a validation branch taken on one rank only
    return harness.attempt(lambda: model(_input()).sum().backward())


def _channels_differ() -> Outcome:
    """Rank r builds its layer with 4 + r channels (e.g. a config that differs per rank)."""
    model = _net(_fresh_group(), channels=4 + dist.get_rank(), debug=True)
    return harness.attempt(lambda: model(_input()).sum().backward())


def _sizes_differ(kind: str) -> Outcome:
    """Default mode: ``channels`` pairs collectives of different sizes (2·4+2 vs 2·5+2
    values); ``calls`` pairs rank 0's second forward with rank 1's backward (both 2C+2
    values, so the step keys catch it)."""
    channels = 4 + dist.get_rank() if kind == "channels" else CHANNELS
    model = _net(None, channels=channels, timeout=PATIENT_TIMEOUT_S)
    times = 2 if kind == "calls" and dist.get_rank() == 0 else 1

    def step() -> None:
        hidden = model[0](_input())
        for _ in range(times):
            hidden = model[1](hidden)
        hidden.sum().backward()

    return harness.attempt(step)


def _dtypes_differ(debug: bool) -> dict[str, Any]:
    """Rank 0 feeds float32, rank 1 bfloat16 (e.g. one rank casts its batch to save memory)."""
    group = _fresh_group()
    rank = dist.get_rank()
    layer = syncbn.SyncBatchNorm(3, process_group=group, timeout=LAYER_TIMEOUT_S, debug=debug)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x_all = _dtype_batch()
    x = x_all[:3].float() if rank == 0 else x_all[3:].bfloat16()
    out: list[torch.Tensor] = []
    outcome = harness.attempt(lambda: out.append(layer(x).detach()))
    return {**outcome, "y": out[0] if out else None,
            "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone()}


def _dtype_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(21)
    return torch.randn(8, 3, 5, generator=gen, dtype=torch.float64) * 2 + 1


def _calls_differ(debug: bool) -> Outcome:
    """Rank 0 runs the layer twice in the step (a data-dependent loop), rank 1 once."""
    group = _fresh_group()
    with _env(**{DEBUG_ENV: "1" if debug else None}):
        model = _net(group, debug=None)  # debug from the environment
        times = 2 if dist.get_rank() == 0 else 1

        def step() -> None:
            hidden = model[0](_input())
            for _ in range(times):
                hidden = model[1](hidden)
            if debug:
                hidden.sum().backward()

        return harness.attempt(step)


def _rank_dies(dying_rank: int) -> Outcome:
    """Three training steps; ``dying_rank`` exits between forward and backward of the third."""
    model = _net(None, timeout=PATIENT_TIMEOUT_S)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        out = model(_input())
        if step == 2 and dist.get_rank() == dying_rank:
            os._exit(3)  # the process dies: no exception, no cleanup, sockets closed
        outcome = harness.attempt(lambda o=out: o.sum().backward())
        if outcome["error"]:
            return {**outcome, "step": step}
        opt.step()
        opt.zero_grad()
    return {"error": None, "message": "", "seconds": 0.0, "step": 3}


def _destroyed_subgroup() -> dict[str, Any]:
    group = dist.new_group([0, 1])
    layer = syncbn.SyncBatchNorm(3, process_group=group)
    layer(torch.randn(4, 3))  # works while the group lives
    dist.destroy_process_group(group)
    outcome = harness.attempt(lambda: layer(torch.randn(4, 3)))
    layer.eval()  # eval never communicates, so it needs no group
    return {**outcome, "eval_shape": tuple(layer(torch.randn(2, 3)).shape)}


# --- parent side ----------------------------------------------------------------------------


def _run_allowing_deaths(pool: harness.DistPool, fn: Callable[..., Any], *args: Any,
                         timeout: float) -> dict[int, Any]:
    """Like ``DistPool.run``, but a rank whose process dies is an outcome, not a failure.

    Returns, by rank, the function's return value, or ``{"died": exitcode}``.
    """
    payload = pickle.dumps((fn, args, {}))
    for task_queue in pool._tasks:
        task_queue.put(payload)
    outcomes: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < pool.world_size and time.monotonic() < deadline:
        try:
            rank, status, value = pool._results.get(timeout=0.2)
        except queue.Empty:
            for rank, proc in enumerate(pool._procs):
                if rank not in outcomes and not proc.is_alive():
                    outcomes[rank] = {"died": proc.exitcode}
            continue
        if status != "ok":
            raise harness.RankError(f"rank {rank} raised:\n{value}")
        outcomes[rank] = pickle.loads(value)
    missing = sorted(set(range(pool.world_size)) - set(outcomes))
    if missing:
        raise harness.RankTimeoutError(f"ranks {missing} neither answered nor died in {timeout} s")
    return outcomes


def _warm_up() -> int:
    """Import this module in the rank (the first task does), pay the first synchronized
    step's one-off costs (several seconds on a loaded machine, which would otherwise count
    against the timeouts under test), and line the ranks up."""
    layer = syncbn.SyncBatchNorm(3, timeout=PATIENT_TIMEOUT_S, debug=True)
    layer(torch.randn(4, 3, requires_grad=True)).sum().backward()
    layer.debug = False
    layer(torch.randn(4, 3, requires_grad=True)).sum().backward()
    dist.barrier()
    return dist.get_rank()


@pytest.fixture(scope="module", autouse=True)
def _warm_pool() -> None:
    """Every rank of the shared 2-rank pool has run a synchronized step before a fault."""
    harness.run_ranks(2, _warm_up)


@pytest.fixture
def dedicated_pool() -> Iterator[Callable[[int], harness.DistPool]]:
    """Pools of their own for faults that kill a rank; every one is closed after the test.

    Each is warmed up first, so that no rank is still importing when the fault starts.
    """
    pools: list[harness.DistPool] = []

    def make(world_size: int) -> harness.DistPool:
        pools.append(harness.DistPool(world_size, group_timeout_s=5.0))
        pools[-1].run(_warm_up, timeout=60.0)
        return pools[-1]

    yield make
    for pool in pools:
        for proc in pool._procs:  # its group is broken: no orderly shutdown to wait for
            if proc.is_alive():
                proc.kill()
        pool.close()


def _site(layer: str, phase: str, call: int | str, channels: int, dtype: str,
          shape: str) -> str:
    """A regex of the description every collective error starts with (CallSite.describe);
    ``phase`` and ``call`` may themselves be regexes."""
    label = layer if layer.startswith("SyncBatchNorm(") else f"SyncBatchNorm '{layer}'"
    if phase == "forward" and call == 0:  # a fresh layer's first collective exchanges its shift
        phase = "(?:shift|forward)"
    return (re.escape(f"{label} (") + phase + re.escape(", call ") + str(call)
            + re.escape(f", C={channels}, {dtype}, input {shape})"))


def _row(site: str, eps: str = "1e-05", momentum: str = "0.1") -> str:
    """A rank's line in a debug-mode disagreement: its description, then eps and momentum."""
    return site + re.escape(f" eps={eps} momentum={momentum}")


def _record(record_property: Callable[[str, object], None], seconds: float) -> None:
    record_property("seconds_to_error", f"{seconds:.3g}")


def _assert_waited(outcome: Outcome, wait_s: float) -> None:
    """The rank waited its timeout, not less (it really was a wait), and not much more."""
    assert wait_s * 0.95 <= outcome["seconds"] < wait_s + SLACK_S, outcome


# --- 1. a rank skips a SyncBatchNorm call -----------------------------------------------


@pytest.mark.parametrize("timeout_source", ["layer", "env", "group"],
                         ids=["layer-timeout", "SYNCBN_TIMEOUT", "group-timeout"])
def test_skipped_layer_raises_on_the_waiting_rank(
    timeout_source: str, record_property: Callable[[str, object], None]
) -> None:
    waiting, skipping = harness.run_ranks(2, _skip_one_layer, timeout_source)
    assert skipping["error"] is None  # the skipping rank cannot know
    assert waiting["error"] == "SyncBatchNormError", waiting
    message = waiting["message"]
    assert re.match(_site("1", "forward", 0, CHANNELS, "float32", f"({BATCH}, {CHANNELS})"),
                    message), message
    wait_s = GROUP_TIMEOUT_S if timeout_source == "group" else LAYER_TIMEOUT_S
    # a layer timeout is reported as such; gloo's own timeout arrives as a failure
    waited = "failed after" if timeout_source == "group" else (
        f"did not complete within {LAYER_TIMEOUT_S:g} s")
    # the message names the collective: the once-per-group mode check (an all_reduce) or
    # the sum (an all_gather: gloo groups of up to 4 ranks)
    assert re.search(f"the (all_reduce|all_gather) over 2 ranks {waited}", message), message
    assert "skipped this layer" in message and f"{DEBUG_ENV}=1" in message  # the hint
    _assert_waited(waiting, wait_s)
    _record(record_property, waiting["seconds"])


def test_skipped_layer_in_debug_mode_names_both_ranks_at_once(
    record_property: Callable[[str, object], None]
) -> None:
    results = harness.run_ranks(2, _skip_first_of_two, True)
    site0 = _site("1", "forward", 0, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
    site1 = _site("4", "forward", 0, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
    for outcome in results:  # every rank raises the same error, naming both layers
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(rf"ranks disagree on layer at a SyncBatchNorm collective: "
                        rf"rank 0: {_row(site0)}; rank 1: {_row(site1)}\.",
                        outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome
    assert results[0]["message"] == results[1]["message"]
    _record(record_property, max(r["seconds"] for r in results))


def test_default_mode_detects_a_skip_paired_with_an_equal_sized_collective() -> None:
    results = harness.run_ranks(2, _skip_first_of_two, False)
    for outcome in results:
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert "the ranks are out of step" in outcome["message"], outcome
        assert outcome["seconds"] < PROMPT_S, outcome


# --- 2. one rank in eval while the others train ------------------------------------------


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_one_rank_in_eval_is_a_timeout_naming_the_layer(
    debug: bool, record_property: Callable[[str, object], None]
) -> None:
    training, evaluating = harness.run_ranks(2, _one_rank_in_eval, debug)
    assert evaluating["error"] is None  # eval never communicates
    assert training["error"] == "SyncBatchNormError", training
    message = training["message"]
    assert re.match(_site("1", "forward", 0, CHANNELS, "float32", f"({BATCH}, {CHANNELS})"),
                    message), message
    # a fresh group's first collective is preceded by the once-per-group debug-mode check
    whats = ("the debug-mode check", "the debug fingerprint exchange", "the all_gather over 2")
    assert any(w in message for w in whats), message
    assert "eval mode while the others train" in message, message
    _assert_waited(training, LAYER_TIMEOUT_S)
    _record(record_property, training["seconds"])


# --- 3. ranks disagree on the channels, the dtype, the number of calls ------------------


def test_channel_mismatch_in_debug_mode_names_ranks_and_shapes(
    record_property: Callable[[str, object], None]
) -> None:
    results = harness.run_ranks(2, _channels_differ)
    site0 = _site("1", "forward", 0, 4, "float32", f"({BATCH}, 4)")
    site1 = _site("1", "forward", 0, 5, "float32", f"({BATCH}, 5)")
    for outcome in results:
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(rf"ranks disagree on channels at a SyncBatchNorm collective: "
                        rf"rank 0: {_row(site0)}; rank 1: {_row(site1)}\.",
                        outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome
    _record(record_property, max(r["seconds"] for r in results))


def test_size_mismatch_in_default_mode_aborts_a_rank_and_the_others_raise(
    dedicated_pool: Callable[[int], harness.DistPool],
    record_property: Callable[[str, object], None],
) -> None:
    """Paired all_reduces of different sizes: gloo terminates the process that receives
    more data than it expects (SIGABRT, "Received data size doesn't match expected size");
    every survivor's collective then fails on the closed connection. Never a hang."""
    pool = dedicated_pool(2)
    start = time.monotonic()
    outcomes = _run_allowing_deaths(pool, _sizes_differ, "channels", timeout=30.0)
    elapsed = time.monotonic() - start
    died = {r: o["died"] for r, o in outcomes.items() if "died" in o}
    survivors = {r: o for r, o in outcomes.items() if "died" not in o}
    assert len(died) == 1 and set(died.values()) == {-signal.SIGABRT}, outcomes
    for rank, outcome in survivors.items():
        channels = 4 + rank
        call = "0"
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(_site("1", "(shift|forward|backward)", call, channels, "float32",
                              f"({BATCH}, {channels})"), outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome  # no waiting for the timeout
    assert elapsed < PROMPT_S + SLACK_S
    _record(record_property, max([o["seconds"] for o in survivors.values()], default=elapsed))
    record_property("ranks_killed", sorted(died))
    record_property("survivor_phase", [re.search(r"\((shift|forward|backward),", o["message"])[1]
                                       for o in survivors.values()])


def test_extra_forward_meeting_a_backward_is_out_of_step_on_every_rank(
    record_property: Callable[[str, object], None]
) -> None:
    """Default mode: rank 0's second forward meets rank 1's backward; both buffers are
    2C+2 values, so nothing aborts and the step keys make every rank raise at once."""
    results = harness.run_ranks(2, _sizes_differ, "calls")
    for rank, phase, call in ((0, "forward", 1), (1, "backward", 0)):
        outcome = results[rank]
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(_site("1", phase, call, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
                        + ": the ranks are out of step", outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome
    _record(record_property, max(r["seconds"] for r in results))


def test_dtype_mismatch_in_debug_mode_names_ranks_and_dtypes(
    record_property: Callable[[str, object], None]
) -> None:
    results = harness.run_ranks(2, _dtypes_differ, True)
    site0 = _site("SyncBatchNorm(3)", "forward", 0, 3, "float32", "(3, 3, 5)")
    site1 = _site("SyncBatchNorm(3)", "forward", 0, 3, "bfloat16", "(5, 3, 5)")
    for outcome in results:
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(rf"ranks disagree on dtype at a SyncBatchNorm collective: "
                        rf"rank 0: {_row(site0)}; rank 1: {_row(site1)}\.",
                        outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome
    _record(record_property, max(r["seconds"] for r in results))


def test_dtype_mismatch_in_default_mode_is_harmless() -> None:
    """Both collectives are float64, so mixed dtypes exchange equal buffers and the merged
    statistics are exact: each rank's output equals the float64 oracle on the global batch
    (to its own dtype's precision), and the running statistics are bitwise identical."""
    results = harness.run_ranks(2, _dtypes_differ, False)
    assert [r["error"] for r in results] == [None, None], results
    x_all = _dtype_batch()
    global_batch = torch.cat([x_all[:3].float().double(), x_all[3:].bfloat16().double()])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    bias = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3).double()
    want = torch.nn.functional.batch_norm(global_batch, running_mean, running_var, weight, bias,
                                          True, 0.1, 1e-5)
    torch.testing.assert_close(results[0]["y"].double(), want[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1]["y"].double(), want[3:], rtol=1.6e-2, atol=2e-2)
    for name, expect in (("running_mean", running_mean), ("running_var", running_var)):
        assert torch.equal(results[0][name], results[1][name]), name
        torch.testing.assert_close(results[0][name].double(), expect, rtol=1e-6, atol=1e-6)


def test_call_count_mismatch_in_debug_mode_names_the_phases(
    record_property: Callable[[str, object], None]
) -> None:
    """Debug mode from SYNCBN_DEBUG=1: rank 0's second forward meets rank 1's backward."""
    results = harness.run_ranks(2, _calls_differ, True)
    site0 = _site("1", "forward", 1, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
    site1 = _site("1", "backward", 0, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
    for outcome in results:
        assert outcome["error"] == "SyncBatchNormError", outcome
        assert re.match(rf"ranks disagree on phase at a SyncBatchNorm collective: "
                        rf"rank 0: {_row(site0)}; rank 1: {_row(site1)}\.",
                        outcome["message"]), outcome
        assert outcome["seconds"] < PROMPT_S, outcome
    _record(record_property, max(r["seconds"] for r in results))


def test_call_count_mismatch_in_default_mode_times_out_on_the_extra_call(
    record_property: Callable[[str, object], None]
) -> None:
    extra, single = harness.run_ranks(2, _calls_differ, False)
    assert single["error"] is None
    assert extra["error"] == "SyncBatchNormError", extra
    assert re.match(_site("1", "forward", 1, CHANNELS, "float32", f"({BATCH}, {CHANNELS})"),
                    extra["message"]), extra
    assert "called it a different number of times" in extra["message"]
    _assert_waited(extra, LAYER_TIMEOUT_S)
    _record(record_property, extra["seconds"])


# --- 4. a rank dies in the middle of training -------------------------------------------


def test_dead_rank_makes_the_survivors_raise_promptly(
    dedicated_pool: Callable[[int], harness.DistPool],
    record_property: Callable[[str, object], None],
) -> None:
    pool = dedicated_pool(3)
    outcomes = _run_allowing_deaths(pool, _rank_dies, 1, timeout=30.0)
    assert outcomes[1] == {"died": 3}
    for rank in (0, 2):
        outcome = outcomes[rank]
        assert outcome["error"] == "SyncBatchNormError" and outcome["step"] == 2, outcome
        assert re.match(_site("1", "backward", 2, CHANNELS, "float32", f"({BATCH}, {CHANNELS})")
                        + ": the all_gather over 3 ranks failed", outcome["message"]), outcome
        assert "or died" in outcome["message"]
        # the closed connection is seen at once: no waiting for the (10 s) timeout
        assert outcome["seconds"] < PROMPT_S, outcome
    _record(record_property, max(outcomes[r]["seconds"] for r in (0, 2)))


# --- 5. a destroyed group, or one without an initialized default group ------------------


def test_destroyed_group_is_a_clear_error_and_eval_still_works(
    record_property: Callable[[str, object], None]
) -> None:
    results = harness.run_ranks(2, _destroyed_subgroup)
    for outcome in results:
        assert outcome["error"] == "ValueError", outcome
        assert outcome["message"].startswith(
            "SyncBatchNorm(3)'s process_group is not registered with torch.distributed (it was "
            "destroyed"), outcome
        assert "torch.distributed.new_group(ranks)" in outcome["message"]  # the fix
        assert outcome["seconds"] < PROMPT_S
        assert outcome["eval_shape"] == (2, 3)
    _record(record_property, max(r["seconds"] for r in results))


def test_group_without_any_initialized_default_group_is_a_clear_error() -> None:
    """A ProcessGroup built by hand, with no init_process_group in this process."""
    assert not dist.is_initialized()
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    layer = syncbn.SyncBatchNorm(3, process_group=group)
    x = torch.randn(4, 3)
    expected = (r"^SyncBatchNorm(\(3\))? got a process_group, but the default process group is not "
                r"initialized \(or was destroyed\); call torch.distributed.init_process_group\(\)")
    with pytest.raises(ValueError, match=expected):
        layer(x)
    with pytest.raises(ValueError, match=expected):
        syncbn.functional.sync_batch_norm(x, None, None, training=True, process_group=group)
    layer.eval()
    assert layer(x).shape == (4, 3)  # eval needs no group


def test_backend_object_instead_of_a_group_is_a_type_error() -> None:
    """``ProcessGroupGloo(store, rank, size)`` (old tutorials) is a backend, not a group."""
    backend = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    with pytest.raises(TypeError, match=r"torch.distributed.ProcessGroup or None, got "
                                        r"ProcessGroupGloo; create one with "
                                        r"torch.distributed.new_group\(ranks\)"):
        syncbn.SyncBatchNorm(3, process_group=backend)
