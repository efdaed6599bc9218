"""This machine's memory read bandwidth, measured with a small OpenMP C kernel built by
the same compiler and flags as attngen's kernels (numpy's own reductions are far slower
than the memory, so they cannot measure it)."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import cffi
import numpy as np

from attngen import toolchain

SOURCE = Path(__file__).resolve().parent / "membw.c"


def _library():
    tc = toolchain.detect()
    build = Path(tempfile.mkdtemp(prefix="attngen-membw-"))
    cmd = [tc.compiler, "-O3", "-fopenmp", "-fPIC", "-shared", *tc.arch_flags,
           "-o", str(build / "membw.so"), str(SOURCE)]
    subprocess.run(cmd, check=True, capture_output=True)
    ffi = cffi.FFI()
    ffi.cdef("float read_sum(const float *data, int64_t n, int threads);")
    return ffi, ffi.dlopen(str(build / "membw.so"))


def reader(threads: int, gib: float = 0.5):
    """(read, nbytes): read() streams a `gib` GiB float32 array once with `threads` threads,
    so it can be timed beside other contenders."""
    ffi, lib = _library()
    n = int(gib * (1 << 30)) // 4 // 64 * 64
    data = np.ones(n, dtype=np.float32)
    ptr = ffi.cast("const float *", data.ctypes.data)

    def read():
        return lib.read_sum(ptr, n, threads) + 0 * data[0]   # keeps `data` alive

    read()     # touch every page first
    return read, data.nbytes


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Median GB/s of reading a `gib` GiB float32 array with `threads` threads."""
    import time

    read, nbytes = reader(threads, gib)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return nbytes / float(np.median(times)) / 1e9


if __name__ == "__main__":
    import os

    for t in range(1, (os.cpu_count() or 1) + 1):
        print(f"{t} threads: {read_bandwidth(t):.1f} GB/s")
