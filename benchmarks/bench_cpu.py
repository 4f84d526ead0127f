"""CPU benchmark of syncbn.SyncBatchNorm on gloo ranks: ``python benchmarks/bench_cpu.py``.

Thin shell over ``syncbn.cli.bench`` (also ``python -m syncbn bench``): spawns W = 2
and 4 ranks on 127.0.0.1, times syncbn against local BatchNorm and a naive
synchronized BatchNorm, writes ``bench-results/<timestamp>.json`` and prints a
table. ``--quick`` for a one-minute run; ``--help`` for every option.
"""

from __future__ import annotations

import sys

from syncbn.cli.bench import main

if __name__ == "__main__":  # spawned ranks import this file as __mp_main__: do not re-run
    sys.exit(main(sys.argv[1:]))
