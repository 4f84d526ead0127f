"""docs/paddle_mapping.md cites tests: every cited test (and parameter id) must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "paddle_mapping.md"
FILES = {"L": "test_layers.py", "S": "test_layers_semantics.py", "D": "test_sync_paddle.py",
         "C": "test_checkpoint.py", "P": "test_param_attr.py", "I": "test_inplace_act.py"}
REF = re.compile(r"^(?:(?P<file>[A-Z])::|::)?(?P<test>test_\w+)?(?:\[(?P<param>[^\]]*)\])?$")


def _cited() -> list[tuple[str, str, str | None]]:
    """(file, test, parameter id or None) for each test cited in the doc's "tests" column."""
    cited = []
    for row in DOC.read_text().splitlines():
        cells = row.split("|")
        if not row.startswith("|") or len(cells) < 5 or cells[3].strip() in ("tests", "---"):
            continue
        file = test = None
        for ref in re.findall(r"`([^`]+)`", cells[3]):
            match = REF.match(ref)
            assert match, f"cannot read the test reference {ref!r} in {DOC.name}"
            file = FILES[match["file"]] if match["file"] else file
            test = match["test"] or test
            assert file and test, f"{ref!r} continues no earlier reference"
            cited.append((file, test, match["param"]))
    return cited


def test_the_doc_cites_tests() -> None:
    assert len(_cited()) > 100


@pytest.mark.parametrize(("file", "test", "param"), _cited())
def test_cited_test_exists(file: str, test: str, param: str | None) -> None:
    source = (Path(__file__).parent / file).read_text()
    assert re.search(rf"^def {test}\(", source, re.MULTILINE), f"{file}::{test} not found"
    if param is not None and param != "*":
        # a parameter id is a literal in the file (a dict key or an ids= entry): its text,
        # or for a "prefix-*" wildcard its prefix, must appear there
        literal = param[:-1] if param.endswith("*") else param
        assert literal in source, f"{file}::{test}[{param}]: no parameter id {literal!r}"


def test_in_place_row_names_exactly_the_fused_activations() -> None:
    from syncbn.paddle_compat._activations import ACTIVATION_NAMES
    from syncbn.paddle_compat._semantics import fused_activation

    row = next(r for r in DOC.read_text().splitlines() if r.startswith("| `in_place` (old)"))
    claim = row.split("it runs the core's in-place activated mode")[0]
    named = set(re.findall(r"'(\w+)'", claim))
    fused = {name for name in ACTIVATION_NAMES if fused_activation(name) is not None}
    assert named == fused, f"the doc says {sorted(named)} run in place; the code: {sorted(fused)}"
