"""AttentionSpec -> C source, through one Jinja2 environment (StrictUndefined)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jinja2

from ._version import __version__
from .spec import AttentionSpec


@dataclass(frozen=True)
class IsaParams:
    """What a template needs to know about the instruction set: register shape, not flags."""
    name: str
    vector_width: int        # floats per vector register
    registers: int           # vector registers
    bf16_dot: bool = False   # AVX512-BF16 dot products (vdpbf16ps) for bf16
    amx: bool = False        # AMX-BF16 tile multiplies (tdpbf16ps) for bf16 prefill


ISA_PARAMS = {
    "amx": IsaParams("amx", 16, 32, bf16_dot=True, amx=True),
    "avx512bf16": IsaParams("avx512bf16", 16, 32, bf16_dot=True),
    "avx512": IsaParams("avx512", 16, 32),
    "avx2": IsaParams("avx2", 8, 16),
    "generic": IsaParams("generic", 4, 16),
}


@dataclass(frozen=True)
class TileConfig:
    """Blocking of the loop nest; `attngen tune` picks among a few per spec and machine."""
    rows: int           # query rows per micro-kernel block
    kcols: int          # key vectors per Q.K^T block (keys per tile = kcols * vector width)
    pv_chunk: int       # output vectors per P.V block
    prefill_rows: int   # query rows (all heads of a GQA group) per prefill work item
    decode_prefetch: bool = True   # decode prefetches the K/V rows it reads in place

    def label(self) -> str:
        label = f"rows{self.rows}_k{self.kcols}_pv{self.pv_chunk}_item{self.prefill_rows}"
        return label if self.decode_prefetch else label + "_nopf"


# Accumulators (rows x kcols and rows x pv_chunk) plus operands fit the register file:
# 32 zmm on AVX-512, 16 ymm/xmm on AVX2 and the generic SSE/NEON build. The AVX-512 default
# won a sweep on causal, softcap D=256 and D=64 prefill on a Zen 5 (benchmarks/RESULTS.md).
# Items of 256 rows beat 128, 192 and 384 by 2-4% on causal D=128 at S=2048 and 4096 once V
# was read in place (fewer K tiles packed per row; more causal waste only from 384 rows).
# The item size is not bound by L2: on a Zen 4 (1 MiB L2 per core) items of 512 and 1024 rows
# ran 1.00-1.04x faster than 256 at D=64, 128 and 256, fp32 and bf16, although at D=256 their
# Q and O blocks alone are 1-2 MiB; 128 rows ran 0.93-0.98x. Which size wins depends on the
# CPU, so `attngen tune` times 512 as well. On AVX2 (a Zen 3), 6 rows (Q.K^T in two
# passes of 2 key vectors, see qk_cols) and P.V blocks of 6 x 2 ran 1.07-1.22x faster than
# 2 x 4 blocks on causal D=64-256 prefill in fp32 and bf16, S=2048-4096 (even at S=512).
# Items of 256 rows, not 240: items that straddle 512-token documents ran 0.84x.
DEFAULT_TILES = {
    "amx": TileConfig(6, 4, 4, 256),
    "avx512bf16": TileConfig(6, 4, 4, 256),
    "avx512": TileConfig(6, 4, 4, 256),
    "avx2": TileConfig(6, 4, 2, 256),
    "generic": TileConfig(2, 4, 4, 128),
}
# bf16 prefill on AMX: both matmuls on 16-row tiles (tdpbf16ps), so row blocks of 16. Tiles
# of 128 keys in items of 512 rows beat 64 keys and 128-384 rows by 3-15% on causal D=128,
# S=512-4096 (a Xeon with 2 MiB of L2 per core: an item's Q, O and scores still fit).
AMX_TILE = TileConfig(16, 8, 4, 512)

# Decode keeps this many bytes of each of K and V prefetched ahead of the rows it reads.
PREFETCH_BYTES = 16384
# Query rows decode scores per pass over a tile's keys read in place: a GQA-8 group in one
# pass is 1.2-1.3x faster than in two passes of 4.
DECODE_QK_ROWS = 8
# A decode KV partition covers at least this many keys (4 tiles on AVX-512).
DECODE_MIN_KEYS_PER_SPLIT = 256


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("attngen", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
        autoescape=False,
    )


def uses_amx(spec: AttentionSpec, isa: str, tile: TileConfig) -> bool:
    """Whether the kernel multiplies on AMX tiles: bf16 on an AMX ISA with whole 32-dimension
    tile columns; prefill also needs 16-row blocks and tiles of at most 128 keys (4 A tiles
    of P), decode scores K rows in place (its P.V stays on vectors)."""
    if not (ISA_PARAMS[isa].amx and spec.dtype == "bf16" and spec.head_dim % 32 == 0):
        return False
    return spec.phase == "decode" or (tile.rows % 16 == 0 and tile.kcols <= 8)


def _decode_pv_pairs(spec: AttentionSpec, isa: str) -> bool:
    """Whether decode does P.V on bf16 key pairs (pv_pairs_block): bf16 K/V rows read in
    place on AVX512-BF16 without AMX (AMX decode, untimed that way, converts V)."""
    params = ISA_PARAMS[isa]
    return (spec.phase == "decode" and spec.dtype == "bf16" and params.bf16_dot
            and not params.amx and spec.head_dim % (2 * params.vector_width) == 0)


def qk_cols(tile: TileConfig, isa: str) -> int:
    """Key vectors per pass of the packed-tile Q.K^T micro-kernel: rows x cols accumulators
    leave 4 registers for K vectors and the query broadcast. On AVX2, 6 rows x 2 vectors in
    two passes over a 32-key tile beat the 2 x 4 block of one pass by 1.1x (fp32 causal
    prefill, D=128) where 16-key tiles of 6 x 2 gained less (more softmax steps per key)."""
    return max(1, min(tile.kcols, (ISA_PARAMS[isa].registers - 4) // tile.rows))


def template_context(spec: AttentionSpec, isa: str, tile: TileConfig) -> dict:
    params = ISA_PARAMS[isa]
    vl = params.vector_width
    bf16_dot = params.bf16_dot and spec.dtype == "bf16"
    # decode reads K/V rows in place when rows are whole vectors (of bf16 pairs, with the
    # bf16 dot product); otherwise it packs tiles like prefill.
    direct_kv = spec.phase == "decode" and spec.head_dim % (2 * vl if bf16_dot else vl) == 0
    pv_pairs = _decode_pv_pairs(spec, isa)
    split_bf16 = (params.registers == 16 and direct_kv and not bf16_dot
                  and spec.dtype == "bf16" and spec.head_dim % (2 * vl) == 0)
    return {
        "spec": spec,
        "version": __version__,
        "isa": params,
        "tile": tile,
        "padded_head_dim": (spec.head_dim + vl - 1) // vl * vl,
        "block_q": max(1, tile.prefill_rows // spec.gqa),
        "min_keys_per_split": DECODE_MIN_KEYS_PER_SPLIT,
        "direct_kv": direct_kv,
        "bf16_dot": bf16_dot,
        "amx": uses_amx(spec, isa, tile),
        "pv_pairs": pv_pairs,
        # ...and scores 4 rows per vector where a group's queries fit in 16 registers: at
        # D=256 (from L1) that ran 0.65-0.79x as fast as a vector per row and key.
        "qk_lanes": pv_pairs and spec.head_dim <= 128,
        "fold_levels": _fold_levels(vl),
        "qk_direct_rows": DECODE_QK_ROWS,
        "qk_cols": qk_cols(tile, isa),
        "qk_kvecs": 16 if vl == 16 else 8,   # K vectors in registers: half the register file
        # 16 registers: decode scores 2 keys x 4 rows per pass (qk_direct_block)...
        "qk_key_pairs": params.registers == 16,
        # ...and reads bf16 rows as 32-bit words of two values: shifted, the even dimension;
        # masked, the odd one (decode's q and o rows are held in that order). P.V then takes
        # whole words: an even number of vectors per pass. AVX2 d128 bf16 decode, against
        # neither: warm 1.01-1.13x, cold 1.03-1.18x (key pairs alone 1.01-1.07x).
        "split_bf16": split_bf16,
        "pv_chunk": max(2, tile.pv_chunk // 2 * 2) if split_bf16 else tile.pv_chunk,
        # Keys whose rows decode prefetches ahead: about 16 KiB of each of K and V in flight.
        # (0: none, left to the hardware prefetchers).
        "prefetch_keys": max(16, PREFETCH_BYTES // (spec.head_dim * (4 if spec.dtype == "f32" else 2)))
                         if tile.decode_prefetch else 0,
    }


def default_tile(spec: AttentionSpec, isa: str) -> TileConfig:
    """The ISA's default blocking; decode blocks rows by a divisor of its GQA group (one new
    token's rows are the group's heads), so no micro-kernel work goes to padding rows. On
    AVX-512 that divisor may reach 8 (a GQA-8 group's V rows loaded once: 1.1x faster at
    65536 keys than blocks of 4), and up to 4 rows take 8 output vectors per P.V pass (a
    D=128 V row is loaded once): 5-8% faster at 65536 keys (`attngen tune`, decode d128 g4,
    f32 and bf16), except bf16 key-pair P.V of 3-4 rows (below)."""
    tile = DEFAULT_TILES[isa]
    if spec.phase == "prefill" and uses_amx(spec, isa, AMX_TILE):
        return AMX_TILE
    if spec.phase == "decode":
        wide_isa = ISA_PARAMS[isa].vector_width == 16
        rows = max(r for r in range(1, (8 if wide_isa else 4) + 1) if spec.gqa % r == 0)
        if wide_isa:
            # bf16 key-pair P.V keeps 4 rows x 8 vectors in registers only by spilling: 4
            # vectors a pass ran 1.02-1.08x faster on caches in L2/L3 (no change from memory).
            pairs = rows > 2 and _decode_pv_pairs(spec, isa)
            chunk = 8 if rows <= 2 or (rows <= 4 and not pairs) else tile.pv_chunk
        else:
            # 16 registers: at most 8 accumulators. A GQA-4 group in one block of 4 rows x 2
            # vectors beat 2 blocks of 2 x 8 (spilled) by 1.15-1.2x on caches in L3 and
            # 1.0-1.2x from memory (AVX2, d128, fp32 and bf16).
            chunk = 8 // rows
        tile = TileConfig(rows, tile.kcols, chunk, tile.prefill_rows)
    return tile


def _fold_levels(vl: int) -> list[dict]:
    """Shuffle constants per halving width w (VL/2 down to 1): `xor` pairs lane i with lane
    i ^ w (horizontal max and sum), `keep` / `swap` fold two vectors (transposed sums and
    maxima), `low` / `high` exchange off-diagonal halves (transpose_block)."""
    levels, w = [], vl // 2
    while w >= 1:
        # Two-source shuffle indices (>= vl picks the second vector): `keep` takes each
        # lane from the vector that owns it, `swap` its partner lane from the other one.
        levels.append({"width": w, "xor": [i ^ w for i in range(vl)],
                       "keep": [vl + i if i & w else i for i in range(vl)],
                       "swap": [vl + (i ^ w) if i & w else i ^ w for i in range(vl)],
                       # transpose_block: the pair's rows after swapping off-diagonal halves
                       "low": [vl + i - w if i & w else i for i in range(vl)],
                       "high": [vl + i if i & w else i + w for i in range(vl)]})
        w //= 2
    return levels


def render(spec: AttentionSpec, isa: str | None = None, tile: TileConfig | None = None) -> str:
    """The generated C for `spec`, for `isa` (default: the detected one), blocked by `tile`
    (default: the tuned one for this spec and ISA, if `attngen tune` stored one, else the
    ISA's default)."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if isa is None:
        from .toolchain import detect

        isa = detect().isa
    if isa not in ISA_PARAMS:
        raise ValueError(f"isa must be one of {tuple(ISA_PARAMS)}, got {isa!r}")
    if tile is None:
        from .tuning import tile_for

        tile = tile_for(spec, isa)
    template = environment().get_template(f"{spec.phase}.c.j2")
    return template.render(**template_context(spec, isa, tile))
