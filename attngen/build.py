"""Compile one rendered kernel into a shared library inside a given directory."""
from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from .errors import CompileError
from .toolchain import Toolchain

SOURCE_NAME = "kernel.c"
LIBRARY_NAME = "kernel.so"
COMPILE_TIMEOUT_S = 300


def compile_command(toolchain: Toolchain) -> list[str]:
    """The exact, path-free command (it runs inside the build directory)."""
    return toolchain.compile_command(SOURCE_NAME, LIBRARY_NAME)


def compile_in(directory: Path, source: str, toolchain: Toolchain) -> float:
    """Write `source` into `directory` and compile it there; returns the seconds taken.

    Raises CompileError with the command and the compiler's full output on failure."""
    directory = Path(directory)
    (directory / SOURCE_NAME).write_text(source)
    command = compile_command(toolchain)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=directory, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except FileNotFoundError:
        raise CompileError(f"C compiler not found: {command[0]!r}; install gcc or set ATTNGEN_CC",
                           command=shlex.join(command)) from None
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"compiler timed out after {COMPILE_TIMEOUT_S} s",
                           command=shlex.join(command), output=str(exc.output or "")) from None
    seconds = time.perf_counter() - start
    library = directory / LIBRARY_NAME
    if proc.returncode != 0 or not library.is_file():
        raise CompileError(f"compiling {SOURCE_NAME} failed (exit code {proc.returncode})",
                           command=shlex.join(command), output=proc.stdout + proc.stderr)
    return seconds
