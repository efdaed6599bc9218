"""Thread scaling: attngen (and torch SDPA beside it) from 1 thread to every core.

    python benchmarks/bench_threads.py [--threads 1 2 4 8 16] [--repeats 5]
                                       [--output benchmarks/RESULTS.md]

Cases (D=128, causal, unit-variance inputs, seed 0):

* prefill  B1 Hq32 Hkv8 S2048, fp32 and bf16 (GFLOP/s: 4·B·Hq·D·S(S+1)/2)
* decode   B1 Hq32 Hkv8 and MQA B1 Hq4 Hkv1, Skv 65536, fp32 and bf16 (GB/s of K+V)

Every thread count of a case is checked against the float64 reference, then the counts
are timed round-robin (an idle gap and one untimed call before each timed turn; decode
turns time 5 back-to-back calls). Decode cases also time the memory read (`membw.c` over
the case's own fp32 K and V) at each count: the ceiling decode should follow.

The section `threads-<cores>` of RESULTS.md (one per machine size) and threads.png
(speed-up over 1 thread, and decode GB/s against the read rate) are written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import membw  # noqa: E402

import attngen  # noqa: E402
from attngen.reference import attention_reference  # noqa: E402

HEAD_DIM = 128
PREFILL = (1, 32, 8, 2048)                      # B, Hq, Hkv, S
DECODE = [(1, 32, 8, 65536), (1, 4, 1, 65536)]  # B, Hq, Hkv, Skv
TOLERANCE = {"f32": 1e-4, "bf16": 5e-2}
BURST = 5       # decode calls per timed turn
GAP = 0.1       # s idle before each turn
NOISY_LOAD = 0.5


def default_threads(cores: int) -> list[int]:
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return counts + [cores]


def inputs(shape, seq_q, dtype):
    B, Hq, Hkv, S = shape
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, h, s, HEAD_DIM), dtype=np.float32)
              for h, s in ((Hq, seq_q), (Hkv, S), (Hkv, S))]
    if dtype == "bf16":
        arrays = [a.astype(ml_dtypes.bfloat16) for a in arrays]
    return arrays


def time_case(name, contenders, ref, dtype, repeats, calls):
    """contenders: {label: fn}; returns {label: median seconds per call}. Checks each first."""
    for label, fn in contenders.items():
        if not label.startswith("memory"):
            harness.check_against_reference(f"{name} {label}", np.asarray(fn()).astype(np.float64),
                                            ref, TOLERANCE[dtype])
    stats = harness.RoundRobinStats()
    timings = harness.time_round_robin({k: harness.burst(f, calls) for k, f in contenders.items()},
                                       repeats, gap=GAP, max_other=NOISY_LOAD, stats=stats,
                                       settle=contenders)
    return {k: t.median / calls for k, t in timings.items()}, stats


def run(threads, repeats, torch):
    results = []   # (case name, unit, {thread: rate}, {thread: torch rate}, {thread: read rate})
    B, Hq, Hkv, S = PREFILL
    flops = 4 * B * Hq * HEAD_DIM * S * (S + 1) / 2
    for dtype in ("f32", "bf16"):
        q, k, v = inputs(PREFILL, S, dtype)
        ref = attention_reference(q, k, v, causal=True)
        contenders = {f"attngen {t}": (lambda t=t: attngen.attention(q, k, v, causal=True,
                                                                     num_threads=t))
                      for t in threads}
        if torch is not None and dtype == "f32":
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

            def sdpa(t):
                torch.set_num_threads(t)
                return torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=True, enable_gqa=True)
            contenders.update({f"torch {t}": (lambda t=t: sdpa(t)) for t in threads})
        name = f"prefill B{B} Hq{Hq} Hkv{Hkv} S{S} {dtype}"
        med, stats = time_case(name, contenders, ref, dtype, repeats, 1)
        results.append(dict(case=name, unit="GFLOP/s", stats=stats,
                            attngen={t: flops / med[f"attngen {t}"] / 1e9 for t in threads},
                            torch={t: flops / med[f"torch {t}"] / 1e9 for t in threads
                                   if f"torch {t}" in med}))
        print(harness.today(), name, {t: round(r, 1) for t, r in results[-1]["attngen"].items()},
              flush=True)
    for shape in DECODE:
        B, Hq, Hkv, S = shape
        for dtype in ("f32", "bf16"):
            q, k, v = inputs(shape, 1, dtype)
            ref = attention_reference(q, k, v, causal=True)
            contenders = {f"attngen {t}": (lambda t=t: attngen.attention(q, k, v, causal=True,
                                                                         num_threads=t))
                          for t in threads}
            if dtype == "f32":   # the read rate over these very K and V pages
                for t in threads:
                    contenders[f"memory {t}"] = membw.reader(t, arrays=[k, v])[0]
            name = f"decode B{B} Hq{Hq} Hkv{Hkv} Skv{S} {dtype}"
            med, stats = time_case(name, contenders, ref, dtype, repeats, BURST)
            kv_bytes = k.nbytes + v.nbytes
            entry = dict(case=name, unit="GB/s", stats=stats,
                         attngen={t: kv_bytes / med[f"attngen {t}"] / 1e9 for t in threads})
            if dtype == "f32":
                entry["read"] = {t: kv_bytes / med[f"memory {t}"] / 1e9 for t in threads}
            else:   # the fp32 case's read rate, and bf16's speed-up over fp32
                entry["read"] = results[-1]["read"]
                entry["over_f32"] = {t: 2 * entry["attngen"][t] / results[-1]["attngen"][t]
                                     for t in threads}
            results.append(entry)
            print(harness.today(), name, {t: round(r, 1) for t, r in entry["attngen"].items()},
                  flush=True)
    return results


def report(results, threads, info, repeats) -> str:
    lines = [f"## Thread scaling, {info.cores} cores", "",
             "attngen from 1 thread to every core (torch SDPA beside it for prefill). Rate per "
             "thread count, speed-up over 1 thread in brackets; decode also shows the memory "
             "read rate at that thread count and attngen's share of it.", "",
             f"- Date: {harness.today()}", *info.lines(),
             f"- Median of {repeats} rounds, thread counts interleaved round-robin; decode turns "
             f"time {BURST} back-to-back calls",
             f"- Reproduce: `python benchmarks/bench_threads.py --repeats {repeats}`", ""]
    head = ["case", "contender", *[f"{t} thr" for t in threads]]
    rows = []
    for r in results:
        base = r["attngen"][threads[0]]
        rows.append([r["case"], f"attngen {r['unit']}",
                     *[f"{r['attngen'][t]:.1f} ({r['attngen'][t] / base:.2f}x)" for t in threads]])
        if r.get("torch"):
            tb = r["torch"][threads[0]]
            rows.append(["", "torch SDPA", *[f"{r['torch'][t]:.1f} ({r['torch'][t] / tb:.2f}x)"
                                             for t in threads]])
        if "read" in r:
            rows.append(["", "memory read GB/s", *[f"{r['read'][t]:.1f}" for t in threads]])
            rows.append(["", "attngen of read", *[f"{r['attngen'][t] / r['read'][t]:.0%}"
                                                  for t in threads]])
        if "over_f32" in r:
            rows.append(["", "bf16 speed-up over fp32", *[f"{r['over_f32'][t]:.2f}x"
                                                          for t in threads]])
    lines.append(harness.markdown_table(head, rows))
    redone = ", ".join(str(r["stats"].rounds_discarded) for r in results)
    lines += ["", f"Rounds redone because other processes were busy: {redone}.", "",
              f"![thread scaling](threads-{info.cores}.png)"]
    return "\n".join(lines)


def plot(results, threads, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    left.plot(threads, threads, "k:", label="ideal")
    for r in results:
        base = r["attngen"][threads[0]]
        left.plot(threads, [r["attngen"][t] / base for t in threads], "o-", label=f"attngen {r['case']}")
        if r.get("torch"):
            tb = r["torch"][threads[0]]
            left.plot(threads, [r["torch"][t] / tb for t in threads], "s--", label=f"torch {r['case']}")
    left.set(xscale="log", yscale="log", xlabel="threads", ylabel="speed-up over 1 thread",
             title="Speed-up")
    left.set_xticks(threads, [str(t) for t in threads])
    left.legend(fontsize=6)
    for r in results:
        if r["unit"] != "GB/s":
            continue
        right.plot(threads, [r["attngen"][t] for t in threads], "o-", label=r["case"])
    seen = set()
    for r in results:
        if "read" in r and r["case"].endswith("f32") and r["case"] not in seen:
            seen.add(r["case"])
            right.plot(threads, [r["read"][t] for t in threads], "k--", lw=0.8,
                       label=f"memory read ({r['case'].rsplit(' ', 1)[0]})")
    right.set(xscale="log", xlabel="threads", ylabel="GB/s of K+V", title="Decode")
    right.set_xticks(threads, [str(t) for t in threads])
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cores = harness.cpu_count()
    parser.add_argument("--threads", type=int, nargs="+", default=default_threads(cores))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=harness.DEFAULT_RESULTS)
    parser.add_argument("--plot-dir", type=Path, default=harness.BENCH_DIR)
    args = parser.parse_args(argv)
    threads = sorted(set(args.threads))
    torch = harness.load_torch(cores)
    info = harness.machine_info(torch)
    results = run(threads, args.repeats, torch)
    body = report(results, threads, info, args.repeats)
    print(body)
    harness.write_section(f"threads-{info.cores}", body, args.output)
    plot(results, threads, args.plot_dir / f"threads-{info.cores}.png")


if __name__ == "__main__":
    main()
