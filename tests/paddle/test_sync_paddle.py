"""``paddle_compat.SyncBatchNorm`` on real gloo groups == Paddle's formulas on the global batch.

Few, wide runs: each world size runs every case in one task. The oracle
(``paddle_oracle.reference``) is the plain formula on the concatenated batch in
float64 with Paddle's update rule (float32 momentum/epsilon, biased variance),
plus Paddle's two edge rules: a global batch of one value per channel is returned
unchanged, and an empty global batch leaves the statistics alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist
from paddle_oracle import reference
from torch import Tensor

import harness
from syncbn.paddle_compat import BatchNorm1D, BatchNorm2D, BatchNorm3D, SyncBatchNorm

F64 = {"rtol": 1e-10, "atol": 1e-10}
CHANNEL_LAST = ("NLC", "NHWC", "NDHWC")


@dataclasses.dataclass(frozen=True)
class Case:
    sizes: tuple[int, ...]  # batch size of each rank
    spatial: tuple[int, ...] = (3, 4)
    data_format: str = "NCHW"
    channels: int = 3
    momentum: float = 0.9
    epsilon: float = 1e-5
    frozen_weight: bool = False  # weight_attr=False: a frozen parameter of ones
    converted: bool = False  # built as BatchNorm1D/2D/3D, then convert_sync_batchnorm
    steps: int = 2
    seed: int = 0

    @property
    def channel_last(self) -> bool:
        return self.data_format in CHANNEL_LAST


def _batch(case: Case, step: int) -> tuple[Tensor, Tensor]:
    """Global input and upstream gradient, channels first, float64."""
    gen = torch.Generator().manual_seed(case.seed * 100 + step)
    c = case.channels
    shape = (sum(case.sizes), c, *case.spatial)
    view = (1, c) + (1,) * len(case.spatial)
    scale = torch.rand(c, generator=gen, dtype=torch.float64).view(view) * 2 + 0.5
    offset = torch.randn(c, generator=gen, dtype=torch.float64).view(view) * 3
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def _state(case: Case) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(case.seed + 7)
    c = case.channels
    return {
        "weight": torch.ones(c, dtype=torch.float64) if case.frozen_weight
        else torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "_mean": torch.randn(c, generator=gen, dtype=torch.float64),
        "_variance": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    }


def _to_layout(t: Tensor, case: Case) -> Tensor:
    return t.movedim(1, -1).contiguous() if case.channel_last else t


def _from_layout(t: Tensor, case: Case) -> Tensor:
    return t.movedim(-1, 1) if case.channel_last else t


def _build(case: Case) -> SyncBatchNorm:
    weight_attr = False if case.frozen_weight else None
    if not case.converted:
        return SyncBatchNorm(case.channels, case.momentum, case.epsilon, weight_attr=weight_attr,
                             data_format=case.data_format).double()
    cls = {2: BatchNorm1D, 3: BatchNorm1D, 4: BatchNorm2D, 5: BatchNorm3D}[2 + len(case.spatial)]
    local = cls(case.channels, case.momentum, case.epsilon, weight_attr=weight_attr,
                data_format=case.data_format).double()
    layer = SyncBatchNorm.convert_sync_batchnorm(local)
    assert isinstance(layer, SyncBatchNorm)
    return layer


def _run_case(case: Case, rank: int) -> dict[str, Any]:
    start = sum(case.sizes[:rank])
    rows = slice(start, start + case.sizes[rank])
    layer = _build(case)
    layer.load_state_dict(_state(case))
    steps = []
    for step in range(case.steps):
        x, dy = _batch(case, step)
        x_local = _to_layout(x[rows], case).requires_grad_()
        y = layer(x_local)
        y.backward(_to_layout(dy[rows], case))
        assert x_local.grad is not None
        steps.append({
            "y": _from_layout(y.detach(), case), "dx": _from_layout(x_local.grad, case),
            "channel_last_out": y.shape == x_local.shape and y.is_contiguous(),
            **{f"d{name}": None if p is None or p.grad is None else p.grad.clone()
               for name, p in (("weight", layer.weight), ("bias", layer.bias))},
        })
        layer.zero_grad()
    layer.eval()
    with torch.no_grad():
        y_eval = layer(_to_layout(_batch(case, case.steps)[0][rows], case))
    return {"steps": steps, "eval": _from_layout(y_eval, case),
            "mean": layer._mean.clone(), "variance": layer._variance.clone()}


def run_cases(cases: list[Case]) -> list[dict[str, Any]]:
    """Rank side: every case in turn, on this rank's rows of each global batch."""
    return [_run_case(case, dist.get_rank()) for case in cases]


