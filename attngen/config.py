"""The only module that reads environment variables. Each knob is typed and documented.

ATTNGEN_CACHE_DIR     where built kernels live (default: the platform's user cache dir).
ATTNGEN_CC            C compiler to use (default: $CC, else gcc, else cc).
ATTNGEN_ISA           force an instruction set: amx, avx512bf16, avx512, avx2 or generic
                      (default: detected).
ATTNGEN_NUM_THREADS   default OpenMP thread count of a kernel call (default: all cores).
ATTNGEN_LOCK_TIMEOUT  seconds to wait for another process building the same kernel (600).
ATTNGEN_EXTRA_CFLAGS  extra compiler flags, appended (and hashed into the cache key).
"""
from __future__ import annotations

import functools
import os
import shlex
import shutil
from pathlib import Path

ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")


# os.environ.get encodes the name and decodes the value in Python code on every read; its
# backing dict (bytes to bytes on POSIX, kept in step by os.environ's setters) is one C lookup.
# Kernel lookups read the environment on every call, where that is 3-5x cheaper with cold caches.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _raw(name: str):
    """The variable's value as stored (bytes on POSIX), or None when it is not set."""
    if _ENVIRON_BYTES is not None:
        return _ENVIRON_BYTES.get(name.encode())
    return os.environ.get(name)


def _get(name: str) -> str | None:
    value = _raw(name)
    if value is None:
        return None
    value = (os.fsdecode(value) if isinstance(value, bytes) else value).strip()
    return value or None


# The variables are read on every call, so a changed one takes effect at once. What they
# resolve to (a cache path, and the default compiler's PATH search, done once) is
# remembered: every kernel lookup asks, and each costs 15-40 us, more than a call's C work.

# Every variable that changes which library a spec loads (compiler, ISA, flags, cache).
BUILD_VARIABLES = ("ATTNGEN_CC", "CC", "ATTNGEN_ISA", "ATTNGEN_EXTRA_CFLAGS", "ATTNGEN_CACHE_DIR")


def build_environment() -> tuple:
    """The raw values of BUILD_VARIABLES: a cheap key for "nothing that selects a build
    changed" (equal raw values resolve alike; different ones are merely looked up again)."""
    return tuple([_raw(name) for name in BUILD_VARIABLES])


def cache_dir() -> Path:
    return _resolve_cache_dir(_get("ATTNGEN_CACHE_DIR"))


@functools.lru_cache(maxsize=16)
def _resolve_cache_dir(override: str | None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("attngen"))


def compiler() -> str:
    """Name or path of the C compiler."""
    for candidate in (_get("ATTNGEN_CC"), _get("CC")):
        if candidate:
            return candidate
    return _default_compiler()


@functools.cache
def _default_compiler() -> str:
    return "gcc" if shutil.which("gcc") else "cc"


def forced_isa() -> str | None:
    isa = _get("ATTNGEN_ISA")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"ATTNGEN_ISA must be one of {ISAS}, got {isa!r}")
    return isa


@functools.cache
def _usable_cores() -> int:
    """Cores this process may run on, read once: the syscall costs ~1 us of every call."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_threads() -> int:
    value = _get("ATTNGEN_NUM_THREADS")
    if value is None:
        return _usable_cores()
    threads = int(value)
    if threads < 1:
        raise ValueError(f"ATTNGEN_NUM_THREADS must be >= 1, got {value!r}")
    return threads


def lock_timeout() -> float:
    value = _get("ATTNGEN_LOCK_TIMEOUT")
    return float(value) if value is not None else 600.0


def extra_cflags() -> list[str]:
    value = _get("ATTNGEN_EXTRA_CFLAGS")
    return shlex.split(value) if value else []
