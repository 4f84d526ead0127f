"""Soak: a long syncbn training run on gloo ranks, watching memory and the ranks' agreement.

    python benchmarks/soak.py --steps 2000          # W = 2, RSS every 50 steps
    python benchmarks/soak.py --steps 100 --warmup 20 --sample-every 10 --tolerance 0.25

Spawns ``--world-size`` ranks on 127.0.0.1 (gloo, ``GLOO_SOCKET_IFNAME=lo``, one
intra-op thread each). Every rank trains the same small CNN — three
``syncbn.SyncBatchNorm`` layers (2-D and 1-D) from ``convert_sync_batchnorm``,
wrapped in ``DistributedDataParallel``, SGD with momentum — on synthetic batches
drawn from ``(seed, rank, step)``, and samples its resident set size from
``/proc/self/statm`` every ``--sample-every`` steps (and after the last).

Checks (exit code 1 if one fails, 0 if all pass, 2 for bad options):

- **RSS flat after warm-up**: on every rank, over the samples taken at or after
  step ``--warmup``, ``max / min − 1 ≤ --tolerance`` (default 5 %);
- **running statistics bitwise identical** on all ranks at the end
  (``running_mean``, ``running_var``, ``num_batches_tracked`` of every layer),
  and ``num_batches_tracked`` equal to the number of steps;
- parameters identical on all ranks (what DDP promises; reported beside).

``--bn local`` keeps torch's own BatchNorm (no synchronization) as a baseline
for the RSS figures; its running statistics differ by rank by design, so that
check is reported but not required there.

Writes one JSON document (``bench-results/soak-<time>.json`` unless ``--out``)
with the environment, the options, every rank's samples and step times, and the
verdict of each check; prints a summary. A rank that fails or hangs fails the
run within ``--timeout`` (gloo's and the layers' timeout) or ``--wall-limit``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing
import os
import platform
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SCHEMA = "syncbn-soak/1"
ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    """This process's resident set size: field 2 of ``/proc/self/statm``, in pages."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _rank(rank: int, world_size: int, port: int, options: dict[str, Any],
          results: Any) -> None:
    """One rank: train ``options['steps']`` steps, sampling RSS; put a report on ``results``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel

        import syncbn

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=options["timeout"]),
        )
        torch.manual_seed(options["seed"])
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),  # (N, 16, 16, 16)
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1, bias=False),  # (N, 32, 8, 8)
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (N, 32)
            nn.Linear(32, 32, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        if options["bn"] == "syncbn":
            model = syncbn.convert_sync_batchnorm(model)
        for layer in model.modules():
            if isinstance(layer, syncbn.SyncBatchNorm):
                layer.timeout = options["timeout"]
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
        generator = torch.Generator().manual_seed(options["seed"] * 7919 + rank)
        scale = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
        offset = torch.tensor([0.0, 2.0, -1.0]).view(1, 3, 1, 1)

        samples: list[dict[str, float]] = []
        steps, every = options["steps"], options["sample_every"]
        started = time.perf_counter()
        for step in range(steps):
            if step % every == 0:
                samples.append({"step": step, "rss_bytes": _rss_bytes(),
                                "seconds": time.perf_counter() - started})
            x = torch.randn(options["batch"], 3, 16, 16, generator=generator) * scale + offset
            y = torch.randint(0, 10, (options["batch"],), generator=generator)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        samples.append({"step": steps, "rss_bytes": _rss_bytes(),
                        "seconds": time.perf_counter() - started})

        # plain bytes: a tensor in a queue would travel as a shared-memory handle that dies
        # with this process
        buffer = io.BytesIO()
        torch.save({name: value.detach() for name, value in model.state_dict().items()}, buffer)
        state = buffer.getvalue()
        results.put((rank, "ok", {"samples": samples, "state": state,
                                  "loss": float(loss.detach()),
                                  "seconds": time.perf_counter() - started}))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def run_ranks(options: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Spawn the ranks, collect one report each; raise ``RuntimeError`` on a failure or hang."""
    world_size = options["world_size"]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, world_size, port, options, results),
                                 name=f"soak-rank{rank}") for rank in range(world_size)]
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + options["wall_limit"]
    try:
        for process in processes:
            process.start()
        while len(reports) < world_size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(reports))} "
                                   f"did not finish within --wall-limit {options['wall_limit']} s")
            try:
                rank, kind, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes)
                        if r not in reports and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died (exit code "
                                       f"{processes[dead[0]].exitcode}) without a report") from None
                continue
            if kind == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            reports[rank] = value
    finally:
        for process in processes:
            process.join(timeout=10 if len(reports) == world_size else 0)
            if process.is_alive():
                process.kill()
                process.join()
    return reports


def rss_check(samples: list[dict[str, float]], warmup: int, tolerance: float) -> dict[str, Any]:
    """``max / min − 1`` of the RSS samples at steps ``>= warmup``, against ``tolerance``."""
    after = [s for s in samples if s["step"] >= warmup]
    if len(after) < 2:
        return {"passed": False, "why": f"fewer than 2 samples at or after step {warmup}"}
    values = [int(s["rss_bytes"]) for s in after]
    spread = max(values) / min(values) - 1.0
    first, last = after[0], after[-1]
    steps = last["step"] - first["step"]
    return {
        "passed": spread <= tolerance,
        "samples_after_warmup": len(values),
        "min_bytes": min(values), "max_bytes": max(values),
        "first_bytes": values[0], "last_bytes": values[-1],
        "spread": spread, "tolerance": tolerance,
        "growth_bytes_per_1000_steps": (values[-1] - values[0]) * 1000 / steps if steps else 0.0,
    }


