"""The ecosystem leg (``bash scripts/test_eco.sh``): real timm and torchvision models.

Its venv has torch 2.14.1, torchvision and timm. Where either library is missing
(the main suite's venv), each test module here is collected as one skipped test,
without importing it (and so timm or torchvision).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

MISSING = [name for name in ("timm", "torchvision") if importlib.util.find_spec(name) is None]
REASON = (f"the ecosystem tests need {' and '.join(MISSING)} (bash scripts/test_eco.sh makes "
          "a venv with them)")


class _Unavailable(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(REASON)


class _UnavailableModule(pytest.File):
    """A test module of this directory, not imported: one skipped item."""

    def collect(self) -> Iterator[pytest.Item]:
        yield _Unavailable.from_parent(self, name=self.path.stem)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.File | None:
    return _UnavailableModule.from_parent(parent, path=module_path) if MISSING else None
