"""Rank-side programs and the global-batch oracle for the distributed tests.

A :class:`Case` describes one synchronized training run. Every rank and the
oracle derive the same global batches from the seed; rank ``r`` of a group
takes rows ``[offset_r, offset_r + sizes[r])`` of its group's batch. The oracle
is plain ``torch.nn.BatchNorm{1,2,3}d`` on the concatenated global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncbn


@dataclasses.dataclass(frozen=True)
class Case:
    sizes: tuple[int, ...]  # batch size of each rank of a group, in group-rank order
    channels: int = 3
    spatial: tuple[int, ...] = (4, 5)
    dtype: str = "float64"
    channels_last: bool = False
    affine: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    eps: float = 1e-5
    steps: int = 2
    seed: int = 0
    groups: tuple[tuple[int, ...], ...] | None = None  # None: the whole world

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def group_of(self, rank: int) -> tuple[int, tuple[int, ...]]:
        """(index of the group, its ranks) of a global rank."""
        for index, ranks in enumerate(self.groups or (tuple(range(len(self.sizes))),)):
            if rank in ranks:
                return index, ranks
        raise ValueError(f"rank {rank} is in no group of {self.groups}")


def batch(case: Case, group: int, step: int) -> tuple[Tensor, Tensor]:
    """The global input and upstream gradient of ``group`` at ``step`` (float64)."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + group * 100 + step)
    shape = (sum(case.sizes), case.channels, *case.spatial)
    scale = torch.rand(case.channels, generator=gen, dtype=torch.float64) * 2 + 0.5
    offset = torch.randn(case.channels, generator=gen, dtype=torch.float64) * 3
    view = (1, case.channels) + (1,) * len(case.spatial)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * scale.view(view) + offset.view(view)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, dy


def init_state(case: Case) -> dict[str, Tensor]:
    """Initial parameters and buffers, different from the defaults so that they matter."""
    gen = torch.Generator().manual_seed(case.seed + 7)
    c = case.channels
    return {
        "weight": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    }


def _load(module: nn.Module, case: Case) -> None:
    state = init_state(case)
    with torch.no_grad():
        for name, value in state.items():
            target = getattr(module, name)
            if target is not None:
                target.copy_(value)


def _layout(x: Tensor, case: Case) -> Tensor:
    x = x.to(case.torch_dtype)
    if case.channels_last:
        fmt = torch.channels_last if case.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _record(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(module, name, None)
        out[name] = None if value is None else value.detach().clone()
    return out


def make_groups(case: Case) -> Any:
    """Create every subgroup on every rank (collective); return this rank's."""
    if case.groups is None:
        return None
    mine = None
    for ranks in case.groups:
        group = dist.new_group(list(ranks))
        if dist.get_rank() in ranks:
            mine = group
    return mine


def run_syncbn(case: Case) -> dict[str, Any]:
    """Rank side: train ``case.steps`` steps with syncbn.SyncBatchNorm, then one eval step."""
    rank = dist.get_rank()
    group = make_groups(case)
    group_index, ranks = case.group_of(rank)
    position = ranks.index(rank)
    start = sum(case.sizes[:position])
    rows = slice(start, start + case.sizes[position])
    module = syncbn.SyncBatchNorm(
        case.channels, eps=case.eps, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, process_group=group,
        dtype=case.torch_dtype,
    )
    _load(module, case)
    return {**train_then_eval(module, case, group_index, rows), "group": group_index,
            "rows": rows}


def oracle(case: Case, group_index: int) -> dict[str, Any]:
    """Plain torch BatchNorm on the global batch of one group, same steps."""
    cls: Callable[..., nn.Module] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                                     5: nn.BatchNorm3d}[case.ndim]
    module = cls(case.channels, eps=case.eps, momentum=case.momentum, affine=case.affine,
                 track_running_stats=case.track_running_stats, dtype=case.torch_dtype)
    _load(module, case)
    return train_then_eval(module, case, group_index, slice(None))


def train_then_eval(module: nn.Module, case: Case, group_index: int,
                    rows: slice) -> dict[str, Any]:
    """``case.steps`` training steps on ``rows`` of the group's batches, then one eval step.

    The same program for a rank's syncbn layer (its rows) and the oracle (all rows).
    """
    steps = []
    for step in range(case.steps):
        x_all, dy_all = batch(case, group_index, step)
        x = _layout(x_all[rows], case).requires_grad_()
        y = module(x)
        y.backward(_layout(dy_all[rows], case))
        steps.append({
            "y": y.detach().clone(), "dx": x.grad.clone(),
            "is_channels_last": y.is_contiguous(memory_format=torch.channels_last)
            if case.ndim == 4 else None,
            "dweight": None if module.weight is None else module.weight.grad.clone(),
            "dbias": None if module.bias is None else module.bias.grad.clone(),
        })
        module.zero_grad()
    module.eval()
    x_eval, _ = batch(case, group_index, case.steps)
    with torch.no_grad():
        y_eval = module(_layout(x_eval[rows], case))
    return {"steps": steps, "eval": y_eval, **_record(module)}


def tolerances(case: Case) -> dict[str, float]:
    if case.dtype == "float64":
        return {"rtol": 1e-10, "atol": 1e-10}
    if case.dtype == "float32":
        return {"rtol": 1e-4, "atol": 1e-4}
    return {"rtol": 2e-2, "atol": 5e-2}


def assert_matches_oracle(case: Case, results: list[dict[str, Any]]) -> None:
    """Outputs, input grads, summed weight/bias grads, running stats: syncbn == oracle."""
    tol = tolerances(case)
    by_group: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        by_group.setdefault(result["group"], []).append(result)
    for group_index, members in by_group.items():
        members.sort(key=lambda r: r["rows"].start)
        expect = oracle(case, group_index)
        for step, want in enumerate(expect["steps"]):
            got = [m["steps"][step] for m in members]
            where = f"group {group_index}, step {step}"
            torch.testing.assert_close(torch.cat([g["y"] for g in got]), want["y"], **tol,
                                       msg=lambda m, w=where: f"output, {w}: {m}")
            torch.testing.assert_close(torch.cat([g["dx"] for g in got]), want["dx"], **tol,
                                       msg=lambda m, w=where: f"input grad, {w}: {m}")
            for name in ("dweight", "dbias"):
                if want[name] is None:
                    assert all(g[name] is None for g in got)
                    continue
                total = torch.stack([g[name] for g in got]).sum(0)
                torch.testing.assert_close(total, want[name], **tol,
                                           msg=lambda m, n=name, w=where: f"{n}, {w}: {m}")
        if case.track_running_stats:
            torch.testing.assert_close(torch.cat([m["eval"] for m in members]), expect["eval"],
                                       **tol)
        else:  # as torch: eval without running stats uses each rank's own batch, unsynchronized
            x_eval, _ = batch(case, group_index, case.steps)
            for member in members:
                own = torch.nn.functional.batch_norm(
                    _layout(x_eval[member["rows"]], case), None, None,
                    *[init_state(case)[k] if case.affine else None for k in ("weight", "bias")],
                    True, 0.0, case.eps,
                )
                torch.testing.assert_close(member["eval"], own, **tol)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            for member in members:
                if expect[name] is None:
                    assert member[name] is None
                    continue
                torch.testing.assert_close(member[name], expect[name], **tol,
                                           msg=lambda m, n=name: f"{n}: {m}")
                # every rank ends with bitwise identical statistics
                assert torch.equal(member[name], members[0][name]), name
