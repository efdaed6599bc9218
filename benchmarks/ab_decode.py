"""Side-by-side decode timing of attngen source trees (a template change against its base).

    python benchmarks/ab_decode.py NAME=TREE NAME=TREE [...] [--rounds 60] [--cold]
                                   [--dtype bf16 f32]

Each TREE is a checkout of attngen (e.g. `git worktree add /tmp/base HEAD`). Its decode
kernels are built by a subprocess importing that tree, into a cache directory of its own;
this process then loads every tree's library and times them interleaved, a block of 5
back-to-back calls per variant per round, the variants' order shuffled every round. Whole
processes taking turns pick up the machine's drift between turns (the DRAM-bound cases here
moved 10-20% between runs); blocks of calls interleaved within one process see the same
background. Ratios are to the first tree: > 1 is faster.

--cold reads a 512 MiB buffer before every timed call, so K and V come from memory, as
they do when a model's layers each read their own cache. Without it the same arrays are
read again and again; the smaller cases then partly stay in L3.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import attngen
from attngen import cache, kernel

# (B, Hq, Hkv, Skv, layout), D = 128: the decode shapes plus a [B, S, H, D] cache.
CASES = [
    (1, 32, 8, 16384, "bhsd"),
    (1, 32, 8, 65536, "bhsd"),
    (1, 32, 8, 16384, "bshd"),
    (1, 4, 1, 65536, "bhsd"),
    (8, 32, 8, 4096, "bhsd"),
]
HEAD_DIM = 128

BUILD_IN_TREE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import attngen
out = {}
for dtype, gqa in json.loads(sys.argv[2]):
    spec = attngen.AttentionSpec(head_dim=%d, gqa=gqa, mask="causal", dtype=dtype, phase="decode")
    out[f"{dtype}-{gqa}"] = str(attngen.get_kernel(spec).entry.directory)
print(json.dumps(out))
""" % HEAD_DIM


def decode_spec(dtype: str, gqa: int) -> attngen.AttentionSpec:
    return attngen.AttentionSpec(head_dim=HEAD_DIM, gqa=gqa, mask="causal", dtype=dtype,
                                 phase="decode")


def build_tree(name: str, tree: str, needed: list) -> dict:
    """Kernel directories built by `tree`'s own attngen, keyed "dtype-gqa"."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_IN_TREE, tree, json.dumps(needed)],
        capture_output=True, text=True,
        env={"ATTNGEN_CACHE_DIR": f"/tmp/attngen-ab-{name}", "PATH": "/usr/bin:/bin"})
    if result.returncode:
        sys.exit(f"building in {tree} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load(dtype: str, gqa: int, directory: str) -> kernel.Kernel:
    spec = decode_spec(dtype, gqa)
    path = Path(directory)
    meta = json.loads((path / "meta.json").read_text())
    return kernel.Kernel(spec, cache.CacheEntry(spec, path, meta, True, 0.0))


def inputs(dtype: str, batch: int, hq: int, hkv: int, skv: int, layout: str):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, 1, HEAD_DIM, generator=gen)
    if layout == "bhsd":
        k = torch.randn(batch, hkv, skv, HEAD_DIM, generator=gen)
        v = torch.randn(batch, hkv, skv, HEAD_DIM, generator=gen)
    else:
        k = torch.randn(batch, skv, hkv, HEAD_DIM, generator=gen).transpose(1, 2)
        v = torch.randn(batch, skv, hkv, HEAD_DIM, generator=gen).transpose(1, 2)
    if dtype == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    return q, k, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="+", help="NAME=TREE; the first is the base")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "f32"])
    args = parser.parse_args()
    variants = [t.split("=", 1) for t in args.trees]
    if any(len(v) != 2 for v in variants):
        parser.error(f"trees: expected NAME=TREE, got {args.trees}")
    needed = sorted({(d, hq // hkv) for d in args.dtype for _, hq, hkv, _, _ in CASES})
    built = {name: build_tree(name, tree, needed) for name, tree in variants}
    flush = torch.ones(1 << 27) if args.cold else None   # 512 MiB of fp32
    print(f"{'cold' if args.cold else 'warm'}, {args.rounds} rounds, median ms (ratio to "
          f"{variants[0][0]})")
    for dtype in args.dtype:
        for batch, hq, hkv, skv, layout in CASES:
            q, k, v = inputs(dtype, batch, hq, hkv, skv, layout)
            kernels = {name: load(dtype, hq // hkv, built[name][f"{dtype}-{hq // hkv}"])
                       for name, _ in variants}
            times = {name: [] for name in kernels}
            order = list(kernels)
            for _ in range(args.rounds):
                random.shuffle(order)
                for name in order:
                    call = kernels[name]
                    call(q, k, v, causal=True)
                    block = []
                    for _ in range(5):
                        if flush is not None:
                            flush.sum()
                        start = time.perf_counter()
                        call(q, k, v, causal=True)
                        block.append(time.perf_counter() - start)
                    times[name].append(statistics.median(block))
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            base = medians[variants[0][0]]
            cells = "  ".join(f"{name} {ms:7.3f} ({base / ms:.3f}x)" for name, ms in medians.items())
            print(f"{dtype:4s} B{batch} Hq{hq} Hkv{hkv} Skv{skv} {layout}: {cells}", flush=True)


if __name__ == "__main__":
    main()