def agreement(reports: dict[int, dict[str, Any]], steps: int) -> dict[str, Any]:
    """Whether running statistics and parameters are identical bits on every rank."""
    import torch

    states = [torch.load(io.BytesIO(reports[rank]["state"]), weights_only=True)
              for rank in sorted(reports)]
    reference = states[0]
    stat_names = [n for n in reference
                  if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    param_names = [n for n in reference if n not in stat_names]
    stats_differ = sorted({n for state in states[1:] for n in stat_names
                           if not torch.equal(state[n], reference[n])})
    params_differ = sorted({n for state in states[1:] for n in param_names
                            if not torch.equal(state[n], reference[n])})
    tracked = {n: int(reference[n]) for n in stat_names if n.endswith("num_batches_tracked")}
    finite = all(bool(torch.isfinite(reference[n]).all()) for n in stat_names)
    return {
        "running_stats_identical": not stats_differ, "running_stats_differ": stats_differ,
        "parameters_identical": not params_differ, "parameters_differ": params_differ,
        "num_batches_tracked": tracked,
        "num_batches_tracked_ok": all(v == steps for v in tracked.values()),
        "running_stats_finite": finite,
        "layers": len(tracked),
    }


def environment() -> dict[str, Any]:
    import torch

    import syncbn

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "syncbn": syncbn.__version__, "commit": commit, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    parser.add_argument("--sample-every", type=int, default=50, help="steps between RSS samples")
    parser.add_argument("--warmup", type=int, default=200,
                        help="steps before the RSS flatness check starts")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest accepted max/min − 1 of RSS after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn", choices=("syncbn", "local"), default="syncbn",
                        help="local: keep torch's BatchNorm, a baseline for the RSS figures "
                             "(its statistics differ by rank: reported, not required)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="gloo's and the layers' timeout, seconds")
    parser.add_argument("--wall-limit", type=float, default=3600.0,
                        help="the whole run fails after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.world_size < 2 or args.sample_every < 1 or args.batch < 1:
        parser.error("--steps, --sample-every and --batch must be >= 1, --world-size >= 2")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup}")
    if not args.tolerance >= 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")

    options = {
        "steps": args.steps, "world_size": args.world_size, "batch": args.batch,
        "sample_every": args.sample_every, "warmup": args.warmup, "tolerance": args.tolerance,
        "seed": args.seed, "bn": args.bn, "timeout": args.timeout, "wall_limit": args.wall_limit,
    }
    env = environment()
    started = time.perf_counter()
    try:
        reports = run_ranks(options)
    except RuntimeError as exc:
        print(f"soak: FAIL — {exc}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    rss = {rank: rss_check(reports[rank]["samples"], args.warmup, args.tolerance)
           for rank in sorted(reports)}
    agree = agreement(reports, args.steps)
    passed = all(r["passed"] for r in rss.values()) and agree["num_batches_tracked_ok"]
    if args.bn == "syncbn":  # local BatchNorm's statistics differ by rank, by design
        passed = passed and agree["running_stats_identical"] and agree["running_stats_finite"]
    env["load_average_after"] = list(os.getloadavg())
    document = {
        "schema": SCHEMA, "environment": env, "options": options, "wall_seconds": wall,
        "passed": passed, "rss": {str(r): v for r, v in rss.items()}, "agreement": agree,
        "ranks": {str(rank): {"samples": report["samples"], "seconds": report["seconds"],
                              "final_loss": report["loss"]}
                  for rank, report in sorted(reports.items())},
    }
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = ROOT / "bench-results" / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))

    mib = 1 << 20
    print(f"soak: {args.bn}, {args.steps} steps on {args.world_size} gloo ranks in {wall:.1f} s "
          f"(torch {env['torch']}, syncbn {env['syncbn']} {env['commit']}, "
          f"load {env['load_average'][0]:.1f})")
    for rank, check in rss.items():
        if "spread" not in check:
            print(f"  rank {rank}: RSS {check['why']}")
            continue
        print(f"  rank {rank}: RSS after step {args.warmup}: {check['min_bytes'] / mib:.1f}–"
              f"{check['max_bytes'] / mib:.1f} MiB over {check['samples_after_warmup']} samples, "
              f"spread {check['spread']:.2%} (limit {args.tolerance:.0%}), "
              f"{check['growth_bytes_per_1000_steps'] / 1024:+.0f} KiB per 1000 steps; "
              f"{reports[rank]['seconds'] / args.steps * 1000:.1f} ms/step")
    print(f"  running statistics of {agree['layers']} layers bitwise identical on all ranks: "
          f"{agree['running_stats_identical']}; num_batches_tracked = {args.steps}: "
          f"{agree['num_batches_tracked_ok']}; parameters identical: "
          f"{agree['parameters_identical']}")
    print(f"  {'PASS' if passed else 'FAIL'}; wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
