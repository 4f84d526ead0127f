"""The ``syncbn`` command line: ``syncbn demo`` and ``syncbn check``.

Also ``python -m syncbn``. This module parses and dispatches only; the work is
in :mod:`syncbn.cli.demo`, :mod:`syncbn.cli.check` and :mod:`syncbn.cli.launch`.

Exit codes: 0 success; 1 a mismatch was found, or a rank failed; 2 bad
options or environment (the message says what was expected and how to fix it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPILOG = (
    "exit codes: 0 success; 1 mismatch found or a rank failed; 2 bad options or environment.\n"
    "Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set) each process\n"
    "joins torchrun's group instead of spawning ranks, e.g.\n"
    "  torchrun --nproc-per-node 4 -m syncbn {command}"
)


def _add_group_options(parser: argparse.ArgumentParser, default_nproc: str) -> None:
    """Options shared by demo and check: how the process group is formed."""
    parser.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help=f"local ranks to spawn (default: {default_nproc}); under torchrun the world "
        "size is torchrun's, so leave it out",
    )
    parser.add_argument(
        "--backend", default="auto", metavar="NAME",
        help="torch.distributed backend: gloo, nccl, ... (default: auto = nccl for "
        "--device cuda, gloo for cpu)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where each rank computes; cuda gives local rank i the GPU i (default: cpu)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of all randomness (default: 0)")
    parser.add_argument(
        "--port", type=int, default=None,
        help="TCP port for the local rendezvous on 127.0.0.1 (default: a free one); "
        "a busy port is an error",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", dest="timeout_s",
        help="timeout of the rendezvous and of every collective, so a lost rank fails "
        "the run instead of hanging it (default: 120)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``syncbn`` argument parser with its ``demo`` and ``check`` subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="syncbn",
        description="Synchronized batch normalization for PyTorch: a demo that proves it "
        "and a check of a live process group.",
    )
    parser.add_argument("--version", action="version", version=f"syncbn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small CNN three ways and prove syncbn equals one big batch",
        description=(
            "Train one small conv net on scikit-learn's digits three ways, from the same\n"
            "weights and the same global sample order:\n"
            "  (a) DDP with per-rank torch.nn.BatchNorm2d (statistics of B samples),\n"
            "  (b) DDP with syncbn.convert_sync_batchnorm (statistics of nproc·B samples),\n"
            "  (c) one process on the global batch of nproc·B (the reference, on rank 0).\n"
            "Prints a table at each evaluation point, writes results.json and curves.png to\n"
            "--out, and exits 1 if (b) departs from (c) by more than a float32 tolerance.\n"
            "Needs the demo extras: pip install 'syncbn[demo]'."
        ),
        epilog=_EPILOG.format(command="demo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_group_options(demo, default_nproc="4")
    demo.add_argument(
        "--steps", type=int, default=400, help="SGD steps of each run (default: 400)"
    )
    demo.add_argument(
        "--batch-per-rank", type=int, default=2, metavar="B",
        help="samples per rank per step; the global batch is nproc·B (default: 2)",
    )
    demo.add_argument(
        "--eval-every", type=int, default=None, metavar="K",
        help="steps between evaluation points (table rows) (default: steps/10)",
    )
    demo.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    demo.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="folder for results.json and curves.png (default: a new ./syncbn-demo-<time>)",
    )
    demo.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    demo.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")

    check = commands.add_parser(
        "check",
        help="check syncbn against BatchNorm on the gathered global batch, on this group",
        description=(
            "On the live process group (torchrun's, or locally spawned ranks), compare\n"
            "syncbn's outputs, gradients and running stats with torch.nn.BatchNorm on the\n"
            "gathered global batch, for input ranks 2-5, float32 and float64, contiguous\n"
            "and channels-last, with uneven per-rank batches and an empty rank; time\n"
            "forward+backward against local BatchNorm; print a verdict table.\n"
            "Exits 1 on any mismatch."
        ),
        epilog=_EPILOG.format(command="check"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_group_options(check, default_nproc="4 on cpu, the GPU count on cuda")
    check.add_argument(
        "--iters", type=int, default=20,
        help="timed forward+backward iterations per layer; 0 skips timing (default: 20)",
    )
    # listed for --help; its own options are parsed by syncbn.cli.bench (see main)
    commands.add_parser(
        "bench", add_help=False,
        help="benchmark syncbn against local BatchNorm and a naive SyncBN (JSON); "
             "'syncbn bench --help' for its options",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``syncbn`` command line; return the exit code (see the module doc)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        from . import bench as _bench

        return _bench.main(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argparse error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    from .launch import LaunchError, UsageError

    try:
        if args.command == "demo":
            return _demo(args)
        return _check(args)
    except UsageError as exc:
        print(f"syncbn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LaunchError as exc:
        print(f"syncbn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"syncbn {args.command}: interrupted", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            nproc=args.nproc, steps=args.steps, batch_per_rank=args.batch_per_rank,
            backend=args.backend, device=args.device, seed=args.seed, out=args.out,
            plot=not args.no_plot, eval_every=args.eval_every, lr=args.lr, port=args.port,
            timeout_s=args.timeout_s, progress=not args.no_progress,
        )
    )


def _check(args: argparse.Namespace) -> int:
    from .check import CheckConfig, run_check

    return run_check(
        CheckConfig(
            nproc=args.nproc, backend=args.backend, device=args.device, seed=args.seed,
            port=args.port, timeout_s=args.timeout_s, iters=args.iters,
        )
    )
