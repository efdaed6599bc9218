"""Decode benchmark: one new token per sequence against a long KV cache.

    python benchmarks/bench_decode.py [--repeats 15] [--output benchmarks/RESULTS.md]

Cases (D = 128, fp32 cache unless noted):
    B=1, Hq=32, Hkv=8, Skv = 4096, 16384, 65536
    B=1, Hq=4,  Hkv=1, Skv = 65536      (one kv head: only splitting the KV keeps 2 cores busy)
    B=8, Hq=32, Hkv=8, Skv = 4096
and the fixed cost of a step: B=1, Hq=32, Hkv=8, Skv = 16.

Contenders, checked against the float64 reference, then timed round-robin on the same arrays:
* attngen          attngen.attention(q, k, v, causal=True): the decode kernel, split chosen
* attngen 1 split  the same with num_splits=1 (what splitting the KV sequence buys)
* attngen bf16     the same call on bf16 copies of q, k, v (half the bytes to read)
* numpy            scores = k @ q per kv head (the GQA group together), softmax, v.T @ p
* torch            scaled_dot_product_attention(q, k, v, enable_gqa=True) (if installed)

GB/s = bytes of K and V in the contender's storage dtype / median time. The read bandwidth
of the case's own K and V (membw.py, all cores) is measured in the same rounds; "of peak" is
attngen's GB/s over it.

Every case is timed twice:
* warm: calls back to back on the same arrays, so whatever of K and V fits in the L3 (32 MiB
  here) is still there at the next call;
* cold: every timed call (the memory read too) comes right after streaming a buffer 4x the
  L3, as in a model, where every other layer's KV cache passes through the caches between
  two steps of one layer.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import membw  # noqa: E402

import attngen  # noqa: E402
from attngen.check import TOLERANCE  # noqa: E402
from attngen.reference import attention_reference  # noqa: E402

SECTION = "decode"
HEAD_DIM = 128
CASES = [  # (B, Hq, Hkv, Skv)
    (1, 32, 8, 4096), (1, 32, 8, 16384), (1, 32, 8, 65536),
    (1, 4, 1, 65536),
    (8, 32, 8, 4096),
]
NOISY_LOAD = 0.1
GAP = 0.25   # s idle before each contender's burst
BURST = 5    # timed back-to-back calls per contender per round (after one untimed)


def cold_burst(fn, evict, calls=BURST):
    """`calls` calls, each right after evict(); only the calls are timed."""
    def run():
        total = 0.0
        for _ in range(calls):
            evict()
            start = time.perf_counter()
            fn()
            total += time.perf_counter() - start
        return harness.Elapsed(total)
    return run


COLD_CONTENDERS = ("attngen", "attngen bf16", "torch", "memory read")


def numpy_decode(q, k, v):
    """Materialised softmax, one kv head (and its GQA group of query heads) at a time."""
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = np.empty_like(q)
    scale = np.float32(1.0 / math.sqrt(D))
    for b in range(B):
        for h in range(Hkv):
            qg = q[b, h * group:(h + 1) * group, 0]            # [G, D]
            s = (k[b, h] @ qg.T) * scale                        # [Skv, G]
            s -= s.max(axis=0)
            np.exp(s, out=s)
            s /= s.sum(axis=0)
            out[b, h * group:(h + 1) * group, 0] = (v[b, h].T @ s).T
    return out


def run_case(case, repeats, threads, torch, evict):
    B, Hq, Hkv, S = case
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, 1, HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, HEAD_DIM), dtype=np.float32)
    bf = ml_dtypes.bfloat16
    q16, k16, v16 = q.astype(bf), k.astype(bf), v.astype(bf)
    kv_bytes = 2 * k.nbytes

    contenders = {
        "attngen": (lambda: attngen.attention(q, k, v, causal=True, num_threads=threads),
                    kv_bytes, "f32"),
        "attngen 1 split": (lambda: attngen.attention(q, k, v, causal=True, num_splits=1,
                                                      num_threads=threads), kv_bytes, "f32"),
        "attngen bf16": (lambda: attngen.attention(q16, k16, v16, causal=True,
                                                   num_threads=threads), kv_bytes // 2, "bf16"),
        "numpy": (lambda: numpy_decode(q, k, v), kv_bytes, "f32"),
    }
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        contenders["torch"] = (lambda: sdpa(tq, tk, tv, enable_gqa=True), kv_bytes, "f32")

    read, read_bytes = membw.reader(threads, arrays=[k, v])
    contenders["memory read"] = (read, read_bytes, None)

    ref = attention_reference(q, k, v, causal=True)
    ref16 = attention_reference(q16, k16, v16, causal=True)
    errors = {}
    for name, (fn, _, dtype) in contenders.items():
        if dtype is None:
            continue
        out = np.asarray(fn()).astype(np.float64)
        errors[name] = harness.check_against_reference(
            name, out, ref16 if dtype == "bf16" else ref, 10 * TOLERANCE[dtype])
    stats = harness.RoundRobinStats()
    timings = harness.time_round_robin({n: harness.burst(c[0], BURST) for n, c in contenders.items()},
                                       repeats, gap=GAP, max_other=NOISY_LOAD, stats=stats,
                                       settle={n: c[0] for n, c in contenders.items()})
    cold = {n: c for n, c in contenders.items() if n in COLD_CONTENDERS}
    cold_stats = harness.RoundRobinStats()
    cold_timings = harness.time_round_robin(
        {n: cold_burst(c[0], evict) for n, c in cold.items()}, repeats, gap=GAP,
        max_other=NOISY_LOAD, stats=cold_stats, settle={n: c[0] for n, c in cold.items()})

    def per_call(measured):
        return {n: harness.Timing([t / BURST for t in timing.seconds])
                for n, timing in measured.items()}
    return {"case": case, "errors": errors, "timings": per_call(timings), "stats": stats,
            "cold": per_call(cold_timings), "cold_stats": cold_stats,
            "bytes": {n: c[1] for n, c in contenders.items()}}


OVERHEAD_CASE = (1, 32, 8, 16)   # so few keys that a step is almost all fixed cost
OVERHEAD_CALLS = 200             # back-to-back calls per timed sample


def call_overhead(threads, torch) -> dict[str, float]:
    """Median seconds of one decode step over OVERHEAD_CASE: the kernel object called
    directly (on numpy arrays, and on torch tensors of the same memory), attngen.attention
    (which also finds the kernel), and torch SDPA."""
    B, Hq, Hkv, S = OVERHEAD_CASE
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, 1, HEAD_DIM), dtype=np.float32)
    k, v = (rng.standard_normal((B, Hkv, S, HEAD_DIM), dtype=np.float32) for _ in range(2))
    out = np.empty_like(q)
    kernel = attngen.get_kernel(attngen.api.spec_for_call(q, k, v, causal=True))
    steps = {
        "attngen kernel call": lambda: kernel(q, k, v, causal=True, out=out, num_threads=threads),
        "attngen.attention": lambda: attngen.attention(q, k, v, causal=True, out=out,
                                                       num_threads=threads),
    }
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        tout = torch.from_numpy(out)
        steps["attngen kernel call, torch tensors"] = lambda: kernel(
            tq, tk, tv, causal=True, out=tout, num_threads=threads)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        steps["torch SDPA"] = lambda: sdpa(tq, tk, tv, enable_gqa=True)

    # One contender at a time, calls back to back as a model's steps are: an idle gap lets
    # this VM park the OpenMP workers' cores, and waking them costs more than a step.
    # torch goes last, so its spinning pool never competes with attngen's threads.
    return {n: harness.time_calls(harness.burst(fn, OVERHEAD_CALLS), 15, warmup=3).median
            / OVERHEAD_CALLS for n, fn in steps.items()}


def render(results, names, machine, args, overhead) -> str:
    lines = ["## Decode", "",
             "One new token per sequence (Sq = 1) against a KV cache of Skv keys, D = 128, "
             "causal; fp32 unless noted. Median of the timed calls, contenders interleaved "
             f"round-robin on the same arrays: each turn is {GAP} s idle, one untimed call, then "
             f"{BURST} timed back-to-back calls (decode steps run back to back).", "",
             f"- Date: {harness.today()}", *machine.lines(),
             f"- Memory read: `membw.c` streaming the case's own fp32 K and V arrays once with "
             f"{args.threads} threads, timed in every case's rounds beside the contenders. It "
             "drifts between runs and between allocations on this shared machine (30-63 GB/s), "
             "so each case's 'of peak' uses its own, on the same pages attngen reads",
             f"- Reproduce: `python benchmarks/bench_decode.py --repeats {args.repeats}`", ""]
    headers = ["B", "Hq", "Hkv", "Skv"] + [f"{n} ms (GB/s)" for n in names] + ["memory read GB/s",
        "attngen of peak", "split speed-up", "bf16 speed-up"]
    rows = []
    for r in results:
        B, Hq, Hkv, S = r["case"]
        t = {n: r["timings"][n].median for n in names}
        gbs = {n: r["bytes"][n] / t[n] / 1e9 for n in names}
        bandwidth = r["bytes"]["memory read"] / r["timings"]["memory read"].median / 1e9
        rows.append([str(B), str(Hq), str(Hkv), str(S)]
                    + [f"{t[n] * 1e3:.2f} ({gbs[n]:.1f})" for n in names]
                    + [f"{bandwidth:.1f}", f"{gbs['attngen'] / bandwidth:.0%}",
                       f"{t['attngen 1 split'] / t['attngen']:.2f}x",
                       f"{t['attngen'] / t['attngen bf16']:.2f}x"])
    lines.append(harness.markdown_table(headers, rows))
    lines += ["", "### Cold caches", "",
              "The same cases and arrays, each timed call right after streaming a buffer 4x the "
              "L3 (the memory read too), as in a model: between two steps of one layer, every "
              "other layer's KV cache passes through the caches. Same rounds, gap and bursts "
              "as above.", ""]
    cold_names = [n for n in results[0]["cold"] if n != "memory read"]
    headers = (["B", "Hq", "Hkv", "Skv"] + [f"{n} ms (GB/s)" for n in cold_names]
               + ["memory read GB/s", "attngen of peak", "bf16 speed-up"])
    rows = []
    for r in results:
        t = {n: r["cold"][n].median for n in r["cold"]}
        gbs = {n: r["bytes"][n] / t[n] / 1e9 for n in t}
        rows.append([str(x) for x in r["case"]]
                    + [f"{t[n] * 1e3:.2f} ({gbs[n]:.1f})" for n in cold_names]
                    + [f"{gbs['memory read']:.1f}", f"{gbs['attngen'] / gbs['memory read']:.0%}",
                       f"{t['attngen'] / t['attngen bf16']:.2f}x"])
    lines.append(harness.markdown_table(headers, rows))
    lines += ["", "Max abs error vs the float64 reference (bf16 against the reference on the "
              "same bf16 inputs): " + "; ".join(
                  f"{r['case']}: " + ", ".join(f"{n} {r['errors'][n]:.1e}" for n in names)
                  for r in results[:1]) + " (first case; every case is checked).",
              "", "Rounds redone because other processes were busy: "
              + ", ".join(str(r["stats"].rounds_discarded) for r in results) + " (warm), "
              + ", ".join(str(r["cold_stats"].rounds_discarded) for r in results) + " (cold)."]
    B, Hq, Hkv, S = OVERHEAD_CASE
    lines += ["", f"Fixed cost of a step: B={B} Hq={Hq} Hkv={Hkv} Skv={S}, median per call "
              f"over {OVERHEAD_CALLS} back-to-back calls: "
              + ", ".join(f"{n} {t * 1e6:.1f} us" for n, t in overhead.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=harness.cpu_count())
    parser.add_argument("--output", default=str(harness.DEFAULT_RESULTS))
    args = parser.parse_args(argv)
    torch = harness.load_torch(args.threads)
    machine = harness.machine_info(torch)
    evict = membw.evictor(args.threads)
    results = []
    for case in CASES:
        r = run_case(case, args.repeats, args.threads, torch, evict)
        results.append(r)
        print(case, {n: f"{t.median * 1e3:.2f} ms" for n, t in r["timings"].items()},
              "cold", {n: f"{t.median * 1e3:.2f} ms" for n, t in r["cold"].items()}, flush=True)
    overhead = call_overhead(args.threads, torch)
    print("fixed cost per step:", {n: f"{t * 1e6:.1f} us" for n, t in overhead.items()})
    names = [n for n in results[0]["timings"] if n != "memory read"]
    section = render(results, names, machine, args, overhead)
    harness.write_section(SECTION, section, args.output)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
