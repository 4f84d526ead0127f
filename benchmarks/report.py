"""Print a benchmark result as Markdown tables: ``python benchmarks/report.py RESULT.json``.

The tables of ``benchmarks/README.md`` come from this (``syncbn.cli.bench.format_markdown``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from syncbn.cli.bench import format_markdown, format_table

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULT.json  (written by bench_cpu.py)")
    result = json.loads(Path(sys.argv[1]).read_text())
    print(format_markdown(result))
    print("```")
    print(format_table(result))
    print("```")
