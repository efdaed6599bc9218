"""This machine's memory read bandwidth, measured with a small OpenMP C kernel built by
the same compiler and flags as attngen's kernels (numpy's own reductions are far slower
than the memory, so they cannot measure it)."""
from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

import cffi
import numpy as np

from attngen import toolchain

SOURCE = Path(__file__).resolve().parent / "membw.c"


@functools.lru_cache(maxsize=None)
def _library():
    tc = toolchain.detect()
    build = Path(tempfile.mkdtemp(prefix="attngen-membw-"))
    cmd = [tc.compiler, "-O3", "-fopenmp", "-fPIC", "-shared", *tc.arch_flags,
           "-o", str(build / "membw.so"), str(SOURCE)]
    subprocess.run(cmd, check=True, capture_output=True)
    ffi = cffi.FFI()
    ffi.cdef("float read_sum(const float *data, int64_t n, int threads);")
    return ffi, ffi.dlopen(str(build / "membw.so"))


def reader(threads: int, gib: float = 0.5, arrays=None):
    """(read, nbytes): read() streams once, with `threads` threads, either the given
    `arrays` (C-contiguous; a decode case's own K and V, so the reference reads the very
    pages attngen reads) or a fresh `gib` GiB float32 array, so it can be timed beside
    other contenders."""
    ffi, lib = _library()
    if arrays is None:
        n = int(gib * (1 << 30)) // 4 // 64 * 64
        arrays = [np.ones(n, dtype=np.float32)]
    spans = []
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("membw.reader needs C-contiguous arrays")
        floats = a.nbytes // 4 // 64 * 64          # whole 256-byte steps
        spans.append((ffi.cast("const float *", a.ctypes.data), floats))

    def read():
        total = sum(lib.read_sum(ptr, n, threads) for ptr, n in spans)
        return total + 0 * len(arrays)             # keeps `arrays` alive

    read()     # touch every page first
    return read, sum(n * 4 for _, n in spans)


def largest_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache sysfs reports (the L3 on x86), or `default`."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def evictor(threads: int, factor: int = 4):
    """evict(): streams a buffer `factor` times the largest cache, so that nothing an earlier
    call read is still cached. That is the state a decode step meets inside a model: between
    two steps of one layer, every other layer's KV cache passes through the caches."""
    read, _ = reader(threads, gib=factor * largest_cache_bytes() / (1 << 30))
    return read


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
