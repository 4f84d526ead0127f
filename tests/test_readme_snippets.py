"""The docs cannot rot: README.md's Python snippets run, and every command the docs name exists.

Every fenced ```` ```python ```` block of README.md runs in its own
subprocess (this checkout's ``src`` first on the path, a fresh temporary
folder as its working directory, warnings shown), so snippets cannot lean on
each other or on this process. A block

- that calls ``init_process_group`` gets torchrun's variables for a world of
  one rank (``RANK=0``, ``WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1``, a free
  ``MASTER_PORT``), as ``torchrun --nproc-per-node 1`` would give it;
- that names a ``*.pdparams`` file finds there the project's file written by
  real Paddle (``/work/shared/data/paddle/net.pdparams``, or
  ``$SYNCBN_PADDLE_DATA``), under the name the block uses;
- that imports an optional package (lightning, timm, accelerate, onnx, ...)
  is skipped, with the reason, when that package is not importable;
- may opt out only with ``<!-- snippet: skip (reason) -->`` on the line
  before its fence, and the reason must be given.

The block's code is written with as many blank lines in front as it has
README lines above it, so a traceback's line numbers are README.md's; a
failure names the block by its line and first line.

Shell blocks (```` ```bash ````) of README.md, docs/*.md and
benchmarks/README.md are not run; each command line in them is checked
instead: ``bash scripts/X`` names an existing script, ``python -m syncbn SUB
...`` (also under ``torchrun`` or ``.venv/bin/python``) names a subcommand
whose parser accepts the options, ``python -m pytest PATH`` and ``python
FILE.py`` name existing files, and ``.venv/bin/`` is followed by ``python``
only (``scripts/test.sh`` guarantees nothing else there).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
PADDLE_DATA = Path(os.environ.get(
    "SYNCBN_PADDLE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "paddle"))
OPTIONAL = ("lightning", "pytorch_lightning", "timm", "accelerate", "onnx", "onnxscript",
            "torchvision", "sklearn", "matplotlib", "tqdm", "paddle")
SKIP_MARK = re.compile(r"^<!--\s*snippet:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->$")
FENCE = re.compile(r"^```\s*(?P<lang>[\w+-]*)\s*$")
SNIPPET_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, the README line of its first code line, its code."""

    path: Path
    lang: str
    line: int
    code: str
    marker: str | None  # the non-blank line right before the fence, if it is an HTML comment

    @property
    def where(self) -> str:
        first = next((s for s in self.code.splitlines() if s.strip()), "")
        return f"{self.path.relative_to(ROOT)}:{self.line} (`{first.strip()}`)"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of the Markdown file ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: the fence opened here is never closed")
        blocks.append(Block(
            path=path, lang=opened["lang"].lower(), line=i + 2,
            code="\n".join(lines[i + 1:end]) + "\n",
            marker=before if before.startswith("<!--") else None,
        ))
        i = end + 1
    return blocks


PY_BLOCKS = [b for b in fenced_blocks(README) if b.lang in ("python", "py")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _imported_modules(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_readme_has_python_snippets() -> None:
    assert PY_BLOCKS, "README.md has no ```python block: the parser or the README changed"


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[f"README.md:{b.line}" for b in PY_BLOCKS])
def test_readme_python_snippet_runs(block: Block, tmp_path: Path) -> None:
    if block.marker is not None:
        skip = SKIP_MARK.match(block.marker)
        if skip:
            reason = (skip["reason"] or "").strip()
            assert reason, f"{block.where}: `<!-- snippet: skip (...) -->` must give its reason"
            pytest.skip(f"{block.where}: {reason}")
    try:
        modules = _imported_modules(block.code)
    except SyntaxError as exc:
        pytest.fail(f"{block.where}: not valid Python: {exc}")
    missing = sorted(m for m in modules & set(OPTIONAL) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"{block.where}: needs {', '.join(missing)}, not importable here")

    for name in sorted(set(re.findall(r"""["']([\w./-]+\.pdparams)["']""", block.code))):
        source = PADDLE_DATA / "net.pdparams"
        if not source.is_file():
            pytest.skip(f"{block.where}: needs the Paddle test file {source} (SYNCBN_PADDLE_DATA)")
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "default"
    if "init_process_group" in block.code:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    script = tmp_path / f"readme_line_{block.line}.py"
    # blank lines first, so the traceback's line numbers are README.md's
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    try:
        run = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=SNIPPET_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: still running after {SNIPPET_TIMEOUT_S:.0f} s")
    assert run.returncode == 0, (
        f"README snippet at {block.where} failed (exit {run.returncode}); line numbers below "
        f"are README.md's:\n{run.stderr[-4000:]}"
    )
    # torch 2.13's own deprecation warning from inside inductor (see pyproject's filters),
    # and torch's notice about the interpreter on Python 3.13.0 ("Consider upgrading to
    # Python 3.13.1+", the newest leg of the version matrix)
    stderr = "\n".join(
        line for line in run.stderr.splitlines()
        if "torch.jit.script_method" not in line and line.strip() != "warnings.warn("
        and "Consider upgrading to Python" not in line)
    assert "Warning" not in stderr, f"{block.where} warned:\n{stderr[-4000:]}"


# ---------------------------------------------------------------------------
# Shell commands named in the docs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    words: list[str]


def shell_commands() -> list[Command]:
    """Each command line of every ```bash / ```sh / ```console block of the shell docs."""
    found = []
    for path in SHELL_DOCS:
        if not path.is_file():
            continue
        for block in fenced_blocks(path):
            if block.lang not in ("bash", "sh", "shell", "console"):
                continue
            for offset, raw in enumerate(block.code.splitlines()):
                text = raw.strip().removeprefix("$ ")
                if not text or text.startswith("#"):
                    continue
                try:
                    words = shlex.split(text, comments=True)
                except ValueError as exc:
                    raise AssertionError(f"{path.name}:{block.line + offset}: {exc}") from None
                if words:
                    found.append(Command(f"{path.relative_to(ROOT)}:{block.line + offset} "
                                         f"(`{text}`)", words))
    return found


COMMANDS = shell_commands()


def _after_env(words: list[str]) -> list[str]:
    """Drop leading ``NAME=value`` assignments."""
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]):
        i += 1
    return words[i:]


