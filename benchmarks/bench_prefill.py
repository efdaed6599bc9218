"""Prefill benchmark: attngen vs a numpy baseline vs PyTorch SDPA, on the same inputs.

Case: B=1, Hq=32, Hkv=8 (GQA group 4), D=128, causal, fp32, Sq = Skv = S.

    python benchmarks/bench_prefill.py [--sizes 512 1024 2048 4096] [--repeats 7]
                                       [--output benchmarks/RESULTS.md]

Contenders, timed round-robin on the same arrays after each has been checked
against the float64 reference (attngen.reference.attention_reference):

* attngen  attngen.attention(q, k, v, causal=True, num_threads=<all cores>)
* numpy    materialised float32 softmax, one (b, h) at a time (BLAS matmuls are
           multi-threaded, the elementwise softmax is not)
* torch    torch.nn.functional.scaled_dot_product_attention(..., is_causal=True,
           enable_gqa=True) with torch.set_num_threads(<all cores>); skipped if
           torch is not importable

FLOPs count only the useful work of causal attention: 4 * B * Hq * D * S(S+1)/2
(two matmuls over the visible (query, key) pairs), the same count for every
contender whatever it actually computes. The matmul ceiling is the fp32
2048^3 GEMM rate of numpy (OpenBLAS) and torch on this machine, in the same run;
where OpenBLAS picked AVX2 kernels on an AVX-512 CPU, also numpy's rate with
OPENBLAS_CORETYPE=SkylakeX (in a subprocess), the truer ceiling.

Results go to stdout, to the `prefill` section of RESULTS.md and to prefill.png.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import attngen  # noqa: E402
from attngen.reference import attention_reference  # noqa: E402

SECTION = "prefill"
BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = 1, 32, 8, 128
DEFAULT_SIZES = (512, 1024, 2048, 4096)
DEFAULT_REPEATS = 7
DEFAULT_PLOT = harness.BENCH_DIR / "prefill.png"
TOLERANCE = 1e-4
NOISY_LOAD = 0.1   # cores used by other processes above which a round is redone / flagged
DEFAULT_GAP = 0.25  # s idle before each timed call: OpenBLAS workers spin ~0.1 s after a call


# --------------------------------------------------------------------------- the case

def make_inputs(seq: int, seed: int):
    """Unit-variance fp32 q [B, Hq, S, D], k, v [B, Hkv, S, D], the same for every contender."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, HEADS_Q, seq, HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((BATCH, HEADS_KV, seq, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((BATCH, HEADS_KV, seq, HEAD_DIM), dtype=np.float32)
    return q, k, v


def causal_flops(seq_q: int, seq_kv: int) -> float:
    """Useful FLOPs: QK^T and PV (2 flops per multiply-add each) over the visible pairs."""
    # Bottom-right aligned: query i sees keys 0 .. i + (seq_kv - seq_q). S(S+1)/2 when equal.
    seen = np.clip(np.arange(seq_q, dtype=np.int64) + (seq_kv - seq_q) + 1, 0, seq_kv)
    return 4.0 * BATCH * HEADS_Q * HEAD_DIM * float(seen.sum())


# --------------------------------------------------------------------------- contenders

