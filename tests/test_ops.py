"""syncbn's operators (``syncbn::count_step_``, ``syncbn::update_running_stats_``,
``syncbn::all_reduce``): defined through ``syncbn._ops`` with one kernel for every backend.

``torch.library.opcheck`` checks what ``custom_op`` would have guaranteed: the schema
(mutated arguments declared, no aliasing), the fake implementation against the real one,
and the operator under AOT dispatch; the dispatch itself must not go through the Python
layers of ``custom_op`` (``syncbn._ops``: a few µs a call instead of 21–72 µs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import harness
import syncbn  # noqa: F401  (defines the operators)

STATE_CASES = {
    "count_step_": lambda: (torch.ops.syncbn.count_step_.default,
                            (torch.tensor(3),)),
    "update_running_stats_": lambda: (torch.ops.syncbn.update_running_stats_.default,
                                      (torch.zeros(6), torch.ones(6), torch.rand(6),
                                       torch.rand(6), torch.tensor([5.0], dtype=torch.float64),
                                       0.9, None)),
    "update_running_stats_-cumulative": lambda: (
        torch.ops.syncbn.update_running_stats_.default,
        (torch.zeros(6), torch.ones(6), torch.rand(6), torch.rand(6),
         torch.tensor([5.0], dtype=torch.float64), 1.0, torch.tensor(4))),
}


def _passed(report: dict[str, str]) -> bool:
    return all(value == "SUCCESS" for value in report.values())


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_operators_pass_opcheck(case: str) -> None:
    op, args = STATE_CASES[case]()
    report = torch.library.opcheck(op, args)
    assert _passed(report), report


def test_state_operators_change_their_arguments_as_declared() -> None:
    count = torch.tensor(3)
    version = count._version
    torch.ops.syncbn.count_step_.default(count)
    assert int(count) == 4 and count._version > version
    mean, var = torch.zeros(3), torch.ones(3)
    batch_mean, batch_var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 4.0, 4.0])
    total = torch.tensor([10.0], dtype=torch.float64)
    torch.ops.syncbn.update_running_stats_.default(mean, var, batch_mean, batch_var, total,
                                                   0.9, None)
    torch.testing.assert_close(mean, 0.1 * batch_mean)
    torch.testing.assert_close(var, 0.9 + 0.1 * batch_var)
    # a global count of 1 moves nothing (torch's BatchNorm would have raised before)
    torch.ops.syncbn.update_running_stats_.default(
        mean, var, batch_mean, batch_var, torch.tensor([1.0], dtype=torch.float64), 0.9, None)
    torch.testing.assert_close(mean, 0.1 * batch_mean)


def test_operators_are_not_wrapped_by_custom_op_and_are_pt2_compliant() -> None:
    """The point of ``syncbn._ops``: no ``custom_op`` definition (whose Python layers run
    around every call) stands behind the hot operators."""
    from torch._library.custom_ops import OPDEFS

    for name in ("count_step_", "update_running_stats_", "all_reduce"):
        assert f"syncbn::{name}" not in OPDEFS, name
        # as custom_op tags them: torch.compile with only_allow_pt2_compliant_ops keeps them
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.syncbn, name).default.tags


def _all_reduce_opcheck() -> dict[str, Any]:
    buffer = torch.arange(10, dtype=torch.float64) + dist.get_rank()
    op = torch.ops.syncbn.all_reduce.default
    args = (buffer, 0, str(dist.group.WORLD.group_name), "ops-test", "forward", 4, "float32",
            [6, 4], -1.0, False, 1e-5, 0.9, False)
    report = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    out = op(*args)
    return {"report": report, "out": out, "buffer": buffer}


def test_all_reduce_operator_passes_opcheck_and_sums_on_two_ranks() -> None:
    results = harness.run_ranks(2, _all_reduce_opcheck)
    for rank, result in enumerate(results):
        assert _passed(result["report"]), result["report"]
        # the input is left alone; the output sums every slot but the step key's
        torch.testing.assert_close(result["buffer"],
                                   torch.arange(10, dtype=torch.float64) + rank)
        torch.testing.assert_close(result["out"][:-1],
                                   2 * torch.arange(9, dtype=torch.float64) + 1)


READS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("cumulative", [False, True], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("total", [1.0, 5.0])
def test_update_operator_reads_nothing_under_the_accelerator_policy(
        cumulative: bool, total: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled update's device branch (N and the gate stay tensors) gives the host
    branch's values and reads nothing back (``syncbn._policy``)."""
    from syncbn import _policy

    def run(policy: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        mean, var = torch.linspace(-1, 1, 5), torch.linspace(1, 2, 5)
        batch_mean, batch_var = torch.linspace(3, 4, 5), torch.linspace(0.5, 0.7, 5)
        count = torch.tensor(4) if cumulative else None
        args = (mean, var, batch_mean, batch_var, torch.tensor([total], dtype=torch.float64),
                1.0 if cumulative else 0.9, count)
        reads: list[str] = []
        if not policy:
            torch.ops.syncbn.update_running_stats_.default(*args)
            return mean, var, reads
        with monkeypatch.context() as patch, _policy.force_accelerator_policy():
            for name in READS:
                original = getattr(torch.Tensor, name)

                def read(self: torch.Tensor, *a: Any, _name: str = name,
                         _original: Any = original, **k: Any) -> Any:
                    reads.append(_name)
                    return _original(self, *a, **k)

                patch.setattr(torch.Tensor, name, read)
            torch.ops.syncbn.update_running_stats_.default(*args)
        return mean, var, reads

    host_mean, host_var, _ = run(policy=False)
    device_mean, device_var, reads = run(policy=True)
    assert reads == [], reads
    torch.testing.assert_close(device_mean, host_mean)
    torch.testing.assert_close(device_var, host_var)
    if total == 1.0:  # one value in the global batch: nothing moves
        torch.testing.assert_close(host_mean, torch.linspace(-1, 1, 5))