def _syncbn_args(words: list[str]) -> list[str] | None:
    """The arguments after ``-m syncbn`` (python or torchrun), or None if not a syncbn run."""
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "syncbn":
            return words[i + 2:]
    return None


def _parses(parser_main: str, args: list[str]) -> str | None:
    """None if the syncbn parser accepts ``args``, else argparse's message."""
    from syncbn.cli import bench as _bench
    from syncbn.cli import build_parser

    parser = _bench.build_parser() if parser_main == "bench" else build_parser()
    args = [a for a in args if not re.fullmatch(r"\[.*\]|<.*>|\.\.\.", a)]  # placeholders
    argv = args if parser_main == "bench" else [parser_main, *args]
    if "--help" in argv or "-h" in argv:
        return None
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit:
            return err.getvalue().strip() or "refused"
    return None


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one documented command line (empty: nothing found)."""
    words = _after_env(words)
    if not words:
        return []
    problems = []
    for word in words:
        if word.startswith(".venv/bin/") and word != ".venv/bin/python":
            problems.append(f"`{word}`: scripts/test.sh guarantees only .venv/bin/python; "
                            f"write `.venv/bin/python -m {word.removeprefix('.venv/bin/')}`")
    program = Path(words[0]).name
    if (program == "bash" and len(words) > 1 and words[1].startswith("scripts/")
            and not (ROOT / words[1]).is_file()):
        problems.append(f"no script {words[1]}")
    syncbn_args = _syncbn_args(words)
    if syncbn_args is not None:
        from syncbn.cli import build_parser

        subcommands = set()
        for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
            subcommands |= set(getattr(action, "choices", {}) or {})
        if not syncbn_args or syncbn_args[0] not in subcommands:
            problems.append(f"`syncbn {' '.join(syncbn_args[:1])}` is not one of "
                            f"{sorted(subcommands)}")
        else:
            message = _parses(syncbn_args[0], syncbn_args[1:])
            if message:
                problems.append(f"syncbn {syncbn_args[0]} refuses its options: {message}")
    elif program.startswith("python") or program == "pytest":
        rest = words[1:]
        if program == "pytest" or rest[:2] == ["-m", "pytest"]:
            paths = [w.split("::")[0] for w in rest if w.startswith("tests")]
            problems += [f"no test file {p}" for p in paths if not (ROOT / p).exists()]
        elif rest and rest[0].endswith(".py") and not (ROOT / rest[0]).is_file():
            problems.append(f"no file {rest[0]}")
        elif rest[:1] == ["-m"] and len(rest) > 1:
            module = rest[1]
            if module != "pytest" and importlib.util.find_spec(module.split(".")[0]) is None:
                problems.append(f"no module {module}")
    return problems


def test_docs_name_shell_commands() -> None:
    assert any(_syncbn_args(c.words) for c in COMMANDS), "no `python -m syncbn` command found"
    assert any(c.words[:2] == ["bash", "scripts/test.sh"] for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where.split(" ")[0] for c in COMMANDS])
def test_documented_command_exists(command: Command) -> None:
    problems = check_command(command.words)
    assert not problems, f"{command.where}: " + "; ".join(problems)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("bash scripts/nope.sh", "no script scripts/nope.sh"),
        ("python -m syncbn frobnicate", "is not one of"),
        ("python -m syncbn check --nprocs 2", "refuses its options"),
        ("python -m syncbn bench --no-such-option", "refuses its options"),
        (".venv/bin/pytest tests/test_layer.py", "guarantees only .venv/bin/python"),
        (".venv/bin/python -m pytest tests/test_nope.py", "no test file tests/test_nope.py"),
        (".venv/bin/python benchmarks/nope.py", "no file benchmarks/nope.py"),
    ],
)
def test_command_check_catches(line: str, problem: str) -> None:
    problems = check_command(shlex.split(line, comments=True))
    assert any(problem in p for p in problems), problems


def test_command_check_passes_good_lines() -> None:
    for line in (
        "bash scripts/test.sh -k distributed",
        "torchrun --nproc-per-node 4 -m syncbn check",
        "PYTHONPATH=src python -m syncbn bench --quick",
        ".venv/bin/python -m pytest tests/test_faults.py::test_x -q",
        "python -m syncbn demo --help",
    ):
        assert check_command(shlex.split(line, comments=True)) == [], line


def test_skip_marker_needs_a_reason() -> None:
    with_reason = SKIP_MARK.match("<!-- snippet: skip (needs a GPU) -->")
    bare = SKIP_MARK.match("<!-- snippet: skip -->")
    assert with_reason is not None and with_reason["reason"] == "needs a GPU"
    assert bare is not None and bare["reason"] is None
