"""Shared pieces of the attngen benchmarks (prefill now, decode later).

Nothing here knows about a particular attention shape. It offers:

* machine_info()            what the numbers were measured on (CPU, cores, attngen ISA, versions)
* load_torch(threads)       torch, set to `threads` threads, or None with a printed note
* check_against_reference() max abs error of one contender vs the float64 oracle; fails loudly
* burst()                   several back-to-back calls as one timed contender
* time_round_robin()        warm-up, then interleaved timed calls of several contenders,
                            each after an idle gap and an untimed settling call; on a
                            shared machine, waiting for quiet and redoing rounds other
                            processes disturbed (a contender may time itself: Elapsed)
* LoadMonitor               cores used by other processes while a block ran (/proc/stat)
* matmul_ceiling()          this machine's fp32 GEMM rate (numpy/OpenBLAS, and torch)
* openblas_avx512_ceiling() the same for numpy with OpenBLAS forced onto AVX-512 kernels
* MatmulCeiling             the best of these as a contender, timed in the same rounds
* markdown_table()          a plain GitHub markdown table
* write_section()           replace (or add) one marker-delimited section of RESULTS.md

Run the benchmarks as scripts from the repository root, e.g.
    python benchmarks/bench_prefill.py
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"

RESULTS_HEADER = """# attngen benchmark results

Measured numbers, written by the scripts in `benchmarks/`. Each section below is
owned by one script and is replaced whole when that script runs again; edit the
scripts, not the sections.
"""


# --------------------------------------------------------------------------- machine

def cpu_count() -> int:
    """Cores this process may run on (what attngen uses by default)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpuinfo_fields() -> dict:
    fields: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break   # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """'AMD EPYC (family 26, model 2)' style: the name plus the numbers a VM cannot hide."""
    fields = _cpuinfo_fields()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    name = re.sub(r"\s+", " ", name)
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def openblas_core() -> str | None:
    """The kernel set numpy's OpenBLAS picked at run time ('Haswell', 'SkylakeX', ...).

    Best effort: asks the OpenBLAS bundled in numpy's wheel through ctypes; None if
    numpy uses another BLAS or the library cannot be found.
    """
    import ctypes
    libs_dir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs_dir.glob("*openblas*")) if libs_dir.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def _blas_name() -> str:
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:   # older numpy: no dict mode
        text = "unknown BLAS"
    core = openblas_core()
    return text + (f", `{core}` kernels" if core else "")


def cpu_flags() -> frozenset:
    return frozenset(_cpuinfo_fields().get("flags", "").split())


@dataclass
class MachineInfo:
    cpu: str
    cores: int
    isa: str
    python: str
    numpy: str
    blas: str
    torch: str | None = None
    extra: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Markdown bullet lines describing the machine."""
        out = [f"- CPU: {self.cpu}, {self.cores} cores available to the process",
               f"- attngen ISA: `{self.isa}`",
               f"- Python {self.python}, numpy {self.numpy} ({self.blas})"
               + (f", torch {self.torch}" if self.torch else ", torch not installed")]
        out += [f"- {k}: {v}" for k, v in self.extra.items()]
        return out


def source_version() -> str:
    """attngen's version and, in a git checkout, its commit (+ whether attngen/ has edits)."""
    import subprocess
    import attngen
    text = f"attngen {attngen.__version__}"
    root = BENCH_DIR.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "attngen"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return text
    if commit.returncode == 0 and commit.stdout.strip():
        text += f" at commit {commit.stdout.strip()}"
        if dirty.returncode == 0 and dirty.stdout.strip():
            text += " with uncommitted changes in attngen/"
    return text


def machine_info(torch_module=None) -> MachineInfo:
    import attngen.toolchain
    try:
        isa = attngen.toolchain.detect().isa
    except Exception as exc:   # no compiler: the benchmark will fail later anyway
        isa = f"unknown ({exc})"
    return MachineInfo(cpu=cpu_model(), cores=cpu_count(), isa=isa,
                       python=platform.python_version(), numpy=np.__version__,
                       blas=_blas_name(),
                       torch=getattr(torch_module, "__version__", None),
                       extra={"Source": source_version()})


def load_torch(threads: int):
    """torch with `threads` intra-op threads, or None (with a note) if it is not importable."""
    try:
        import torch
    except Exception as exc:   # ImportError, or a broken install
        print(f"note: torch is not importable ({type(exc).__name__}: {exc}); "
              f"skipping the torch contenders", file=sys.stderr)
        return None
    torch.set_num_threads(threads)
    return torch


# --------------------------------------------------------------------------- background load

def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, steal) seconds of all CPUs since boot from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(x) for x in fields[1:]]
    values += [0.0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (user + nice + system + irq + softirq) / tick, steal / tick


# Worker processes this benchmark started (MatmulCeiling): their CPU time is ours.
_HELPER_PIDS: set[int] = set()


def _helper_cpu_seconds() -> float:
    """CPU seconds the helper processes have used (utime + stime from /proc/<pid>/stat)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _HELPER_PIDS:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (float(fields[11]) + float(fields[12])) / tick   # utime, stime
    return total


class LoadMonitor:
    """How busy the machine was with work other than this process, while a block ran.

        with LoadMonitor() as load:
            ...
        load.other_cores   # average cores used by other processes (0 = quiet machine)
        load.steal_cores   # average cores the hypervisor took away

    Busy CPU time from /proc/stat minus this process's own CPU time (all its threads, and
    its helper processes), over the wall time. Coarse (clock ticks), but enough to flag a
    run that shared the machine with a test suite or a compiler. NaN where /proc/stat is
    missing.
    """

    def __enter__(self):
        self._wall = time.perf_counter()
        self._own = time.process_time() + _helper_cpu_seconds()
        self._stat = _cpu_jiffies()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        own = time.process_time() + _helper_cpu_seconds() - self._own
        stat = _cpu_jiffies()
        if self._stat is None or stat is None or wall <= 0:
            self.other_cores = self.steal_cores = math.nan
        else:
            busy = stat[0] - self._stat[0]
            self.other_cores = max(0.0, (busy - own) / wall)
            self.steal_cores = max(0.0, (stat[1] - self._stat[1]) / wall)
        self.wall = wall
        return False


# --------------------------------------------------------------------------- correctness

class AccuracyError(AssertionError):
    pass


def check_against_reference(name: str, out, ref: np.ndarray, tol: float) -> float:
    """Max abs error of `out` vs the float64 reference; raises AccuracyError above `tol`."""
    out = np.asarray(out)
    if out.shape != ref.shape:
        raise AccuracyError(f"{name}: output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        raise AccuracyError(f"{name}: output has non-finite values")
    err = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
    if not err <= tol:
        raise AccuracyError(f"{name}: max abs error {err:.3e} vs the float64 reference "
                            f"exceeds the tolerance {tol:.0e}")
    return err


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: a quick noise indicator."""
        return (max(self.seconds) - self.min) / self.median if self.median else 0.0


@dataclass(frozen=True)
class Elapsed:
    """What a contender that times itself returns (it does untimed work around the calls it
    measures, such as evicting the caches): time_round_robin records these seconds instead
    of the whole call's."""
    seconds: float


def wait_for_quiet(max_other: float, window: float = 0.5, timeout: float = 60.0) -> bool:
    """Sleep until other processes use at most `max_other` cores over `window` seconds.

    Gives up after `timeout` seconds and returns False (the caller goes on and
    records the load); True once the machine is quiet. Always True without /proc/stat.
    Says on stderr when it has to wait.
    """
    deadline = time.monotonic() + timeout
    told = False
    while True:
        with LoadMonitor() as load:
            time.sleep(window)
        if math.isnan(load.other_cores) or load.other_cores <= max_other:
            return True
        if not told:
            print(f"  (waiting up to {timeout:.0f} s for other processes to quieten: they use "
                  f"{load.other_cores:.2f} cores)", file=sys.stderr, flush=True)
            told = True
        if time.monotonic() >= deadline:
            return False


@dataclass
class RoundRobinStats:
    """What happened around the timed rounds (see time_round_robin)."""
    rounds_discarded: int = 0
    other_cores: list = field(default_factory=list)   # per kept round
    gave_up_waiting: int = 0

    @property
    def max_other(self) -> float:
        return max(self.other_cores) if self.other_cores else math.nan