def _oracle(case: Case) -> dict[str, Any]:
    state = _state(case)
    weight = state["weight"].clone().requires_grad_(not case.frozen_weight)
    bias = state["bias"].clone().requires_grad_()
    mean, var = state["_mean"], state["_variance"]
    steps = []
    for step in range(case.steps):
        x, dy = _batch(case, step)
        count = x.numel() // case.channels
        x = x.requires_grad_()
        if count <= 1:  # Paddle: one value per channel → the input; empty → empty
            y, new_mean, new_var = x * 1.0, mean, var
        else:
            y, new_mean, new_var = reference(x, weight, bias, mean, var, momentum=case.momentum,
                                             epsilon=case.epsilon)
        y.backward(dy)
        zeros = torch.zeros(case.channels, dtype=torch.float64)
        steps.append({
            "y": y.detach(), "dx": x.grad,
            "dweight": None if case.frozen_weight else (
                zeros if weight.grad is None else weight.grad.clone()),
            "dbias": zeros if bias.grad is None else bias.grad.clone(),
        })
        weight.grad = bias.grad = None
        mean, var = new_mean, new_var
    y_eval, _, _ = reference(_batch(case, case.steps)[0], weight.detach(), bias.detach(), mean,
                             var, epsilon=case.epsilon, batch_stats=False)
    return {"steps": steps, "eval": y_eval, "mean": mean, "variance": var}


def _assert_matches(case: Case, results: list[dict[str, Any]]) -> None:
    want = _oracle(case)
    for step, expected in enumerate(want["steps"]):
        got = [r["steps"][step] for r in results]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), expected["y"], **F64)
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), expected["dx"], **F64)
        assert all(g["channel_last_out"] for g in got)
        for name in ("dweight", "dbias"):
            if expected[name] is None:  # frozen: no gradient anywhere
                assert all(g[name] is None for g in got)
                continue
            total = sum((torch.zeros(case.channels, dtype=torch.float64) if g[name] is None
                         else g[name] for g in got), torch.zeros(case.channels,
                                                                 dtype=torch.float64))
            torch.testing.assert_close(total, expected[name], **F64)  # DDP sums them
    torch.testing.assert_close(torch.cat([r["eval"] for r in results]), want["eval"], **F64)
    for name in ("mean", "variance"):
        torch.testing.assert_close(results[0][name], want[name], **F64)
        assert all(torch.equal(r[name], results[0][name]) for r in results)  # bitwise


WORLD_2 = {
    "NCHW-uneven": Case(sizes=(3, 1)),
    "NHWC-uneven": Case(sizes=(1, 4), data_format="NHWC", seed=1),
    "NLC-3d": Case(sizes=(2, 3), spatial=(5,), data_format="NLC", seed=2),
    "NC-frozen-weight": Case(sizes=(4, 2), spatial=(), frozen_weight=True, momentum=0.8,
                             epsilon=1e-3, seed=3),
    "converted-BatchNorm2D-NHWC": Case(sizes=(2, 1), data_format="NHWC", converted=True, seed=4),
    "one-value-globally": Case(sizes=(1, 0), spatial=(), seed=5),
}
WORLD_3 = {
    "NCHW-empty-rank": Case(sizes=(2, 0, 3)),
    "NHWC-empty-rank": Case(sizes=(0, 2, 1), data_format="NHWC", seed=1),
    "NDHWC-5d": Case(sizes=(1, 1, 2), spatial=(2, 2, 3), data_format="NDHWC", seed=2),
    "NCL-uneven-converted": Case(sizes=(1, 3, 2), spatial=(4,), data_format="NCL",
                                 converted=True, seed=3),
    "all-empty": Case(sizes=(0, 0, 0), seed=4),
}


@pytest.mark.parametrize(("world_size", "cases"), [(2, WORLD_2), (3, WORLD_3)],
                         ids=["2-ranks", "3-ranks"])
