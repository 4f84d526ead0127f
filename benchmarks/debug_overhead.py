"""What debug mode costs: ``python benchmarks/debug_overhead.py [--out PATH] [--quick]``.

Debug mode (``SyncBatchNorm(..., debug=True)`` or ``SYNCBN_DEBUG=1``) all-gathers
a 5-value float64 fingerprint before each of the layer's two collectives. This
script spawns W gloo ranks on 127.0.0.1 (default 2, one intra-op thread each)
and times one training step of one ``SyncBatchNorm(C)`` layer (forward +
backward, ``torch.autograd.grad`` for input, weight and bias so nothing
accumulates) in three variants on the same input, in the same run:

- ``default``: ``debug=False``;
- ``debug``: ``debug=True``;
- ``local``: ``torch.nn.BatchNorm`` without any communication (the floor);
- ``fingerprints``: only what debug mode adds, two all_gathers of 5 float64
  values, with no layer at all (the extra cost is their latency).

Variants are interleaved in rounds whose order rotates, each round preceded by
a barrier, so drift and load hit all alike. Per round and variant the mean of
``--per-round`` steps is one sample; the report gives rank 0's median (and
p10/p90) per variant, the extra milliseconds of debug mode per layer call
(median of the per-round differences ``debug − default``, paired), and the
ratio. Results are one JSON document with the environment (written to
``bench-results/debug_overhead-<timestamp>.json`` unless ``--out`` says
otherwise) and a table on stdout. Timings on a shared machine are noisy: the
load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import syncbn

SCHEMA = "syncbn-debug-overhead/1"
DEFAULT_SHAPES = ("32x64", "8x64x8x8", "8x64x32x32")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a shape like 8x64x8x8 (N x C x ..., 2 to 5 positive sizes), got {text!r}")
    return shape


def _bn_class(ndim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _step(layer: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters()]

    def step() -> None:
        y = layer(x)
        torch.autograd.grad(y, [x, *params], dy)

    return step


def _fingerprint_pair(world: int) -> Callable[[], None]:
    mine = torch.zeros(5, dtype=torch.float64)
    table = [torch.empty_like(mine) for _ in range(world)]

    def step() -> None:
        for _ in range(2):  # forward and backward each check once
            dist.all_gather(table, mine)

    return step


def _time_rounds(steps: dict[str, Callable[[], None]], warmup: int, rounds: int,
                 per_round: int) -> dict[str, list[float]]:
    """Per variant, one mean step time (ms) per round; every rank runs the same sequence."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            samples[name].append((time.perf_counter() - start) * 1e3 / per_round)
    return samples


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _rank(rank: int, world: int, init_file: str, config: dict[str, Any]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        cases = []
        for shape in config["shapes"]:
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(shape, generator=gen).requires_grad_()
            dy = torch.randn(shape, generator=gen)
            channels = shape[1]
            layers: dict[str, nn.Module] = {
                "default": syncbn.SyncBatchNorm(channels, debug=False),
                "debug": syncbn.SyncBatchNorm(channels, debug=True),
                "local": _bn_class(len(shape))(channels),
            }
            steps = {name: _step(layer, x, dy) for name, layer in layers.items()}
            steps["fingerprints"] = _fingerprint_pair(world)
            samples = _time_rounds(steps, config["warmup"], config["rounds"],
                                   config["per_round"])
            cases.append({"shape": list(shape), "samples_ms": samples})
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, cases)
        if rank == 0:
            Path(config["parts"]).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def summarize(shape: list[int], by_rank: list[dict[str, list[float]]]) -> dict[str, Any]:
    rank0 = by_rank[0]
    summary: dict[str, Any] = {"shape": "x".join(map(str, shape)), "channels": shape[1]}
    for name, values in rank0.items():
        summary[name] = {"median_ms": statistics.median(values),
                         "p10_ms": _percentile(values, 0.1), "p90_ms": _percentile(values, 0.9)}
    extra = [d - b for d, b in zip(rank0["debug"], rank0["default"], strict=True)]
    summary["debug_extra_ms_per_call"] = statistics.median(extra)
    summary["debug_extra_ms_p10_p90"] = [_percentile(extra, 0.1), _percentile(extra, 0.9)]
    summary["debug_over_default"] = (summary["debug"]["median_ms"]
                                     / summary["default"]["median_ms"])
    summary["every_rank_median_extra_ms"] = [
        statistics.median(d - b for d, b in zip(r["debug"], r["default"], strict=True))
        for r in by_rank]
    return summary


def environment(world: int) -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"torch": torch.__version__, "syncbn": syncbn.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_1_5_15": load, "world_size": world,
            "backend": "gloo", "threads_per_rank": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"debug-mode cost, W = {result['environment']['world_size']} gloo ranks, "
             f"load {result['environment']['loadavg_1_5_15']}",
             f"{'shape':>14} {'local ms':>9} {'default ms':>11} {'debug ms':>9} "
             f"{'extra ms':>9} {'ratio':>6} {'2 gathers ms':>13}"]
    for case in result["cases"]:
        lines.append(f"{case['shape']:>14} {case['local']['median_ms']:9.3f} "
                     f"{case['default']['median_ms']:11.3f} {case['debug']['median_ms']:9.3f} "
                     f"{case['debug_extra_ms_per_call']:9.3f} {case['debug_over_default']:6.2f} "
                     f"{case['fingerprints']['median_ms']:13.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help=f"input shapes N x C x ... (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="8 rounds of 5 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round, args.warmup = 8, 5, 5
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("bench-results") / f"debug_overhead-{stamp}.json"
    with tempfile.TemporaryDirectory(prefix="syncbn-debug-bench-") as tmp:
        parts = Path(tmp) / "parts.json"
        config = {"shapes": [list(s) for s in args.shapes], "rounds": args.rounds,
                  "per_round": args.per_round, "warmup": args.warmup, "parts": str(parts)}
        mp.spawn(_rank, args=(args.world_size, str(Path(tmp) / "rdzv"), config),
                 nprocs=args.world_size, join=True)
        gathered = json.loads(parts.read_text())
    cases = [summarize(case["shape"], [rank_cases[i]["samples_ms"] for rank_cases in gathered])
             for i, case in enumerate(gathered[0])]
    result = {"schema": SCHEMA, "environment": environment(args.world_size),
              "config": {k: v for k, v in config.items() if k != "parts"}, "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # spawned ranks import this file as __mp_main__: do not re-run
    sys.exit(main())