def time_round_robin(contenders: Mapping[str, Callable[[], object]], repeats: int,
                     warmup: int = 1, gap: float = 0.0, max_other: float | None = None,
                     max_discards: int | None = None,
                     stats: RoundRobinStats | None = None,
                     settle: Mapping[str, Callable[[], object]] | bool | None = None
                     ) -> dict[str, Timing]:
    """Warm each contender up, then time `repeats` rounds of one call each, in turn.

    Interleaving (a, b, c, a, b, c, ...) spreads slow drifts in the machine (other
    load, clock changes) over all contenders alike instead of penalising one.

    gap: seconds to sleep (untimed) before each call, so that thread pools left
    spinning by the previous contender (OpenBLAS workers busy-wait ~0.1 s after a
    call) have gone to sleep and do not compete with the next one.

    max_other: on a shared machine, wait before each round until other processes
    use at most this many cores (see wait_for_quiet), and discard and redo a round
    during which they used more, at most `max_discards` times (default 2 * repeats);
    after that, rounds are kept whatever the load. After one wait that timed out,
    later rounds do not wait. Per-round loads go to `stats`.

    settle: per contender, an untimed call made after the gap, right before the timed one
    (True: the contender itself). After an idle gap this VM runs the next ~0.1 s slower
    (causal S2048 prefill alone: 127 ms right after 0.25 s idle, 110 ms after a settling
    call), which would charge every contender a wake-up that real back-to-back use does
    not pay, and the fastest the most.
    """
    if settle is True:
        settle = contenders
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    stats = stats if stats is not None else RoundRobinStats()
    if max_discards is None:
        max_discards = 2 * repeats
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    while len(stats.other_cores) < repeats:
        if (max_other is not None and not stats.gave_up_waiting
                and not wait_for_quiet(max_other)):
            stats.gave_up_waiting += 1
        this_round = {}
        with LoadMonitor() as load:
            for name, fn in contenders.items():
                if gap > 0:
                    time.sleep(gap)
                if settle and name in settle:
                    settle[name]()     # untimed: absorbs the wake-up after the gap
                start = time.perf_counter()
                result = fn()
                elapsed = time.perf_counter() - start
                this_round[name] = result.seconds if isinstance(result, Elapsed) else elapsed
        # The monitor spans the gaps too; our own workers' spinning there counts as ours.
        noisy = (max_other is not None and not math.isnan(load.other_cores)
                 and load.other_cores > max_other)
        if noisy and stats.rounds_discarded < max_discards:
            stats.rounds_discarded += 1
            continue
        stats.other_cores.append(load.other_cores)
        for name, seconds in this_round.items():
            times[name].append(seconds)
    return {name: Timing(ts) for name, ts in times.items()}


def burst(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """`calls` back-to-back calls of fn as one contender, as a model's decode steps run. The
    round-robin's idle gap before each burst lets thread pools that spin after a call
    (OpenBLAS, torch, OpenMP) sleep before the next contender; an untimed call (settle)
    absorbs the wake-up."""
    def run():
        for _ in range(calls):
            fn()
    return run


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    return time_round_robin({"fn": fn}, repeats, warmup)["fn"]


# --------------------------------------------------------------------------- matmul ceiling

def matmul_ceiling(n: int = 2048, repeats: int = 5, torch_module=None,
                   **round_robin) -> dict[str, float]:
    """Median fp32 GEMM rate in GFLOP/s for n x n x n (2 n^3 flops): numpy, and torch if given.

    Extra keyword arguments (gap, max_other, stats) go to time_round_robin. Each timed
    matmul follows an untimed one, like the attention contenders it is compared with."""
    rng = np.random.default_rng(1234)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    calls = {"numpy": lambda: np.matmul(a, b, out=c)}
    if torch_module is not None:
        ta, tb = torch_module.from_numpy(a), torch_module.from_numpy(b)
        tc = torch_module.empty((n, n), dtype=torch_module.float32)
        calls["torch"] = lambda: torch_module.matmul(ta, tb, out=tc)
    timings = time_round_robin(calls, repeats, settle=True, **round_robin)
    return {name: flops / t.median / 1e9 for name, t in timings.items()}


AVX512_OPENBLAS_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")


def openblas_avx512_ceiling(n: int = 2048, repeats: int = 5, coretype: str = "SkylakeX",
                            max_other: float | None = None) -> tuple[float, str] | None:
    """numpy's fp32 GEMM rate with OpenBLAS forced onto its AVX-512 kernels.

    OpenBLAS's run-time detection can pick AVX2 ('Haswell') kernels on CPUs that
    have AVX-512 (it does on AMD Zen 5 under KVM), so the default numpy matmul is
    not this machine's real fp32 ceiling. OPENBLAS_CORETYPE only takes effect when
    the library loads, hence a subprocess. Returns (GFLOP/s, core it ran) or None
    when the CPU lacks AVX-512, OpenBLAS already uses such kernels, or it fails.
    """
    import subprocess
    if "avx512f" not in cpu_flags():
        return None
    core = openblas_core()
    if core is None or core in AVX512_OPENBLAS_CORES:
        return None
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import harness; "
            f"r = harness.matmul_ceiling({n}, {repeats}, max_other={max_other!r}); "
            f"print(r['numpy'], harness.openblas_core())")
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        rate, ran_core = proc.stdout.split()
        return float(rate), ran_core
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


