"""Tuning: time a few tile configurations of a kernel on this machine and keep the fastest.

The winner is stored per ISA in <cache dir>/v<format>/<isa>/tuning.json as {slug: config};
render() uses it from then on, and since the cache key covers the rendered source, the
tuned kernel is a cache entry of its own. A missing or unreadable file means defaults.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import filelock

from . import config
from .render import TileConfig, default_tile, uses_amx
from .spec import AttentionSpec

TUNING_NAME = "tuning.json"

# A few blockings worth timing per ISA (the default first; why 512-row items: see
# render.DEFAULT_TILES).
CANDIDATES = {
    "avx512bf16": [TileConfig(6, 4, 4, 256), TileConfig(6, 4, 4, 512), TileConfig(4, 4, 4, 128),
                   TileConfig(6, 4, 4, 192), TileConfig(6, 3, 4, 192), TileConfig(8, 3, 3, 256),
                   TileConfig(8, 2, 2, 128)],
    "avx2": [TileConfig(6, 4, 2, 256), TileConfig(6, 4, 2, 128), TileConfig(6, 2, 2, 120),
             TileConfig(2, 4, 4, 128), TileConfig(3, 3, 3, 128)],
}
CANDIDATES["avx512"] = CANDIDATES["amx"] = CANDIDATES["avx512bf16"]
# bf16 prefill on AMX: 16-row blocks, tiles of 64 or 128 keys, items of 128-512 rows.
AMX_CANDIDATES = [TileConfig(16, 8, 4, 512), TileConfig(16, 8, 4, 256), TileConfig(16, 4, 4, 256),
                  TileConfig(16, 8, 4, 384), TileConfig(16, 4, 4, 128)]
CANDIDATES["generic"] = CANDIDATES["avx2"]

_loaded: dict = {}   # path -> (stamp(path), table)


def table_path(isa: str) -> Path:
    """Where `isa`'s tuning table lives (under the current cache directory)."""
    from .cache import root

    return _join(root(), isa)


@functools.lru_cache(maxsize=64)
def _join(root: Path, isa: str) -> Path:    # asked on every kernel lookup: keep it cheap
    return root / isa / TUNING_NAME


def stamp(path: Path):
    """(inode, mtime, size) of a tuning table, or None while there is none: a changed stamp
    means the winners may have changed (each store renames a new file into place)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _table(isa: str) -> dict:
    path = table_path(isa)
    stamp_now = stamp(path)
    if stamp_now is None:
        return {}
    cached = _loaded.get(path)
    if cached and cached[0] == stamp_now:
        return cached[1]
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    _loaded[path] = (stamp_now, table)
    return table


def tuned_tile(spec: AttentionSpec, isa: str) -> TileConfig | None:
    """The stored winner for `spec` on `isa`, or None."""
    entry = _table(isa).get(spec.slug)
    try:
        return TileConfig(**entry["tile"]) if entry else None
    except (TypeError, KeyError):
        return None


def tile_for(spec: AttentionSpec, isa: str) -> TileConfig:
    return tuned_tile(spec, isa) or default_tile(spec, isa)


def _store(spec: AttentionSpec, isa: str, tile: TileConfig, timings: dict) -> Path:
    path = table_path(isa)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock", timeout=config.lock_timeout()):
        table = dict(_table(isa))
        table[spec.slug] = {"tile": asdict(tile), "median_seconds": timings,
                            "tuned_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = path.with_name(f".{TUNING_NAME}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
        os.replace(tmp, path)
    return path


def default_case_args(spec: AttentionSpec) -> dict:
    """A representative shape to time: a 1024-token prompt over >= 8 query heads, or one
    decode token against 65536 cached keys (K/V well beyond the last-level cache, since
    decode streams them from memory)."""
    heads_kv = max(1, 8 // spec.gqa)
    if spec.phase == "decode":
        return dict(batch=1, heads_kv=heads_kv, seq_q=1, kv_lens=[65536], capacity=65536)
    return dict(batch=1, heads_kv=heads_kv, seq_q=1024)


def candidate_tiles(spec: AttentionSpec, isa: str) -> list[TileConfig]:
    """The default first, then the ISA's blockings; decode also without software prefetch
    (whether it pays depends on the CPU's own prefetchers)."""
    default = default_tile(spec, isa)
    tiles = [default, *(AMX_CANDIDATES if uses_amx(spec, isa, default) else CANDIDATES[isa])]
    if spec.phase == "decode":
        tiles.append(replace(default, decode_prefetch=not default.decode_prefetch))
    return tiles


def tune(spec: AttentionSpec, candidates=None, repeats: int = 5, case_args=None):
    """Time every candidate tile (checked against the reference first), store the fastest.

    Returns [(TileConfig, median seconds)], fastest first."""
    from . import cache, kernel, toolchain
    from .check import TOLERANCE, make_case, max_errors

    isa = toolchain.detect().isa
    candidates = list(dict.fromkeys(candidates or candidate_tiles(spec, isa)))
    kernels = {tile: kernel.Kernel(spec, cache.lookup(spec, tile=tile)) for tile in candidates}
    for tile, kern in kernels.items():
        err = max(max_errors(kern, make_case(spec, seq_q=40 if spec.phase == "prefill" else 2,
                                             seed=11)))
        if err > TOLERANCE[spec.dtype]:
            raise AssertionError(f"{spec.slug} with {tile.label()}: error {err:.2e} "
                                 f"exceeds {TOLERANCE[spec.dtype]:.0e}")
    case = make_case(spec, **(case_args or default_case_args(spec)))
    call = {tile: (lambda k=kern: k(case.q, case.k, case.v, **case.kwargs))
            for tile, kern in kernels.items()}
    times = {tile: [] for tile in candidates}
    for fn in call.values():
        fn()
    for _ in range(repeats):   # round-robin, so drift in the machine hits all alike
        for tile, fn in call.items():
            start = time.perf_counter()
            fn()
            times[tile].append(time.perf_counter() - start)
    ranked = sorted(((tile, statistics.median(ts)) for tile, ts in times.items()),
                    key=lambda item: item[1])
    _store(spec, isa, ranked[0][0], {tile.label(): round(t, 6) for tile, t in ranked})
    kernel.forget(spec)
    return ranked