def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Textbook causal attention in float32: the whole [Sq, Skv] score matrix per head.

    scores = q @ k.T * scale; add a bottom-right aligned causal mask (0 / -inf);
    stable softmax (subtract the row max, exp, divide by the row sum); @ v.
    Query head h reads kv head h // (Hq // Hkv) by indexing, without copies.
    """
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = np.float32(1.0 / math.sqrt(dim))
    # -inf strictly above the diagonal that ends in the bottom-right corner.
    mask = np.triu(np.full((seq_q, seq_kv), -np.inf, dtype=np.float32), k=seq_kv - seq_q + 1)
    scores = np.empty((seq_q, seq_kv), dtype=np.float32)
    out = np.empty_like(q)
    for b in range(batch):
        for h in range(heads_q):
            kv_head = h // group
            np.matmul(q[b, h], k[b, kv_head].T, out=scores)
            scores *= scale
            scores += mask
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=1, keepdims=True)
            np.matmul(scores, v[b, kv_head], out=out[b, h])
    return out


def make_contenders(q, k, v, threads: int, torch):
    """name -> zero-argument callable returning the output (numpy or torch array)."""
    contenders = {
        "attngen": lambda: attngen.attention(q, k, v, causal=True, num_threads=threads),
        "numpy": lambda: numpy_attention(q, k, v),
    }
    if torch is not None:
        tq, tk, tv = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_sdpa():
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)
        contenders["torch"] = torch_sdpa
    return contenders


def _to_numpy(out) -> np.ndarray:
    return out.numpy() if hasattr(out, "numpy") and not isinstance(out, np.ndarray) else out


# --------------------------------------------------------------------------- one size

def run_size(seq: int, args, threads: int, torch) -> dict:
    q, k, v = make_inputs(seq, args.seed)
    contenders = make_contenders(q, k, v, threads, torch)

    start = time.perf_counter()
    ref = attention_reference(q, k, v, causal=True)
    ref_seconds = time.perf_counter() - start

    errors = {}
    for name, fn in contenders.items():
        errors[name] = harness.check_against_reference(
            f"{name} (S={seq})", _to_numpy(fn()), ref, args.tol)
    del ref
    gc.collect()

    stats = harness.RoundRobinStats()
    timings = harness.time_round_robin(contenders, args.repeats, warmup=1, gap=args.gap,
                                       max_other=args.max_other, stats=stats, settle=True)
    return {"S": seq, "flops": causal_flops(seq, seq), "errors": errors, "timings": timings,
            "ref_seconds": ref_seconds, "other_cores": stats.max_other,
            "discarded": stats.rounds_discarded}


# --------------------------------------------------------------------------- reporting

AVX512_CEILING = "numpy-avx512"


def ceiling_label(name: str) -> str:
    if name == "numpy":
        core = harness.openblas_core()
        return f"numpy (OpenBLAS, {core} kernels)" if core else "numpy"
    if name == "torch":
        return "torch.matmul"
    if name == AVX512_CEILING:
        return "numpy with OPENBLAS_CORETYPE=SkylakeX (AVX-512)"
    return name


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _gf(value: float) -> str:
    return f"{value:.1f}"


def _err(value: float) -> str:
    return f"{value:.1e}"


def result_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    has_torch = "torch" in names
    headers = ["S", "attngen ms", "GFLOP/s", "numpy ms"]
    headers += ["torch ms"] if has_torch else []
    headers += ["speed-up vs numpy"] + (["vs torch"] if has_torch else [])
    headers += ["attngen err", "numpy err"] + (["torch err"] if has_torch else [])
    rows = []
    for r in results:
        t = r["timings"]
        ag = t["attngen"].median
        row = [str(r["S"]), _ms(ag), _gf(harness.gflops(r["flops"], ag)), _ms(t["numpy"].median)]
        row += [_ms(t["torch"].median)] if has_torch else []
        row += [f"{t['numpy'].median / ag:.2f}x"]
        row += [f"{t['torch'].median / ag:.2f}x"] if has_torch else []
        row += [_err(r["errors"][n]) for n in names]
        rows.append(row)
    return headers, rows


def detail_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per contender: median and min ms, GFLOP/s of each, and the spread of the repeats."""
    headers = ["S", "contender", "median ms", "min ms", "GFLOP/s (median)",
               "GFLOP/s (min)", "spread", "other load"]
    rows = []
    for r in results:
        for name in names:
            t = r["timings"][name]
            rows.append([str(r["S"]), name, _ms(t.median), _ms(t.min),
                         _gf(harness.gflops(r["flops"], t.median)),
                         _gf(harness.gflops(r["flops"], t.min)), f"{t.spread * 100:.0f}%",
                         f"{r['other_cores']:.2f}"])
    return headers, rows


def command_line(args) -> str:
    parts = ["python benchmarks/bench_prefill.py", "--sizes", *map(str, args.sizes),
             "--repeats", str(args.repeats)]
    if args.seed != 0:
        parts += ["--seed", str(args.seed)]
    if args.gap != DEFAULT_GAP:
        parts += ["--gap", f"{args.gap:g}"]
    if args.max_other is None:
        parts += ["--no-wait"]
    elif args.max_other != NOISY_LOAD:
        parts += ["--max-other", f"{args.max_other:g}"]
    return " ".join(parts)


