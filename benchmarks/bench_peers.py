"""attngen against its peers: numpy, torch SDPA, flex_attention, ONNX Runtime GQA.

    python benchmarks/bench_peers.py [--cases causal-2048 decode-4k ...] [--dtypes fp32 bf16]
                                     [--repeats 5] [--quick] [--no-plot] [--output FILE]

Every case runs each contender on the same seeded inputs (drawn once, rounded to bf16
values and kept in float32, so the fp32 and bf16 runs see the same numbers and share one
float64 reference from attngen.reference.attention_reference). Each contender's output is
checked against that reference before it is timed; a peer that fails the check, or cannot
express the case, is reported as n/a with the reason (attngen failing the check stops the
run). Contenders and how they are called: see peer_contenders.py.

Timing (harness.time_round_robin): contenders interleaved round-robin, 0.25 s idle before
each turn, waiting for a quiet machine and redoing rounds that other processes disturbed
(more than 0.1 cores busy). Each turn starts with one untimed call (the cores run slow
right after idling). Prefill: then one timed call. Decode: then a burst of 5
back-to-back calls (as a model's decode steps run), beside a memory
read kernel (membw.py) that streams the case's own fp32 K and V, timed in the same rounds.
When bf16 runs too, attngen's bf16 call also joins every fp32 run's rounds, so the bf16
speed-up over fp32 compares medians from the same rounds. flex_attention's first call (the
torch.compile) is timed on its own and reported as its compile time.

In the same run, the machine's fp32 matmul ceilings (harness.matmul_ceiling, and
harness.openblas_avx512_ceiling where OpenBLAS picked AVX2 kernels on an AVX-512 CPU).

Results: stdout, the `peers` section of benchmarks/RESULTS.md, benchmarks/peers.png.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import peer_contenders as pc  # noqa: E402
from peer_contenders import AttnCase  # noqa: E402

from attngen.reference import attention_reference  # noqa: E402

SECTION = "peers"
DEFAULT_PLOT = harness.BENCH_DIR / "peers.png"
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
NOISY_LOAD = 0.1
DEFAULT_GAP = 0.25
BURST = 5                       # decode: timed back-to-back calls per turn
# attngen's bf16 call, timed again inside the fp32 rounds: bf16 / fp32 then compares two
# medians from the same rounds, which the separate bf16 run's rounds cannot (the machine
# drifts 15-30% between them).
BF16_BESIDE = "attngen bf16"
# The fp32 matmul ceiling, timed in every fp32 prefill run's rounds as well as at the start
# and end of the run: attngen's fraction of it then compares medians from the same rounds.
CEILING = "matmul ceiling"
CEILING_N = 2048
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}   # max abs error vs the float64 reference

_P = dict(phase="prefill", batch=1, heads_q=32, heads_kv=8, head_dim=128)
_D = dict(phase="decode", batch=1, heads_q=32, heads_kv=8, head_dim=128, seq_q=1)
CASES = [
    AttnCase("causal-512", seq_q=512, seq_kv=512, **_P),
    AttnCase("causal-2048", seq_q=2048, seq_kv=2048, **_P),
    AttnCase("causal-4096", seq_q=4096, seq_kv=4096, slow=True, **_P),
    AttnCase("causal-8192", seq_q=8192, seq_kv=8192, slow=True, numpy=False,
             check_kv_heads=1, default=False, **_P),
    AttnCase("window-4096", seq_q=4096, seq_kv=4096, window=1024, slow=True, **_P),
    AttnCase("softcap-2048", phase="prefill", batch=1, heads_q=8, heads_kv=4, head_dim=256,
             seq_q=2048, seq_kv=2048, softcap=50.0, q_scale=10.0),
    AttnCase("docs-4096", phase="prefill", batch=1, heads_q=16, heads_kv=16, head_dim=64,
             seq_q=4096, seq_kv=4096, documents=8),
    AttnCase("decode-4k", seq_kv=4096, **_D),
    AttnCase("decode-16k", seq_kv=16384, **_D),
    AttnCase("decode-64k", seq_kv=65536, slow=True, **_D),
    AttnCase("decode-b8-4k", **dict(_D, batch=8), seq_kv=4096),
    AttnCase("decode-mqa-64k", **dict(_D, heads_q=4, heads_kv=1), seq_kv=65536),
]
CASE_BY_NAME = {c.name: c for c in CASES}
DTYPES = ("fp32", "bf16")


# --------------------------------------------------------------------------- one case

def reference_for(case: AttnCase, inputs: pc.CaseInputs) -> tuple[np.ndarray, str]:
    """float64 reference (of the first check_kv_heads kv heads' query heads, if set)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    checked = "all heads"
    if case.check_kv_heads:
        n = case.check_kv_heads
        q, k, v = q[:, :n * case.group], k[:, :n], v[:, :n]
        checked = f"query heads 0-{n * case.group - 1} (kv heads 0-{n - 1}) of {case.heads_q}"
    ref = attention_reference(q, k, v, scale=case.scale, **case.attngen_kwargs())
    return ref, checked


class Session:
    """What lasts across cases: threads, torch, the current case's memory reader, disabled
    peers."""

    def __init__(self, args, threads, torch):
        self.args, self.threads, self.torch = args, threads, torch
        self.disabled: dict[str, str] = {}     # peer -> why it is off for every case
        self.kernels: dict = {}                # (case, dtype) -> attngen kernel build info
        self._reader = None
        self._ceiling = None

    def matmul_ceiling(self) -> harness.MatmulCeiling:
        if self._ceiling is None:
            self._ceiling = harness.MatmulCeiling(CEILING_N)
        return self._ceiling

    def ceiling_label(self) -> str:
        return self._ceiling.label if self._ceiling is not None else "not timed"

    def close(self):
        if self._ceiling is not None:
            self._ceiling.close()

    def memory_reader(self, inputs):
        """Reads this case's own K and V in the storage dtype of the timed contenders'
        fp32 runs (the same pages for every dtype of the case)."""
        if self._reader is None or self._reader[0] is not inputs:
            import membw
            self._reader = (inputs, membw.reader(self.threads, arrays=[inputs.k, inputs.v]))
        return self._reader[1]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def prepare(session: Session, case: AttnCase, inputs, dtype: str):
    prepared, na = {}, {}
    for name in session.args.contenders:
        if name in session.disabled:
            na[name] = session.disabled[name]
            continue
        try:
            prepared[name] = pc.BUILDERS[name](case, inputs, dtype, session.threads,
                                               torch=session.torch)
        except pc.FlexUnavailable as exc:
            session.disabled[name] = str(exc)
            na[name] = str(exc)
        except pc.NotApplicable as exc:
            na[name] = str(exc)
            if name == "flex" and str(exc).startswith("torch.compile failed"):
                session.disabled[name] = f"off after it failed on {case.name}: {exc}"
        except Exception as exc:        # a peer's own failure must not stop the run
            if name == "attngen":
                raise
            na[name] = f"setup raised {type(exc).__name__}: {_first_line(exc)}"
        if name in na:
            print(f"  {pc.LABELS[name]} {dtype}: n/a ({na[name]})", flush=True)
    if "attngen" not in prepared:
        raise RuntimeError(f"attngen could not run {case.name} {dtype}: {na.get('attngen')}")
    return prepared, na


def check(case: AttnCase, dtype: str, prepared: dict, na: dict, ref: np.ndarray,
          tol: float) -> dict:
    errors = {}
    heads = ref.shape[1]
    for name in list(prepared):
        try:
            out = prepared[name].to_numpy(prepared[name].call())[:, :heads]
            errors[name] = harness.check_against_reference(
                f"{pc.LABELS[name]} ({case.name} {dtype})", out, ref, tol)
        except Exception as exc:
            if name == "attngen":
                raise
            na[name] = (f"failed the accuracy check ({exc})"
                        if isinstance(exc, harness.AccuracyError)
                        else f"raised {type(exc).__name__}: {_first_line(exc)}")
            print(f"  {pc.LABELS[name]} {dtype}: {na[name]}", file=sys.stderr, flush=True)
            del prepared[name]
    return errors


def run_dtype(session: Session, case: AttnCase, inputs, dtype: str, ref, checked) -> dict:
    args = session.args
    prepared, na = prepare(session, case, inputs, dtype)
    errors = check(case, dtype, prepared, na, ref, args.tol[dtype])
    if dtype == "fp32" and "bf16" in args.dtypes:
        beside = pc.BUILDERS["attngen"](case, inputs, "bf16", session.threads)
        out = beside.to_numpy(beside.call())[:, :ref.shape[1]]
        errors[BF16_BESIDE] = harness.check_against_reference(
            f"{BF16_BESIDE} ({case.name}, in the fp32 rounds)", out, ref, args.tol["bf16"])
        prepared[BF16_BESIDE] = beside
    stats = harness.RoundRobinStats()
    calls = {name: p.call for name, p in prepared.items()}
    nbytes = {name: case.kv_bytes("bf16" if name == BF16_BESIDE else dtype) for name in calls}
    if case.phase == "prefill":
        if dtype == "fp32":
            calls[CEILING] = session.matmul_ceiling()
        timings = harness.time_round_robin(calls, args.repeats, warmup=0, gap=args.gap,
                                           max_other=args.max_other, stats=stats,
                                           settle=True)
    else:
        read, read_bytes = session.memory_reader(inputs)
        calls["memory read"] = read
        nbytes["memory read"] = read_bytes
        bursts = {n: harness.burst(fn, BURST) for n, fn in calls.items()}
        timings = harness.time_round_robin(bursts, args.repeats, warmup=0, gap=args.gap,
                                           max_other=args.max_other, stats=stats,
                                           settle=calls)
        timings = {n: harness.Timing([t / BURST for t in timing.seconds])
                   for n, timing in timings.items()}
    setup = {name: p.setup for name, p in prepared.items()}
    setup["attngen"] = session.kernels.get((case.name, dtype), setup.get("attngen", {}))
    del prepared, calls
    gc.collect()
    return {"case": case, "dtype": dtype, "timings": timings, "errors": errors, "na": na,
            "setup": setup, "stats": stats, "bytes": nbytes, "checked": checked}


def run_case(session: Session, case: AttnCase, dtypes=None) -> list[dict]:
    inputs = pc.CaseInputs.make(case, session.args.seed)
    start = time.perf_counter()
    ref, checked = reference_for(case, inputs)
    ref_seconds = time.perf_counter() - start
    print(f"{case.name} ({case.shape_text()}): reference {ref_seconds:.1f} s on {checked}",
          flush=True)
    results = []
    for dtype in dtypes or session.args.dtypes:
        r = run_dtype(session, case, inputs, dtype, ref, checked)
        inputs.drop(dtype)
        results.append(r)
        print("  " + summary_line(r), flush=True)
    return results


def redo_noisy(session: Session, results: list[dict]) -> list[dict]:
    """Run once more every run whose kept rounds still saw other processes busy (the
    round-robin keeps rounds whatever the load once it has redone 2 x repeats of them),
    and keep whichever of the two saw less load."""
    limit = session.args.max_other
    noisy: dict[str, list[str]] = {}
    for r in results:
        if r["stats"].max_other > limit:
            noisy.setdefault(r["case"].name, []).append(r["dtype"])
    if not noisy:
        return results
    print("\nredoing runs timed while other processes were busy: "
          + ", ".join(f"{n} {' '.join(d)}" for n, d in noisy.items()), flush=True)
    again = {}
    for name, dtypes in noisy.items():
        for r in run_case(session, CASE_BY_NAME[name], dtypes):
            again[name, r["dtype"]] = r
    merged = []
    for r in results:
        new = again.get((r["case"].name, r["dtype"]))
        if new is not None and new["stats"].max_other < r["stats"].max_other:
            new["redone"] = True
            # The second compile hits the caches the first filled: keep the first's times.
            if "flex" in r["setup"]:
                new["setup"]["flex"] = r["setup"]["flex"]
            r = new
        merged.append(r)
    return merged


# --------------------------------------------------------------------------- numbers

def peer_names(r) -> list[str]:
    return [n for n in pc.PEERS if n in r["timings"]]


def best_peer(r) -> tuple[str | None, float]:
    peers = peer_names(r)
    if not peers:
        return None, math.nan
    name = min(peers, key=lambda n: r["timings"][n].median)
    return name, r["timings"][name].median


def speedup(r) -> float:
    """best peer's median / attngen's median (> 1: attngen is faster)."""
    _, best = best_peer(r)
    return best / r["timings"]["attngen"].median


def rate(r, name: str, which: str = "median") -> float:
    """GFLOP/s (prefill) or GB/s of K and V read (decode) of one contender."""
    t = getattr(r["timings"][name], which)
    if name == CEILING:
        return harness.gflops(2.0 * CEILING_N ** 3, t)
    if r["case"].phase == "prefill":
        return harness.gflops(r["case"].flops(), t)
    return r["bytes"][name] / t / 1e9


def ceiling_fraction(r) -> float:
    """attngen's GFLOP/s over the matmul ceiling's, both medians of the same rounds."""
    if CEILING not in r["timings"]:
        return math.nan
    return rate(r, "attngen") / rate(r, CEILING)


def read_bandwidth(r) -> float:
    t = r["timings"].get("memory read")
    return r["bytes"]["memory read"] / t.median / 1e9 if t else math.nan


def flex_compile(r) -> float:
    return r["setup"].get("flex", {}).get("compile", math.nan)


def summary_line(r) -> str:
    unit = "GFLOP/s" if r["case"].phase == "prefill" else "GB/s"
    parts = [f"{pc.LABELS.get(n, n)} {t.median * 1e3:.2f} ms ({rate(r, n):.1f} {unit})"
             for n, t in r["timings"].items()]
    best, _ = best_peer(r)
    text = f"{r['dtype']}: " + ", ".join(parts)
    if best:
        text += f"; attngen vs best peer ({pc.LABELS[best]}) {speedup(r):.2f}x"
    if not math.isnan(flex_compile(r)):
        text += f"; flex compile {flex_compile(r):.1f} s"
    text += (f"; other load <= {r['stats'].max_other:.2f} cores, "
             f"{r['stats'].rounds_discarded} rounds redone")
    return text


# --------------------------------------------------------------------------- tables

def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _cell(r, name: str) -> str:
    if name in r["timings"]:
        return f"{_ms(r['timings'][name].median)} ({rate(r, name):.1f})"
    return "n/a" if name in r["na"] else "-"


def main_table(results: list[dict], phase: str, names: list[str]):
    unit = "GFLOP/s" if phase == "prefill" else "GB/s"
    headers = ["case", "shape", "dtype"] + [f"{pc.LABELS[n]} ms ({unit})" for n in names]
    if phase == "decode":
        headers += ["memory read GB/s", "attngen of read BW"]
    else:
        headers += ["matmul ceiling GFLOP/s", "attngen of ceiling"]
    headers += ["best peer", "attngen speed-up"] + (["flex compile s"] if "flex" in names else [])
    rows = []
    for r in results:
        if r["case"].phase != phase:
            continue
        best, _ = best_peer(r)
        row = [r["case"].name, r["case"].shape_text(), r["dtype"]]
        row += [_cell(r, n) for n in names]
        if phase == "decode":
            bw = read_bandwidth(r)
            row += [f"{bw:.1f}", f"{rate(r, 'attngen') / bw:.0%}"]
        elif CEILING in r["timings"]:
            row += [f"{rate(r, CEILING):.1f}", f"{ceiling_fraction(r):.0%}"]
        else:
            row += ["-", "-"]
        row += [pc.LABELS[best] if best else "-", f"**{speedup(r):.2f}x**" if best else "-"]
        if "flex" in names:
            row.append(f"{flex_compile(r):.1f}" if not math.isnan(flex_compile(r)) else "n/a")
        rows.append(row)
    align = ["l", "l", "l"] + ["r"] * (len(headers) - 3)
    align[headers.index("best peer")] = "l"
    return headers, rows, align


def bf16_table(results):
    """bf16 speed-up over fp32 per case: from the two medians timed in the same (fp32)
    rounds, and, for comparison, from the separate fp32 and bf16 runs."""
    separate = {(r["case"].name, r["dtype"]): r for r in results}
    headers = ["case", "shape", "fp32 ms", "bf16 ms (same rounds)",
               "bf16 speed-up (same rounds)", "bf16 speed-up (separate runs)"]
    rows = []
    for r in results:
        if r["dtype"] != "fp32" or BF16_BESIDE not in r["timings"]:
            continue
        fp32, bf16 = r["timings"]["attngen"].median, r["timings"][BF16_BESIDE].median
        other = separate.get((r["case"].name, "bf16"))
        apart = (f"{fp32 / other['timings']['attngen'].median:.2f}x" if other else "-")
        rows.append([r["case"].name, r["case"].shape_text(), _ms(fp32), _ms(bf16),
                     f"**{fp32 / bf16:.2f}x**", apart])
    return headers, rows, ["l", "l", "r", "r", "r", "r"]


def error_table(results, names):
    headers = ["case", "dtype"] + [pc.LABELS[n] for n in names] + ["checked on"]
    rows = []
    for r in results:
        rows.append([r["case"].name, r["dtype"]]
                    + [f"{r['errors'][n]:.1e}" if n in r["errors"] else "n/a" for n in names]
                    + [r["checked"]])
    return headers, rows, ["l", "l"] + ["r"] * len(names) + ["l"]


def detail_table(results):
    headers = ["case", "dtype", "contender", "median ms", "min ms", "rate (median)",
               "rate (min)", "spread", "other load", "rounds redone"]
    rows = []
    for r in results:
        unit = "GFLOP/s" if r["case"].phase == "prefill" else "GB/s"
        for name, t in r["timings"].items():
            rows.append([r["case"].name, r["dtype"], pc.LABELS.get(name, name),
                         _ms(t.median), _ms(t.min), f"{rate(r, name):.1f} {unit}",
                         f"{rate(r, name, 'min'):.1f} {unit}", f"{t.spread:.0%}",
                         f"{r['stats'].max_other:.2f}", str(r["stats"].rounds_discarded)])
    return headers, rows, ["l", "l", "l"] + ["r"] * 7


def setup_table(results):
    headers = ["case", "dtype", "flex compile s (first call)", "flex block mask s",
               "attngen kernel"]
    rows = []
    for r in results:
        flex = r["setup"].get("flex", {})
        ag = r["setup"].get("attngen", {})
        rows.append([r["case"].name, r["dtype"],
                     f"{flex['compile']:.1f}" if "compile" in flex else "n/a",
                     f"{flex['block mask']:.2f}" if "block mask" in flex else "-",
                     f"`{ag.get('kernel', '?')}`"])
    return headers, rows, ["l", "l", "r", "r", "l"]


def na_lines(results, session: Session) -> list[str]:
    """One line per (contender, reason): the runs it covers."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        for name, reason in r["na"].items():
            groups.setdefault((name, reason), []).append(r)
    lines = []
    for (name, reason), runs in groups.items():
        dtypes = {r["dtype"] for r in runs}
        if len(dtypes) == 1 and len(runs) == sum(r["dtype"] in dtypes for r in results) > 1:
            where = f"every {dtypes.pop()} run"
        else:
            where = ", ".join(f"{r['case'].name} {r['dtype']}" for r in runs)
        lines.append(f"- {pc.LABELS[name]}: {reason} — {where}")
    return lines


# --------------------------------------------------------------------------- report

def measure_ceilings(torch, args) -> dict:
    """fp32 2048^3 GEMM GFLOP/s: numpy, torch, and numpy forced onto AVX-512 kernels."""
    ceilings = harness.matmul_ceiling(2048, 5, torch, gap=args.gap, max_other=args.max_other)
    forced = harness.openblas_avx512_ceiling(2048, 5, max_other=args.max_other)
    if forced is not None:
        ceilings["numpy-avx512"] = forced[0]
    return ceilings


def ceiling_label(name: str) -> str:
    core = harness.openblas_core()
    return {"numpy": f"numpy (OpenBLAS, {core} kernels)" if core else "numpy",
            "torch": "torch.matmul",
            "numpy-avx512": "numpy with OPENBLAS_CORETYPE=SkylakeX (AVX-512)"}.get(name, name)


def ceiling_text(ceilings: dict) -> str:
    return "; ".join(f"{ceiling_label(n)} {v:.1f} GFLOP/s" for n, v in ceilings.items())


def best_ceilings(start: dict, end: dict) -> dict:
    """Per GEMM, the better of the two measurements (noise only ever slows a run down)."""
    return {n: max(start.get(n, 0.0), end.get(n, 0.0)) for n in {**start, **end}}


def command_line(args) -> str:
    parts = ["python benchmarks/bench_peers.py"]
    if args.case_names != [c.name for c in CASES if c.default]:
        parts += ["--cases", *args.case_names]
    if list(args.dtypes) != list(DTYPES):
        parts += ["--dtypes", *args.dtypes]
    parts += ["--repeats", str(args.repeats)]
    if args.quick:
        parts.append("--quick")
    if list(args.contenders) != list(pc.CONTENDERS):
        parts += ["--peers", *[n for n in args.contenders if n != "attngen"]]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.max_other is None:
        parts.append("--no-wait")
    return " ".join(parts)


def render(results, session: Session, machine, measured: tuple, versions: dict,
           plot) -> str:
    args = session.args
    names = [n for n in pc.CONTENDERS if n in args.contenders]
    start, end = measured
    ceilings = best_ceilings(start, end)
    best_ceiling = max(ceilings.values(), default=math.nan)
    worst = max((r["stats"].max_other for r in results), default=math.nan)
    redone = sum(r["stats"].rounds_discarded for r in results)
    lines = ["## attngen vs peers", "",
             "attngen against numpy, torch SDPA, torch flex_attention (torch.compile) and "
             "ONNX Runtime's GroupQueryAttention, on the same seeded inputs; every output is "
             "checked against the float64 reference before it is timed.", "",
             f"- Date: {harness.today()}", *machine.lines(),
             "- Peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- Threads: {session.threads} for every contender (attngen `num_threads`, "
             "`torch.set_num_threads`, ORT `intra_op_num_threads`, OpenBLAS default)",
             "- fp32 matmul ceiling (2048³, median of 5, measured at the start and at the "
             "end of this run; the better of the two, as noise only slows): "
             + "; ".join(f"{ceiling_label(n)} {v:.1f} GFLOP/s (start {start.get(n, math.nan):.1f}"
                         f", end {end.get(n, math.nan):.1f})" for n, v in ceilings.items()),
             f"- Background load while timing: other processes used at most {worst:.2f} of "
             f"{machine.cores} cores during any kept round ({redone} noisier rounds redone"
             + (f"; rounds above {args.max_other} cores are redone" if args.max_other
                is not None else "") + ")",
             f"- Reproduce (from the repository root): `{command_line(args)}`", "",
             f"Median of {args.repeats} timed rounds, contenders interleaved round-robin with "
             f"{args.gap:g} s idle and one untimed call (the cores run slow right after "
             "idling) at the start of each turn. Prefill: then one timed call; cell = "
             "median ms (GFLOP/s), counting 4·B·Hq·D per visible (query, key) pair for "
             "everyone (causal S(S+1)/2 pairs, window Σ min(i+1, w), documents Σ L(L+1)/2). "
             f"Decode: then {BURST} back-to-back timed calls; "
             "cell = median ms per call (GB/s of K+V read in the contender's storage dtype); "
             "the memory read kernel (`membw.c`, all threads, over the case's own fp32 K and V) "
             "is timed in the same rounds. fp32 prefill rounds also time the fp32 matmul "
             f"ceiling ({CEILING_N}³ GEMM, {session.ceiling_label()}) as one more contender: "
             "'attngen of ceiling' divides attngen's GFLOP/s by its, both medians of the same "
             "rounds. **attngen speed-up = best peer's median / attngen's median** (> 1: "
             "attngen is faster). bf16 runs use the same values as fp32 (inputs are "
             "bf16-representable). flex compile = the first call's wall time "
             f"(torch.compile, {session.flex_cache_note}; the run's first compile also pays "
             "torch.compile's one-off start-up), not in the medians.", ""]
    for phase, title in (("prefill", "Prefill"), ("decode", "Decode (Sq = 1)")):
        if any(r["case"].phase == phase for r in results):
            headers, rows, align = main_table(results, phase, names)
            lines += [f"### {title}", "", harness.markdown_table(headers, rows, align), ""]
    headers, rows, align = bf16_table(results)
    if rows:
        lines += ["### bf16 against fp32", "",
                  f"attngen's bf16 call is also timed inside every fp32 run's rounds ("
                  f"{BF16_BESIDE!r} there, checked against the reference with the bf16 "
                  "limit first), so its speed-up over fp32 compares medians from the same "
                  "rounds. The separate bf16 run's rounds come later, on a machine whose "
                  "speed drifts between them; its ratio is shown for comparison.", "",
                  harness.markdown_table(headers, rows, align), ""]
    prefill = [r for r in results if r["case"].phase == "prefill" and r["dtype"] == "fp32"]
    same_rounds = [ceiling_fraction(r) for r in prefill if CEILING in r["timings"]]
    if same_rounds:
        causal = [f"{r['case'].name} {ceiling_fraction(r):.1%}" for r in prefill
                  if r["case"].name.startswith("causal-") and CEILING in r["timings"]]
        lines += [f"attngen's fp32 prefill runs reach {min(same_rounds):.0%}-"
                  f"{max(same_rounds):.0%} of the matmul ceiling timed in their own rounds"
                  + (f" ({', '.join(causal)})" if causal else "") + ".", ""]
    if prefill and not math.isnan(best_ceiling):
        fractions = [rate(r, "attngen") / best_ceiling for r in prefill]
        lines += [f"Against the best ceiling measured at the start or end of the run "
                  f"({best_ceiling:.0f} GFLOP/s) they reach {min(fractions):.0%}-"
                  f"{max(fractions):.0%}.", ""]
    redone_runs = [f"{r['case'].name} {r['dtype']}" for r in results if r.get("redone")]
    if redone_runs:
        lines += ["Timed a second time because other processes were busy during the first "
                  "(the quieter of the two is shown; flex compile from the first): "
                  + ", ".join(redone_runs) + ".", ""]
    na = na_lines(results, session)
    if na:
        lines += ["Not available (n/a):", "", *na, ""]
    headers, rows, align = error_table(results, names)
    lines += [f"Max abs error vs the float64 reference (limits: fp32 {args.tol['fp32']:.0e}, "
              f"bf16 {args.tol['bf16']:.0e}):", "", harness.markdown_table(headers, rows, align),
              ""]
    headers, rows, align = setup_table(results)
    lines += ["<details><summary>Setup times: flex_attention compile and block mask, attngen "
              "kernel</summary>", "", harness.markdown_table(headers, rows, align), "",
              "</details>", ""]
    headers, rows, align = detail_table(results)
    lines += ["<details><summary>Median and min of every contender</summary>", "",
              harness.markdown_table(headers, rows, align), "", "</details>", "",
              "Contenders: **attngen** = `attngen.attention(q, k, v, causal=True, window=, "
              "softcap=, document_ids=)` on numpy arrays (bf16: `ml_dtypes.bfloat16`); "
              "**numpy** = materialised float32 softmax per (batch, head) with an additive "
              "0/-inf mask (decode: per kv head with its query-head group); **torch SDPA** = "
              "`scaled_dot_product_attention(..., enable_gqa=True)` with `is_causal=True`, or "
              "a boolean `attn_mask` for the window and documents, no mask for decode; "
              "**flex_attention** = `torch.compile(flex_attention, dynamic=False)` with a "
              "`create_block_mask` BlockMask (causal, window, documents) and a tanh "
              "`score_mod` for the softcap, `enable_gqa=True`; **ORT GQA** = a one-node "
              "`com.microsoft.GroupQueryAttention` model (query/key/value [B, S, H·D], "
              "`local_window_size`, `softcap`, documents as an additive `attention_bias`) on "
              "the CPU provider through an IOBinding with preallocated outputs; for decode "
              "its past_key/past_value and present_key/present_value share one "
              "[B, Hkv, Skv, D] buffer (the KV cache) and key/value carry the newest token. "
              "Each contender gets its inputs in its own layout, converted before timing."]
    if plot:
        link = os.path.relpath(Path(plot).resolve(), Path(args.output).resolve().parent)
        lines += ["", f"![time of each contender relative to the best peer]"
                      f"({Path(link).as_posix()})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot

COLORS = {"attngen": "#1f4e9c", "numpy": "#f2b880", "sdpa": "#e8878a", "flex": "#9fd39a",
          "ort": "#b9a3d6"}


def draw_plot(results, session: Session, machine, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"note: matplotlib is not importable ({type(exc).__name__}: {exc}); "
              f"no plot drawn", file=sys.stderr)
        return False
    dtypes = [d for d in session.args.dtypes if any(r["dtype"] == d for r in results)]
    names = [n for n in pc.CONTENDERS if any(n in r["timings"] for r in results)]
    width = max(8.0, 0.62 * max(sum(r["dtype"] == d for r in results) for d in dtypes) + 2)
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, 3.9 * len(dtypes) + 0.9),
                             dpi=120, squeeze=False)
    ratios_all = []
    for ax, dtype in zip(axes[:, 0], dtypes):
        runs = [r for r in results if r["dtype"] == dtype]
        bar = 0.8 / len(names)
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, r in enumerate(runs):
                best = best_peer(r)[1]
                if name in r["timings"] and not math.isnan(best):
                    xs.append(i + (j - (len(names) - 1) / 2) * bar)
                    ys.append(r["timings"][name].median / best)
            ratios_all += ys
            highlight = name == "attngen"
            ax.bar(xs, ys, bar * 0.92, color=COLORS.get(name, "gray"),
                   edgecolor="black" if highlight else "none", linewidth=0.8,
                   label=pc.LABELS[name], zorder=3)
            if highlight:
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points",
                                xytext=(0, 2), ha="center", va="bottom", fontsize=7,
                                color=COLORS["attngen"], fontweight="bold", zorder=4,
                                bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none",
                                          alpha=0.75))
        for i, r in enumerate(runs):
            if math.isnan(best_peer(r)[1]):
                ax.text(i, 1.0, "no peer", ha="center", fontsize=7, color="gray")
                continue
            for j, name in enumerate(names):        # mark the absent bars
                if name not in r["timings"]:
                    ax.text(i + (j - (len(names) - 1) / 2) * bar, 0.0, "n/a",
                            transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                            va="bottom", fontsize=6.5, color="gray")
        ax.axhline(1.0, color="black", linewidth=1.0, zorder=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r["case"].name for r in runs], rotation=25, ha="right",
                           fontsize=8)
        ax.set_xlim(-0.6, len(runs) - 0.4)
        if len(runs) > 1:
            prefill_end = sum(r["case"].phase == "prefill" for r in runs)
            if 0 < prefill_end < len(runs):
                ax.axvline(prefill_end - 0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_ylabel(f"{dtype}: time / best peer's time")
        ax.grid(True, axis="y", which="both", alpha=0.25, zorder=0)
        ax.set_title(dtype, fontsize=9, loc="left", fontweight="bold")
    lo = min(ratios_all + [1.0])
    hi = max(ratios_all + [1.0])
    for ax in axes[:, 0]:
        ax.set_ylim(lo / 1.6, hi * 1.6)
        ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100)
                 if lo / 1.6 <= t <= hi * 1.6]
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    axes[0, 0].legend(fontsize=8, ncol=len(names), loc="lower center",
                      bbox_to_anchor=(0.5, 1.10), frameon=False)
    fig.suptitle(f"Median time / fastest peer's median, per case (lower is better; "
                 f"attngen's value labelled)\n"
                 f"{machine.cpu}, {machine.cores} cores, attngen {machine.isa}; "
                 f"prefill left of the dotted line, decode right", fontsize=9.5)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [c.name for c in CASES]
    parser.add_argument("--cases", nargs="+", metavar="NAME", choices=names + ["all"],
                        help="cases to run (default: every case but "
                             + ", ".join(c.name for c in CASES if not c.default)
                             + "; 'all' adds those). Names: " + ", ".join(names))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--peers", nargs="+", choices=pc.PEERS, default=list(pc.PEERS),
                        help="peers to run beside attngen (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per run (default {DEFAULT_REPEATS}, "
                             f"--quick {QUICK_REPEATS})")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and, unless --cases is given, skip the slowest "
                             "cases (" + ", ".join(c.name for c in CASES if c.slow) + ")")
    parser.add_argument("--output", type=Path, default=harness.DEFAULT_RESULTS,
                        help="results markdown file whose 'peers' section is replaced")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                        help="PNG to draw (default: benchmarks/peers.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None)
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave the results file alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=harness.cpu_count())
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP)
    parser.add_argument("--max-other", type=float, default=NOISY_LOAD,
                        help="wait for, and redo rounds above, this many cores used by "
                             "other processes (default: %(default)s)")
    parser.add_argument("--no-wait", dest="max_other", action="store_const", const=None)
    parser.add_argument("--flex-cache", type=Path, default=None,
                        help="TorchInductor cache dir to use (default: a fresh temporary "
                             "one, so flex compile times are cold compiles)")
    args = parser.parse_args(argv)
    if args.cases is None:
        chosen = [c for c in CASES if c.default]
    elif "all" in args.cases:
        chosen = list(CASES)
    else:
        chosen = [CASE_BY_NAME[n] for n in dict.fromkeys(args.cases)]
    if args.quick and args.cases is None:
        chosen = [c for c in chosen if not c.slow]
    args.case_list = chosen
    args.case_names = [c.name for c in chosen]
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.contenders = ["attngen"] + [n for n in pc.PEERS if n in args.peers]
    args.tol = dict(TOLERANCE)
    return args


def peer_versions(torch) -> dict:
    versions = {}
    if torch is not None:
        versions["torch"] = torch.__version__
    for module in ("onnxruntime", "onnx"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = "not installed"
    return versions


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads
    # flex_attention's compile: compile in this process (no worker pool left running
    # beside the timed rounds), into a cache of our own so compile times are cold.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    temp_cache = None
    if args.flex_cache is None:
        temp_cache = tempfile.mkdtemp(prefix="bench-peers-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = temp_cache
        flex_cache_note = "cold: an empty TorchInductor cache"
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.flex_cache)
        flex_cache_note = f"TorchInductor cache `{args.flex_cache}`"
    torch = harness.load_torch(threads)
    session = Session(args, threads, torch)
    session.flex_cache_note = flex_cache_note
    machine = harness.machine_info(torch)
    versions = peer_versions(torch)
    print(f"machine: {machine.cpu}, {machine.cores} cores, attngen ISA {machine.isa}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    print(f"cases: {', '.join(args.case_names)}; dtypes {', '.join(args.dtypes)}; "
          f"repeats {args.repeats}", flush=True)

    try:
        # Every attngen kernel first: a run then uses the kernels of one source state,
        # even if attngen/ is edited while it runs.
        for case in args.case_list:
            for dtype in args.dtypes:
                session.kernels[case.name, dtype] = pc.prebuild_attngen(case, dtype)
        kernels = {k["kernel"] for k in session.kernels.values()}
        print(f"attngen kernels ready: {len(kernels)} distinct", flush=True)
        ceilings_start = measure_ceilings(torch, args)
        print("fp32 matmul ceiling (start): " + ceiling_text(ceilings_start), flush=True)

        results = []
        start = time.perf_counter()
        for case in args.case_list:
            results += run_case(session, case)
        if args.max_other is not None:
            results = redo_noisy(session, results)
        print(f"\nall cases: {time.perf_counter() - start:.0f} s")
        ceilings_end = measure_ceilings(torch, args)
        print("fp32 matmul ceiling (end): " + ceiling_text(ceilings_end), flush=True)
    finally:
        session.close()
        if temp_cache:
            shutil.rmtree(temp_cache, ignore_errors=True)

    names = [n for n in pc.CONTENDERS if n in args.contenders]
    for phase in ("prefill", "decode"):
        if any(r["case"].phase == phase for r in results):
            headers, rows, _ = main_table(results, phase, names)
            print(f"\n{phase}")
            print(harness.text_table(headers, [[c.replace("**", "") for c in row]
                                               for row in rows]))
    headers, rows, _ = error_table(results, names)
    print("\nmax abs error vs the float64 reference")
    print(harness.text_table(headers, rows))
    for line in na_lines(results, session):
        print(line)

    if args.plot and not draw_plot(results, session, machine, args.plot):
        args.plot = None
    if args.plot:
        print(f"\nplot: {args.plot}")
    if not args.no_write:
        section = render(results, session, machine, (ceilings_start, ceilings_end),
                         versions, args.plot)
        path = harness.write_section(SECTION, section, args.output)
        print(f"results: {path} (section '{SECTION}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
