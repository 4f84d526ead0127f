"""Running the ``syncbn`` command line in a subprocess, and reading what it wrote."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_syncbn(
    *args: str, cwd: Path, timeout: float = 120.0, module: str = "syncbn"
) -> subprocess.CompletedProcess[str]:
    """``python -m syncbn ARGS`` (or another module) with this checkout's ``src`` first on the path.

    ``timeout`` bounds the run, so a hang fails the test instead of the suite.
    Torchrun-style variables of the calling environment are removed: the
    command must spawn its own ranks unless the test says otherwise.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "default"  # show warnings in stderr, so tests can assert there are none
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk; raises ``ValueError`` if it is not a PNG."""
    header = path.read_bytes()[:24]
    if header[:8] != PNG_SIGNATURE or header[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file (header {header[:16]!r})")
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@contextmanager
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something listens on for the duration of the block."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        yield server.getsockname()[1]
