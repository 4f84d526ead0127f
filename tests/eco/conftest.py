"""The ecosystem leg (``bash scripts/test_eco.sh``): real timm and torchvision models.

Its venv has torch 2.14.1, torchvision and timm. Where either library is missing
(the main suite's venv), the whole directory is skipped at once, before any test
module (and so timm or torchvision) is imported.
"""

from __future__ import annotations

import importlib.util

import pytest

_MISSING = [name for name in ("timm", "torchvision") if importlib.util.find_spec(name) is None]
if _MISSING:
    pytest.skip(f"the ecosystem tests need {' and '.join(_MISSING)} (bash scripts/test_eco.sh "
                "makes a venv with them)", allow_module_level=True)
