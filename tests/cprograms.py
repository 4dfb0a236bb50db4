"""Build the chapter's original C programs (``tests/c/*.c``) for use as test oracles.

``build("iterative_server")`` compiles ``tests/c/iterative_server.c`` into
``tests/c/bin/iterative_server`` (git-ignored), only when the binary is missing or older than
its source. A missing gcc is an error, not a skip: these oracles are how the lab proves it
matches the original behaviour, so a test that cannot build them must fail loudly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

C_DIR = Path(__file__).resolve().parent / "c"
BIN_DIR = C_DIR / "bin"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


class BuildError(RuntimeError):
    """The C program could not be built (no gcc, or a compile error)."""


def build(name: str) -> Path:
    """Compile ``tests/c/<name>.c`` if needed and return the path of the executable."""
    source = C_DIR / f"{name}.c"
    if not source.is_file():
        raise BuildError(f"no such C program: {source}")
    binary = BIN_DIR / name
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary

    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(
            f"gcc not found on PATH: it is needed to build {source.name}, the C oracle these "
            "tests compare against (install it, e.g. `apt-get install gcc`)"
        )
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: rename is atomic, so a concurrent test run
    # never executes a half-written binary.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=BIN_DIR)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            [gcc, *CFLAGS, "-o", str(tmp), str(source)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if proc.returncode != 0:
            raise BuildError(f"gcc failed to build {source.name}:\n{proc.stderr}")
        tmp.chmod(0o755)
        tmp.replace(binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary
