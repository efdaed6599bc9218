"""Find the C compiler, detect the CPU's instruction set, and build the compile command.

`-march=native` is resolved to its concrete feature flags first, so the command (which
is part of the cache key) says exactly what the code was built for.
"""
from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass

from . import config
from .errors import CompileError

BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
              "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-unused-variable")
# Portable -march levels for the fallbacks, used when the ISA is forced below native.
PORTABLE_MARCH = {"amx": "-march=x86-64-v4 -mavx512bf16 -mamx-tile -mamx-bf16",
                  "avx512bf16": "-march=x86-64-v4 -mavx512bf16", "avx512": "-march=x86-64-v4",
                  "avx2": "-march=x86-64-v3", "generic": ""}


@dataclass(frozen=True)
class Toolchain:
    compiler: str            # as invoked
    compiler_id: str         # identity that goes into the cache key
    isa: str                 # amx / avx512bf16 / avx512 / avx2 / generic
    features: frozenset      # e.g. {"avx512f", "avx512bf16", "fma", "f16c"}
    arch_flags: tuple        # concrete -march/-m flags

    def compile_command(self, source: str, output: str) -> list[str]:
        """Path-free command: run it inside the directory that holds `source`."""
        return [self.compiler, *BASE_FLAGS, *self.arch_flags, *config.extra_cflags(),
                "-o", output, source]


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
    except FileNotFoundError:
        raise CompileError(f"C compiler not found: {cmd[0]!r}; install gcc or set ATTNGEN_CC",
                           command=" ".join(cmd)) from None
    return proc.stdout + proc.stderr


def _native_flags(cc: str) -> list[str]:
    """The -march/-m flags that `-march=native` expands to (gcc and clang print them
    on the cc1 line of a verbose preprocess)."""
    out = _run([cc, "-march=native", "-E", "-v", "-x", "c", "/dev/null", "-o", "/dev/null"])
    for line in out.splitlines():
        if "cc1" in line and "-march=" in line:
            tokens = line.split()
            return [t for t in tokens
                    if t.startswith("-march=") or (t.startswith("-m") and not t.startswith("-mtune"))
                    and not t.startswith("-mno-")]
    return []


def _features(flags: list[str]) -> frozenset:
    return frozenset(f[2:] for f in flags if f.startswith("-m") and not f.startswith("-march"))


def _isa_of(features: frozenset) -> str:
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= features:
        if "avx512bf16" not in features:
            return "avx512"
        if {"amx-tile", "amx-bf16"} <= features and amx_permitted():
            return "amx"
        return "avx512bf16"
    if {"avx2", "fma"} <= features:
        return "avx2"
    return "generic"


@functools.lru_cache(maxsize=None)
def amx_permitted() -> bool:
    """Ask Linux to let this process use AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM for
    XFEATURE_XTILEDATA; the kernel hands it out per process, on request). False where the
    OS refuses or has no such request: the CPU's AMX units are then unusable."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
        return libc.syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def _detect(cc: str, forced: str | None) -> Toolchain:
    version = _run([cc, "--version"]).splitlines()
    machine = _run([cc, "-dumpmachine"]).strip()
    compiler_id = f"{version[0] if version else cc} | {machine}"
    native = _native_flags(cc)
    features = _features(native)
    native_isa = _isa_of(features)
    isa = forced or native_isa
    if forced and forced != native_isa:
        if ISA_RANK[forced] > ISA_RANK[native_isa]:
            raise ValueError(f"ATTNGEN_ISA={forced} but this CPU only supports {native_isa}")
        arch_flags = tuple(PORTABLE_MARCH[forced].split())
        features = _features(list(arch_flags)) | _PORTABLE_FEATURES[forced]
    else:
        # -mtune is left to the compiler's default so the command stays machine-independent
        # apart from the features it names.
        arch_flags = tuple(native)
    return Toolchain(cc, compiler_id, isa, frozenset(features), arch_flags)


ISA_RANK = {"generic": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3, "amx": 4}
_PORTABLE_FEATURES = {
    "amx": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512bf16", "avx2",
                      "fma", "f16c", "amx-tile", "amx-bf16"}),
    "avx512bf16": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512bf16", "avx2",
                             "fma", "f16c"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "generic": frozenset(),
}


def detect() -> Toolchain:
    """The toolchain for this machine (honours ATTNGEN_CC and ATTNGEN_ISA)."""
    return _detect(config.compiler(), config.forced_isa())
