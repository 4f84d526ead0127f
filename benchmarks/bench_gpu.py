"""GPU benchmark: syncbn.SyncBatchNorm vs torch.nn.SyncBatchNorm vs cuDNN BatchNorm.

One command (from the repository root, on a machine with a CUDA GPU)::

    PYTHONPATH=src python benchmarks/bench_gpu.py --out bench-results/gpu.json

spawns ``--world-size`` ranks (default 2). Rank ``r`` uses GPU ``r % device_count``:
with one GPU both ranks share it. The backend is NCCL when every rank has its
own GPU; with fewer GPUs than ranks it is gloo (NCCL refuses two ranks on one
device), which carries CUDA tensors through host memory — so on one GPU the
collective figures are gloo's, and the compute figures are the comparison.
``--backend nccl`` forces NCCL (it fails with "Duplicate GPU detected" on one GPU).

Variants, forward + backward (``torch.autograd.grad`` of input, weight and bias
with a fixed upstream gradient), training mode, interleaved in rotating rounds,
each iteration timed with ``torch.cuda.synchronize()`` around it after a barrier:

- ``syncbn``: :class:`syncbn.SyncBatchNorm` over the ranks;
- ``torch_syncbn``: ``torch.nn.SyncBatchNorm`` over the same ranks;
- ``cudnn``: ``torch.nn.BatchNorm1d/2d`` (cuDNN where it applies), no sync.

Target of the performance issue: syncbn at least as fast as torch.nn.SyncBatchNorm.
Writes JSON (environment, per case medians/p10/p90, ratios) and prints a table;
a variant that fails records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

DEFAULT_SHAPES = ("8x64x56x56", "8x64x56x56:cl", "32x256x14x14", "64x512x7x7", "256x1024")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("syncbn", "torch_syncbn", "cudnn")


def parse_shape(text: str) -> tuple[tuple[int, ...], bool]:
    """``"8x64x56x56"`` or ``"8x64x56x56:cl"`` → (shape, channels_last)."""
    body, _, suffix = text.partition(":")
    try:
        shape = tuple(int(v) for v in body.split("x"))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 4 or min(shape) < 1 or suffix not in ("", "cl") or (
            suffix == "cl" and len(shape) != 4):
        raise argparse.ArgumentTypeError(
            f"expected N x C x ... (2 to 4 positive integers), ':cl' only on 4-d, got {text!r}")
    return shape, suffix == "cl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_gpu.py",
        description="syncbn.SyncBatchNorm vs torch.nn.SyncBatchNorm vs cuDNN BatchNorm on CUDA, "
        "forward + backward, W ranks (sharing one GPU if only one is visible); JSON out.")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        metavar="NxCx...", help=f"default: {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        default=["float32", "bfloat16"], help="input dtypes (params float32)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="auto: nccl when every rank has its own GPU, else gloo")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--per-round", type=int, default=5, help="iterations per variant per "
                        "round (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up iterations per variant")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout, s")
    return parser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _layers(channels: int, ndim: int, device: torch.device) -> dict[str, nn.Module]:
    import syncbn

    local: nn.Module = nn.BatchNorm1d(channels) if ndim <= 3 else nn.BatchNorm2d(channels)
    layers: dict[str, nn.Module] = {
        "syncbn": syncbn.SyncBatchNorm(channels),
        "torch_syncbn": nn.SyncBatchNorm(channels),
        "cudnn": local,
    }
    for layer in layers.values():
        layer.to(device).train()
        with torch.no_grad():
            layer.get_parameter("weight").copy_(torch.linspace(0.5, 1.5, channels))
            layer.get_parameter("bias").copy_(torch.linspace(-0.1, 0.1, channels))
    return layers


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _case(shape: tuple[int, ...], cl: bool, dtype: torch.dtype, args: argparse.Namespace,
          device: torch.device, rank: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    dy = torch.randn(shape, generator=generator)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    x = x.to(device, dtype).requires_grad_()
    dy = dy.to(device, dtype)
    layers = _layers(shape[1], len(shape), device)
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for name, layer in layers.items():
        inputs = (x, layer.get_parameter("weight"), layer.get_parameter("bias"))

        def step(layer: nn.Module = layer, inputs: tuple[Tensor, ...] = inputs) -> None:
            torch.autograd.grad(layer(x), inputs, dy)

        try:  # every rank tries every variant, so they stay paired
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize(device)
            steps[name] = step
        except Exception as error:  # recorded, not fatal: e.g. a backend without all_gather
            errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
    failed: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failed, sorted(errors))
    names = [n for n in steps if not any(n in f for f in failed)]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            for _ in range(args.per_round):
                dist.barrier()
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                steps[name]()
                torch.cuda.synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
    times = {n: {"median_ms": _percentile(v, 0.5), "p10_ms": _percentile(v, 0.1),
                 "p90_ms": _percentile(v, 0.9), "samples": len(v)} for n, v in samples.items()}
    ratios = {}
    for other in ("torch_syncbn", "cudnn"):
        if "syncbn" in times and other in times:
            ratios[f"syncbn/{other}"] = times["syncbn"]["median_ms"] / times[other]["median_ms"]
    label = "x".join(map(str, shape)) + (":cl" if cl else "")
    return {"label": label, "dtype": str(dtype).removeprefix("torch."), "times": times,
            "ratios": ratios, "errors": errors}


def _rank(rank: int, args: argparse.Namespace, port: int, backend: str,
          result_path: str) -> None:
    count = torch.cuda.device_count()
    device = torch.device("cuda", rank % count)
    torch.cuda.set_device(device)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        cases = []
        for shape, cl in args.shapes:
            for dtype_name in args.dtypes:
                case = _case(shape, cl, DTYPES[dtype_name], args, device, rank)
                cases.append(case)
                if rank == 0:
                    print(f"  {case['label']:>15} {case['dtype']:>8}: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in case["ratios"].items())
                          + (f" errors {case['errors']}" if case["errors"] else ""),
                          file=sys.stderr, flush=True)
        if rank == 0:
            Path(result_path).write_text(json.dumps(cases))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def environment(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    count = torch.cuda.device_count()
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(count)],
        "world_size": args.world_size, "backend": backend,
        "ranks_per_gpu": -(-args.world_size // max(count, 1)),
        "python": platform.python_version(), "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def format_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['gpus']}, "
             f"W={env['world_size']} over {env['backend']} ({env['ranks_per_gpu']} rank(s)/GPU)",
             f"{'shape':>15} {'dtype':>8} | " + " | ".join(f"{v + ' ms':>14}" for v in VARIANTS)
             + " | syncbn/torch_syncbn | syncbn/cudnn"]
    for case in result["cases"]:
        cells = [f"{case['times'][v]['median_ms']:14.3f}" if v in case["times"]
                 else f"{'failed':>14}" for v in VARIANTS]
        ratio = [f"{case['ratios'].get(k, float('nan')):.2f}"
                 for k in ("syncbn/torch_syncbn", "syncbn/cudnn")]
        lines.append(f"{case['label']:>15} {case['dtype']:>8} | " + " | ".join(cells)
                     + f" | {ratio[0]:>19} | {ratio[1]:>12}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    if not torch.cuda.is_available():
        print("bench_gpu.py: error: no CUDA device is visible (torch "
              f"{torch.__version__}); run it on a machine with a GPU", file=sys.stderr)
        return 2
    count = torch.cuda.device_count()
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if count >= args.world_size and dist.is_nccl_available() else "gloo"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    part = args.out.with_name(f".{args.out.name}.part")
    try:
        mp.spawn(_rank, args=(args, _free_port(), backend, str(part)), nprocs=args.world_size)
        cases = json.loads(part.read_text())
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        part.unlink(missing_ok=True)
    result = {"schema": "syncbn-bench-gpu/1", "environment": environment(args, backend),
              "config": {"rounds": args.rounds, "per_round": args.per_round,
                         "warmup": args.warmup, "timing": "barrier, cuda synchronize, "
                         "forward + backward, cuda synchronize; rank 0's medians"},
              "cases": cases}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