_CEILING_WORKER = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
import harness
n = int(sys.argv[1])
rng = np.random.default_rng(1234)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), dtype=np.float32)
np.matmul(a, b, out=c)
print(harness.openblas_core(), flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    np.matmul(a, b, out=c)
    print(time.perf_counter() - start, flush=True)
"""


class MatmulCeiling:
    """The fp32 matmul ceiling as a time_round_robin contender: each call times one
    n x n x n numpy GEMM and returns its Elapsed, so that the ceiling is measured in the
    same rounds as the kernels it bounds and the machine's drifts between rounds (15-20%
    here) charge both alike. Where OpenBLAS picked AVX2 kernels on an AVX-512 CPU (see
    openblas_avx512_ceiling), the GEMM runs in a worker process started with
    OPENBLAS_CORETYPE=SkylakeX, waiting on a pipe between calls; else in this process.
    `label` says which; close() ends the worker."""

    def __init__(self, n: int = 2048, coretype: str = "SkylakeX"):
        import subprocess
        self.n, self.flops = n, 2.0 * n ** 3
        self._proc = None
        core = openblas_core()
        if ("avx512f" in cpu_flags() and core is not None
                and core not in AVX512_OPENBLAS_CORES):
            env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
            try:
                proc = subprocess.Popen([sys.executable, "-c", _CEILING_WORKER, str(n),
                                         str(BENCH_DIR)], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
            except OSError:
                proc = None
            if proc is not None and proc.stdout.readline().strip() == coretype:
                self._proc = proc
                _HELPER_PIDS.add(proc.pid)
                self.label = f"numpy with OPENBLAS_CORETYPE={coretype} (AVX-512)"
            elif proc is not None:
                proc.kill()
                proc.wait()
        if self._proc is None:
            rng = np.random.default_rng(1234)
            self._a = rng.standard_normal((n, n), dtype=np.float32)
            self._b = rng.standard_normal((n, n), dtype=np.float32)
            self._c = np.empty((n, n), dtype=np.float32)
            self.label = f"numpy (OpenBLAS, {core} kernels)" if core else "numpy"

    def __call__(self) -> Elapsed:
        if self._proc is None:
            start = time.perf_counter()
            np.matmul(self._a, self._b, out=self._c)
            return Elapsed(time.perf_counter() - start)
        self._proc.stdin.write("\n")
        self._proc.stdin.flush()
        return Elapsed(float(self._proc.stdout.readline()))

    def gflops(self, timing: Timing) -> float:
        return self.flops / timing.median / 1e9

    def close(self):
        if self._proc is not None:
            _HELPER_PIDS.discard(self._proc.pid)
            self._proc.stdin.close()
            self._proc.wait()
            self._proc = None


# --------------------------------------------------------------------------- reporting

def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else math.nan


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; align holds 'l' or 'r' per column (default: right)."""
    align = list(align) if align else ["r"] * len(headers)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width table for the terminal."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in cells[1:]])


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, path: Path | str = DEFAULT_RESULTS,
                  header: str = RESULTS_HEADER) -> Path:
    """Put `body` between the `name` markers in `path`, keeping every other section.

    A section already there is replaced in place; otherwise it is appended. A
    missing file is created with `header` first. The write is atomic (temp + rename).
    """
    path = Path(path)
    begin, end = section_markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else header.rstrip() + "\n"
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError(f"{path}: found {begin!r} but no {end!r} after it; "
                             f"fix the file by hand")
        text = text[:start] + block + text[stop + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