def render_section(results, names, ceilings, machine, args, threads, kernel_note) -> str:
    headers, rows = result_rows(results, names)
    d_headers, d_rows = detail_rows(results, names)
    worst = max(r["other_cores"] for r in results)
    redone = sum(r["discarded"] for r in results)
    load_text = (f"other processes used at most {worst:.2f} of {machine.cores} cores "
                 f"during any kept round ({redone} noisier rounds redone"
                 + (f"; rounds above {args.max_other} cores are redone"
                    if args.max_other is not None else "") + ")")
    ceiling_text = "; ".join(f"{ceiling_label(name)}: {value:.1f} GFLOP/s"
                             for name, value in ceilings.items())
    best_name, best = max(ceilings.items(), key=lambda item: item[1])
    fractions = [harness.gflops(r["flops"], r["timings"]["attngen"].median) / best
                 for r in results]
    lines = [
        "## Prefill",
        "",
        f"Causal prefill, B={BATCH}, Hq={HEADS_Q}, Hkv={HEADS_KV} (GQA group "
        f"{HEADS_Q // HEADS_KV}), D={HEAD_DIM}, fp32, Sq = Skv = S, unit-variance inputs "
        f"(seed {args.seed}).",
        "",
        f"- Date: {harness.today()}",
        *machine.lines(),
        f"- Threads: {threads} for every contender (attngen `num_threads`, "
        f"`torch.set_num_threads`, OpenBLAS default)",
        f"- attngen kernel: {kernel_note}",
        f"- Matmul ceiling (fp32 2048x2048x2048, median of 5): {ceiling_text}",
        f"- attngen reaches {min(fractions) * 100:.0f}-{max(fractions) * 100:.0f}% of the "
        f"best of these ({ceiling_label(best_name)})",
        f"- Background load while timing: {load_text}",
        f"- Reproduce (from the repository root): `{command_line(args)}`",
        "",
        f"Median of {args.repeats} timed calls after one warm-up, contenders interleaved "
        f"round-robin on the same inputs with {args.gap:g} s idle before each turn "
        "(so OpenBLAS workers still spinning after the numpy baseline do not slow the next "
        "contender), then one untimed call (the cores run slow right after idling) and "
        "the timed one. Spread = (max - min) / median of the repeats; other load = the most "
        "cores other processes used during a kept round. "
        "GFLOP/s counts the useful causal work, "
        "4·B·Hq·D·S(S+1)/2, for everyone. Speed-up = other's median / attngen's median. "
        f"Errors: max abs vs the float64 reference (limit {args.tol:.0e}).",
        "",
        harness.markdown_table(headers, rows),
        "",
        "<details><summary>Median and min of every contender</summary>",
        "",
        harness.markdown_table(d_headers, d_rows, ["r", "l", "r", "r", "r", "r", "r", "r"]),
        "",
        "</details>",
        "",
        "Contenders: **attngen** = `attngen.attention(q, k, v, causal=True)`; "
        "**numpy** = materialised float32 softmax per (b, h) (`numpy_attention` in "
        "`bench_prefill.py`; its elementwise softmax runs on one core); **torch** = "
        "`torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, "
        "enable_gqa=True)`.",
    ]
    if "torch" not in names:
        lines += ["", "torch was not importable: its columns are absent."]
    if args.plot:
        link = os.path.relpath(Path(args.plot).resolve(), Path(args.output).resolve().parent)
        lines += ["", f"![prefill GFLOP/s vs S]({Path(link).as_posix()})"]
    return "\n".join(lines)


