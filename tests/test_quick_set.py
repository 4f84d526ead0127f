"""The quick set (`bash scripts/test.sh`, `pytest -m "not full"`) keeps its promise.

Its patterns (tests/quick_set.py) follow tests by name, so a renamed test would silently
drop out of them: each pattern must still name a collected test, and the quick set must
still hold a case of each basic promise.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import quick_set

ROOT = Path(__file__).resolve().parents[1]


def _collected(*options: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *options, "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [line.strip() for line in run.stdout.splitlines() if "::" in line]


def test_every_pattern_names_a_test_and_the_quick_set_keeps_each_promise() -> None:
    everything = _collected()
    for pattern in (*quick_set.FULL_ONLY, *quick_set.QUICK_ALSO, *quick_set.MATRIX_ALSO):
        assert any(fnmatch.fnmatchcase(node, pattern) for node in everything), (
            f"{pattern!r} names no test: rename it in tests/quick_set.py with its test")

    quick = set(_collected("-m", "not full"))
    assert quick < set(everything), "the quick set should leave the slow tests out"
    for pattern in quick_set.QUICK_ALSO:
        assert any(fnmatch.fnmatchcase(node, pattern) for node in quick), pattern
    promises = {
        "exactness on 2 ranks": "tests/test_distributed.py::test_matches_batchnorm_on_global*",
        "conversion": "tests/test_convert.py::*",
        "errors": "tests/test_bad_values.py::*",
        "the Paddle flavour on ranks": "tests/paddle/test_sync_paddle.py::*",
        "one compile case": "tests/test_compile.py::*",
        "one join case": "tests/test_join.py::test_join_equals_one_process*",
    }
    for promise, pattern in promises.items():
        assert any(fnmatch.fnmatchcase(node, pattern) for node in quick), (
            f"the quick set lost {promise} ({pattern})")
