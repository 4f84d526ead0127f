"""The benchmark's code path (never its timings) and the memory saved for backward by the core."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from syncbn import SyncBatchNorm
from syncbn.cli import bench as _bench
from syncbn.functional import synchronized_batch_norm

TINY_SHAPES = ("4x8x5x5", "4x8x5x5:cl", "16x12", "4x8x9:mask", "3@4x8x5x5")
DTYPES = ("float32", "bfloat16")


# --- the --quick code path end to end, on tiny shapes ---------------------------------------


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    code = _bench.main([
        "--quick", "--shapes", *TINY_SHAPES, "--dtypes", *DTYPES, "--world-sizes", "2",
        "--rounds", "2", "--per-round", "2", "--warmup", "1", "--profile-iters", "2",
        "--timeout", "60", "--out", str(out),
    ])
    assert code == _bench.EXIT_OK
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_result_carries_the_environment(quick_result: dict[str, Any]) -> None:
    assert quick_result["schema"] == _bench.SCHEMA
    env = quick_result["environment"]
    for field in ("torch", "syncbn", "python", "platform", "backend", "device", "cpu_count",
                  "threads_per_rank", "world_sizes", "timestamp"):
        assert field in env, field
    assert env["torch"] == torch.__version__
    assert env["backend"] == "gloo" and env["device"] == "cpu"
    assert env["world_sizes"] == [2] and env["cpu_count"] >= 1
    assert quick_result["config"]["quick"] is True


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_case_has_medians_and_ratios(quick_result: dict[str, Any]) -> None:
    (run,) = quick_result["runs"]
    assert run["world_size"] == 2
    assert run["iterations"]["samples"] == 4
    cases = {(c["label"], c["dtype"]) for c in run["cases"]}
    assert cases == {(s, d) for s in TINY_SHAPES for d in DTYPES}
    for case in run["cases"]:
        for variant in _bench.VARIANTS:
            times = case["times"][variant]
            assert times["samples"] == 4
            assert 0 < times["p10_ms"] <= times["median_ms"] <= times["p90_ms"]
            assert times["median_max_over_ranks_ms"] > 0
        ratios = case["ratios"]
        assert ratios["syncbn/floor"] == pytest.approx(
            case["times"]["syncbn"]["median_ms"] / case["times"]["floor"]["median_ms"])
        assert ratios["syncbn/local"] == pytest.approx(
            case["times"]["syncbn"]["median_ms"] / case["times"]["local"]["median_ms"])
        assert ratios["syncbn/naive"] == pytest.approx(
            case["times"]["syncbn"]["median_ms"] / case["times"]["naive"]["median_ms"])
        chain = case["layers"] > 1
        assert chain or case["profile_ms"]["fwd_all_reduce"] > 0  # the W = 2 profile ran
        kernels = case["kernels_per_layer"]  # per layer-step, every eager variant
        assert {"syncbn", "floor", "local", "naive"} <= set(kernels), kernels
        if chain and case["dtype"] == "float32":
            assert kernels["syncbn"] <= 25 and kernels["local"] == 3, kernels
        assert case["compile_s"] == {}  # --quick compiles nothing
        assert not any(v.endswith("_compiled") for v in case["times"])
        masked = case["label"].endswith(":mask")
        assert (_bench.MASKED_VARIANT in case["times"]) == masked
        if masked:
            assert case["ratios"]["syncbn_masked/syncbn"] == pytest.approx(
                case["times"][_bench.MASKED_VARIANT]["median_ms"]
                / case["times"]["syncbn"]["median_ms"])
            assert case["masked"]["elementwise_pass_ms"] > 0
            assert 0.5 <= case["masked"]["valid_fraction"] < 1.0
    table = _bench.format_table(quick_result)
    assert "s/floor" in table and "masked W=2 4x8x9:mask" in table
    assert "**syncbn/floor**" in _bench.format_markdown(quick_result)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_syncbn_communicates_twice_within_the_byte_budget(quick_result: dict[str, Any]) -> None:
    for case in quick_result["runs"][0]["cases"]:
        if case["layers"] > 1:  # a chain: its kernels are counted per layer instead
            assert case["comm"] == {"bytes_limit": 16 * (2 * case["channels"] + 2)}
            continue
        channels = case["channels"]
        comm = case["comm"]["syncbn"]
        assert (comm["forward_collectives"], comm["backward_collectives"]) == (1, 1), case["label"]
        assert comm["collectives"] == 2
        assert comm["bytes"] == comm["forward_bytes"] + comm["backward_bytes"]
        assert comm["bytes"] == case["comm"]["bytes_limit"] == 16 * (2 * channels + 2)
        assert case["comm"]["local"]["collectives"] == 0
        assert case["comm"]["naive"]["collectives"] == 2
        floor = case["comm"]["floor"]  # the floor sends what syncbn sends, where syncbn does
        assert (floor["forward_collectives"], floor["backward_collectives"]) == (1, 1)
        assert (floor["forward_bytes"], floor["backward_bytes"]) == (
            comm["forward_bytes"], comm["backward_bytes"])
        gather = case["comm"]["gather_floor"]  # syncbn's kind of collective here, bare
        assert gather == {**floor, "kinds": ["all_gather"]}
        assert comm["kinds"] == ["all_gather"] and floor["kinds"] == ["all_reduce"], comm


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_memory_and_targets_are_recorded(quick_result: dict[str, Any]) -> None:
    for case in quick_result["runs"][0]["cases"]:
        if case["layers"] > 1:
            continue
        memory = case["memory"]["syncbn"]
        assert memory["input_saved"] == 1
        assert memory["saved_bytes"] <= memory["input_bytes"] + case["memory"]["allowance_bytes"]
        if case["dtype"] == "bfloat16":  # the naive layer keeps a float32 copy of the input
            assert case["memory"]["naive"]["allocated_bytes"] >= 2 * memory["input_bytes"]
    names = [t["target"] for t in quick_result["targets"]]
    assert "syncbn/naive <= 0.85, W=2, 3@4x8x5x5 float32" in names  # the chain
    assert "kernels per layer-step <= 25, W=2, 3@4x8x5x5 float32" in names
    assert "syncbn/floor <= 1.1, W=2, 3@4x8x5x5 float32" in names
    assert "syncbn/floor <= 1.0, W=2, 4x8x5x5 float32" in names  # NCHW
    assert "syncbn/floor <= 1.1, W=2, 4x8x5x5:cl float32" in names
    assert "syncbn/floor <= 1.1, W=2, 16x12 float32" in names
    assert "mask costs <= 1 elementwise pass, W=2, 4x8x9:mask float32" in names
    assert all(t["met"] for t in quick_result["targets"] if t["target"].startswith("2 collectives"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compiled_variants_time_and_report_compile(tmp_path: Any) -> None:
    out = tmp_path / "compiled.json"
    code = _bench.main([
        "--quick", "--shapes", "16x12", "--dtypes", "float32", "--world-sizes", "2",
        "--rounds", "1", "--per-round", "2", "--warmup", "1", "--profile-iters", "0",
        "--compile", "w2", "--timeout", "120", "--out", str(out),
    ])
    assert code == _bench.EXIT_OK
    result = json.loads(out.read_text())
    (case,) = result["runs"][0]["cases"]
    for variant in _bench.COMPILED_VARIANTS:
        assert case["times"][variant]["samples"] == 2
    assert case["compile_s"]["syncbn_compiled"] > 0 and case["compile_s"]["local_compiled"] > 0
    assert case["ratios"]["syncbn_compiled/floor_compiled"] == pytest.approx(
        case["times"]["syncbn_compiled"]["median_ms"]
        / case["times"]["floor_compiled"]["median_ms"])
    names = [t["target"] for t in result["targets"]]
    assert "compiled syncbn <= eager syncbn, W=2, 16x12 float32" in names
    assert "compiled syncbn/compiled floor <= 1.10, W=2, 16x12 float32" in names
    assert "first call s" in _bench.format_markdown(result)


def test_a_compiled_chain_is_one_graph_as_a_model_is_compiled(world_of_one: None) -> None:
    # 16 graphs of one layer each would pay a compiled call's fixed cost (guards, the
    # autograd wrappers) 16 times per step, which no compiled model pays
    variants = _bench._make_layers(6, 4, dist.group.WORLD, compiled=True, layers=3)
    kinds = {"syncbn_compiled": SyncBatchNorm, "local_compiled": torch.nn.BatchNorm2d}
    for name, kind in kinds.items():
        variant = variants[name]
        assert variant.call._orig_mod is variant.module  # type: ignore[attr-defined]
        assert [type(m) for m in variant.module] == [kind] * 3  # type: ignore[attr-defined]
    floor = variants["floor_compiled"].module
    assert len(floor) == 3 and not hasattr(variants["floor_compiled"].call, "_orig_mod")


def test_floor_is_local_batch_norm_with_syncbn_sized_collectives(world_of_one: None) -> None:
    bn = torch.nn.BatchNorm2d(6)
    floor = _bench.FloorBatchNorm(bn, 6, dist.group.WORLD)
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    dy = torch.randn(4, 6, 3, 3)
    with _bench.count_collectives() as forward_calls:
        y = floor(x)
    with _bench.count_collectives() as backward_calls:
        (dx,) = torch.autograd.grad(y, x, dy)
    assert forward_calls == backward_calls == [("all_reduce", 8 * (2 * 6 + 2))]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.batch_norm(x_ref, None, None, bn.weight.detach(), bn.bias.detach(), True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, torch.autograd.grad(y_ref, x_ref, dy)[0])


def test_gather_floor_sends_the_same_as_all_gathers(world_of_one: None) -> None:
    bn = torch.nn.BatchNorm2d(6)
    floor = _bench.FloorBatchNorm(bn, 6, dist.group.WORLD, gather=True)
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    with _bench.count_collectives() as forward_calls:
        y = floor(x)
    with _bench.count_collectives() as backward_calls:
        torch.autograd.grad(y, x, torch.ones_like(y))
    assert forward_calls == backward_calls == [("all_gather", 8 * (2 * 6 + 2))]


def test_padding_mask_counts_a_prefix_of_every_sample() -> None:
    mask = _bench.padding_mask((5, 3, 10), seed=1)
    assert mask.dtype == torch.bool and mask.shape == (5, 10)
    lengths = mask.sum(1)
    assert bool((lengths >= 5).all()) and bool((lengths <= 10).all())
    for row, length in zip(mask, lengths.tolist(), strict=True):
        assert row[:length].all() and not row[length:].any()
    assert _bench.padding_mask((2, 3, 4, 6), seed=0).shape == (2, 4, 6)


# --- memory saved for backward by the core (single process, same autograd Function) ---------


def _core(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    channels = x.size(1)
    return synchronized_batch_norm(
        x, torch.zeros(channels), torch.ones(channels), weight, bias, eps=1e-5, decay=0.9,
        unbiased_var=True, process_group=None, single_value="raise",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("shape", "channels_last"), [
    ((8, 16, 7, 7), False), ((8, 16, 7, 7), True), ((32, 64), False), ((4, 3, 5), False),
    ((2, 4, 3, 3, 3), False),
], ids=["nchw", "nhwc", "nc", "ncl", "ncdhw"])
def test_core_saves_only_the_input_and_o_of_c(
    shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype
) -> None:
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    channels = shape[1]
    weight = torch.rand(channels, requires_grad=True)
    bias = torch.rand(channels, requires_grad=True)
    saved = _bench.saved_for_backward(lambda: _core(x, weight, bias), x, (weight, bias))
    assert saved["input_saved"] == 1  # the input itself, not a copy
    assert saved["input_bytes"] == x.numel() * x.element_size()
    allowance = _bench.MEMORY_BYTES_PER_CHANNEL * channels + _bench.MEMORY_BYTES_FIXED
    assert saved["saved_bytes"] <= saved["input_bytes"] + allowance
    assert saved["allocated_bytes"] <= allowance


def test_saved_bytes_meter_sees_copies() -> None:
    x = torch.randn(64, 8, requires_grad=True)
    saved = _bench.saved_for_backward(lambda: x.double().exp(), x)  # exp saves its float64 result
    assert saved["input_saved"] == 0
    assert saved["allocated_bytes"] == saved["saved_bytes"] == 64 * 8 * 8
    assert saved["beyond_input_bytes"] == 64 * 8 * 8


# --- the pieces in one process --------------------------------------------------------------


def test_collective_counter_records_calls_and_bytes(world_of_one: None) -> None:
    original = dist.all_reduce
    with _bench.count_collectives() as calls:
        dist.all_reduce(torch.ones(5, dtype=torch.float64))
        dist.all_reduce(tensor=torch.ones(3))
    assert calls == [("all_reduce", 40), ("all_reduce", 12)]
    assert dist.all_reduce is original


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (10, 5)], ids=["nchw", "nc"])
def test_naive_baseline_is_batch_norm(world_of_one: None, shape: tuple[int, ...]) -> None:
    """With one rank the naive baseline must compute plain BN (the comparison is fair)."""
    channels = shape[1]
    layer = _bench.NaiveSyncBatchNorm(channels, dist.group.WORLD).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    weight_ref = layer.weight.detach().clone().requires_grad_()
    running_mean = torch.zeros(channels, dtype=torch.float64)
    running_var = torch.ones(channels, dtype=torch.float64)
    y = layer(x)
    y_ref = F.batch_norm(x_ref, running_mean, running_var, weight_ref, layer.bias.detach(),
                         True, 0.1, 1e-5)
    torch.testing.assert_close(y, y_ref)
    (dx, dw), (dx_ref, dw_ref) = (torch.autograd.grad(y, (x, layer.weight), dy),
                                  torch.autograd.grad(y_ref, (x_ref, weight_ref), dy))
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)
    torch.testing.assert_close(layer.running_mean, running_mean)
    torch.testing.assert_close(layer.running_var, running_var)


# --- options --------------------------------------------------------------------------------


def test_parse_shape() -> None:
    assert _bench.parse_shape("8x64x56x56") == _bench.ShapeSpec((8, 64, 56, 56), False)
    assert _bench.parse_shape("8x64x56x56:cl").channels_last
    assert _bench.parse_shape("256x1024").channels == 1024
    assert _bench.parse_shape("32x256x128:mask").masked


@pytest.mark.parametrize("text", ["8", "8x0x3", "8x64x5x5x5", "axb", "8x64:nhwc"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(_bench.UsageError, match="--shapes expects sizes like 8x64x56x56"):
        _bench.parse_shape(text)


def test_channels_last_needs_4d() -> None:
    with pytest.raises(_bench.UsageError, match=r"channels_last\) needs a 4-d shape"):
        _bench.parse_shape("8x64:cl")
    with pytest.raises(_bench.UsageError, match=r"a padding mask\) needs a shape N x C x L"):
        _bench.parse_shape("8x64:mask")


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench.main(["--world-sizes", "1"]) == _bench.EXIT_USAGE
    assert "--world-sizes must be at least 2, got 1" in capsys.readouterr().err
    assert _bench.main(["--shapes", "3"]) == _bench.EXIT_USAGE


def test_percentile_matches_torch() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.1, 0.5, 0.9):
        expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
        assert _bench.percentile(values, q) == pytest.approx(expected)


# --- the GPU benchmark script (runs where a GPU is lent; here: it loads and explains itself) ---

GPU_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def _load_gpu_script() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_gpu_script_help_runs() -> None:
    done = subprocess.run([sys.executable, str(GPU_SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=100, check=False,
                          env={**os.environ, "PYTHONPATH": str(GPU_SCRIPT.parent.parent / "src")})
    assert done.returncode == 0, done.stderr
    assert "torch.nn.SyncBatchNorm" in done.stdout and "--world-size" in done.stdout


def test_gpu_script_parses_shapes_and_refuses_without_a_gpu(
        capsys: pytest.CaptureFixture[str]) -> None:
    gpu = _load_gpu_script()
    assert gpu.parse_shape("8x64x56x56:cl") == ((8, 64, 56, 56), True)
    with pytest.raises(argparse.ArgumentTypeError, match="':cl' only on 4-d"):
        gpu.parse_shape("8x64:cl")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run")
    assert gpu.main(["--shapes", "4x8x5x5"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