def test_sync_matches_paddle_formula_on_global_batch(world_size: int,
                                                     cases: dict[str, Case]) -> None:
    results = harness.run_ranks(world_size, run_cases, list(cases.values()))
    for index, (name, case) in enumerate(cases.items()):
        try:
            _assert_matches(case, [r[index] for r in results])
        except AssertionError as error:
            raise AssertionError(f"case {name}: {error}") from error


def _subgroups() -> dict[str, Tensor]:
    """Ranks 0, 1 synchronize over their own group (process_group=); rank 2 alone."""
    pair, single = dist.new_group([0, 1]), dist.new_group([2])
    rank = dist.get_rank()
    layer = SyncBatchNorm(2, process_group=pair if rank < 2 else single).double()
    x = torch.arange(12, dtype=torch.float64).view(6, 2) ** 1.5
    y = layer(x[2 * rank: 2 * rank + 2])
    return {"y": y.detach(), "mean": layer._mean}


def test_process_group_keyword_selects_the_ranks() -> None:
    results = harness.run_ranks(3, _subgroups)
    x = torch.arange(12, dtype=torch.float64).view(6, 2) ** 1.5
    ones, zeros = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    pair, pair_mean, _ = reference(x[:4], ones, zeros, zeros, ones)
    alone, alone_mean, _ = reference(x[4:], ones, zeros, zeros, ones)
    torch.testing.assert_close(torch.cat([results[0]["y"], results[1]["y"]]), pair, **F64)
    torch.testing.assert_close(results[2]["y"], alone, **F64)
    torch.testing.assert_close(results[1]["mean"], pair_mean, **F64)
    torch.testing.assert_close(results[2]["mean"], alone_mean, **F64)


# --- copies of a layer that holds a process group ------------------------------------------


def _copies_of_grouped_layer() -> dict[str, Any]:
    import copy
    import io
    import pickle

    from torch import nn

    group = dist.new_group([0, 1])
    layer = SyncBatchNorm(3, process_group=group).double()
    rank = dist.get_rank()
    x = torch.arange(24, dtype=torch.float64).view(8, 3) ** 1.5
    out: dict[str, Any] = {}
    clone = copy.deepcopy(nn.Sequential(layer))[0]
    out["deepcopy_shares_group"] = clone.process_group is group
    out["deepcopy_new_params"] = clone.weight is not layer.weight
    out["clone_y"] = clone(x[4 * rank: 4 * rank + 4]).detach()  # trains over the shared group
    restored = pickle.loads(pickle.dumps(layer))
    out["pickled_group"] = restored.process_group
    out["original_keeps_group"] = layer.process_group is group
    buffer = io.BytesIO()
    torch.save(nn.Sequential(layer), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)[0]
    for name, copied in (("pickled", restored), ("saved", saved)):
        try:
            copied(x[:4])
            out[f"{name}_error"] = "no error"
        except ValueError as error:
            out[f"{name}_error"] = str(error)
    restored.eval()
    restored(x[:4])  # eval needs no group
    saved.process_group = group  # setting a group again clears the condition
    out["regrouped_y"] = saved(x[4 * rank: 4 * rank + 4]).detach()
    return out


def test_deepcopy_shares_the_group_and_pickling_says_it_dropped_it() -> None:
    results = harness.run_ranks(2, _copies_of_grouped_layer)
    x = torch.arange(24, dtype=torch.float64).view(8, 3) ** 1.5
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    expected, _, _ = reference(x, ones, zeros, zeros, ones)
    for result in results:
        assert result["deepcopy_shares_group"] and result["deepcopy_new_params"]
        assert result["original_keeps_group"]
        assert result["pickled_group"] is None
        for name in ("pickled", "saved"):
            assert result[f"{name}_error"].startswith(
                "SyncBatchNorm(3) was unpickled, and its process group could not travel with "
                "it"), result[f"{name}_error"]
            assert result[f"{name}_error"].endswith(
                "or call SyncBatchNorm.convert_sync_batchnorm(model, process_group=group) again")
    for key in ("clone_y", "regrouped_y"):
        torch.testing.assert_close(torch.cat([r[key] for r in results]), expected, **F64)