def draw_plot(results, names, ceilings, machine, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"note: matplotlib is not importable ({type(exc).__name__}: {exc}); "
              f"no plot drawn", file=sys.stderr)
        return False
    sizes = [r["S"] for r in results]
    rates = {name: [harness.gflops(r["flops"], r["timings"][name].median) for r in results]
             for name in names}
    lowest = [min(rates[name][i] for name in names) for i in range(len(sizes))]
    styles = {"attngen": ("tab:blue", "o"), "numpy": ("tab:orange", "s"),
              "torch": ("tab:red", "^")}
    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=120)
    top = 0.0
    for name in names:
        color, marker = styles.get(name, (None, "x"))
        ax.plot(sizes, rates[name], marker=marker, color=color, linewidth=2, label=name)
        for i, (x, y) in enumerate(zip(sizes, rates[name])):
            below = y == lowest[i] and len(names) > 1   # the lowest value's label goes under
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points",
                        xytext=(0, -13 if below else 7), ha="center", fontsize=7, color=color)
        top = max(top, *rates[name])
    ceiling_styles = {"numpy": ("tab:orange", "--"), "torch": ("tab:red", "--"),
                      AVX512_CEILING: ("tab:green", "-.")}
    for name, value in ceilings.items():
        color, style = ceiling_styles.get(name, ("gray", ":"))
        ax.axhline(value, linestyle=style, linewidth=1.2, color=color, alpha=0.8,
                   label=f"matmul: {ceiling_label(name)} ({value:.0f})")
        top = max(top, value)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, top * 1.08)
    ax.set_xlabel("sequence length S (Sq = Skv)")
    ax.set_ylabel("GFLOP/s (useful causal FLOPs, median)")
    ax.set_title(f"Causal prefill, Hq={HEADS_Q} Hkv={HEADS_KV} D={HEAD_DIM} fp32; "
                 f"dashed: fp32 2048³ matmul\n"
                 f"{machine.cpu}, {machine.cores} cores, attngen {machine.isa}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              frameon=False)
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
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="sequence lengths S (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help="timed calls per contender and size (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=harness.DEFAULT_RESULTS,
                        help="results markdown file whose prefill section is replaced "
                             "(default: benchmarks/RESULTS.md)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                        help="PNG to draw (default: benchmarks/prefill.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None,
                        help="draw no plot")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave the results file alone")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP,
                        help="idle seconds before each timed call (default: %(default)s)")
    parser.add_argument("--max-other", type=float, default=NOISY_LOAD,
                        help="wait for, and redo rounds above, this many cores used by other "
                             "processes (default: %(default)s)")
    parser.add_argument("--no-wait", dest="max_other", action="store_const", const=None,
                        help="time whatever the machine's load (it is still recorded)")
    parser.add_argument("--tol", type=float, default=TOLERANCE,
                        help="max abs error allowed vs the reference (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if any(s < 1 for s in args.sizes):
        parser.error("--sizes must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = harness.cpu_count()
    torch = harness.load_torch(threads)
    machine = harness.machine_info(torch)
    print(f"machine: {machine.cpu}, {machine.cores} cores, attngen ISA {machine.isa}, "
          f"numpy {machine.numpy}, torch {machine.torch or '-'}")

    # Build (or load) the kernel up front so no timing ever includes a compile.
    q, k, v = make_inputs(min(args.sizes), args.seed)
    kernel = attngen.get_kernel(attngen.spec_for_call(q, k, v, causal=True))
    kernel_note = (f"`{kernel.entry.directory.name}`, "
                   + ("loaded from the disk cache" if kernel.was_cached
                      else f"built in {kernel.build_seconds:.2f} s"))
    print(f"kernel: {kernel_note.replace('`', '')}")
    del q, k, v

    ceilings = harness.matmul_ceiling(2048, 5, torch, gap=args.gap, max_other=args.max_other)
    forced = harness.openblas_avx512_ceiling(2048, 5, max_other=args.max_other)
    if forced is not None:
        ceilings[AVX512_CEILING] = forced[0]
    print("matmul ceiling (fp32 2048^3, median of 5): "
          + "; ".join(f"{ceiling_label(n)} {g:.1f} GFLOP/s" for n, g in ceilings.items()))

    results = []
    for seq in args.sizes:
        result = run_size(seq, args, threads, torch)
        results.append(result)
        line = ", ".join(f"{n} {_ms(t.median)} ms" for n, t in result["timings"].items())
        print(f"S={seq}: {line} (reference {result['ref_seconds']:.1f} s; other load "
              f"<= {result['other_cores']:.2f} cores; {result['discarded']} noisy rounds "
              f"redone)", flush=True)
        if result["other_cores"] > NOISY_LOAD:
            print(f"warning: other processes used {result['other_cores']:.2f} cores while "
                  f"S={seq} was timed; its numbers are noisy", file=sys.stderr)

    names = list(results[0]["timings"])
    headers, rows = result_rows(results, names)
    print()
    print(harness.text_table(headers, rows))
    print()
    d_headers, d_rows = detail_rows(results, names)
    print(harness.text_table(d_headers, d_rows))

    if args.plot and not draw_plot(results, names, ceilings, machine, args.plot):
        args.plot = None
    if args.plot:
        print(f"\nplot: {args.plot}")
    if not args.no_write:
        section = render_section(results, names, ceilings, machine, args, threads, kernel_note)
        path = harness.write_section(SECTION, section, args.output)
        print(f"results: {path} (section '{SECTION}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
