"""attngen tune: candidates are timed, the winner is stored and used; bad tables are ignored."""
import json

import pytest
from click.testing import CliRunner

import attngen
import attngen.toolchain
from attngen import tuning
from attngen.check import TOLERANCE, check_spec
from attngen.cli import main
from attngen.render import TileConfig

SPEC = attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal")
CANDIDATES = [TileConfig(2, 4, 4, 64), TileConfig(4, 2, 2, 128)]


def test_tune_stores_and_uses_the_winner(fresh_cache):
    ranked = tuning.tune(SPEC, candidates=CANDIDATES, repeats=2, case_args=dict(seq_q=128))
    assert {tile for tile, _ in ranked} == set(CANDIDATES)
    assert ranked[0][1] <= ranked[1][1]
    isa = attngen.toolchain.detect().isa
    assert tuning.tuned_tile(SPEC, isa) == ranked[0][0]
    k = attngen.get_kernel(SPEC)
    assert f"#define ROWS {ranked[0][0].rows} " in k.source
    assert check_spec(SPEC, k) <= TOLERANCE["f32"]


def test_a_table_stored_elsewhere_is_seen_once_the_recheck_interval_passes(fresh_cache,
                                                                          monkeypatch):
    """Another process's `attngen tune` (no forget() here) changes what get_kernel loads,
    from the first lookup TABLE_RECHECK_SECONDS after the last look at the table."""
    clock = [1000.0]
    monkeypatch.setattr(attngen.kernel, "monotonic", lambda: clock[0])
    isa = attngen.toolchain.detect().isa
    default_rows = tuning.tile_for(SPEC, isa).rows
    first = attngen.get_kernel(SPEC)
    assert f"#define ROWS {default_rows} " in first.source
    winner = next(tile for tile in CANDIDATES if tile.rows != default_rows)
    tuning._store(SPEC, isa, winner, {})
    clock[0] += 0.5 * attngen.kernel.TABLE_RECHECK_SECONDS
    assert attngen.get_kernel(SPEC) is first
    clock[0] += attngen.kernel.TABLE_RECHECK_SECONDS
    k = attngen.get_kernel(SPEC)
    assert f"#define ROWS {winner.rows} " in k.source
    assert attngen.get_kernel(SPEC) is k


def test_unreadable_tuning_table_means_defaults(fresh_cache):
    isa = attngen.toolchain.detect().isa
    path = tuning.table_path(isa)
    path.parent.mkdir(parents=True)
    for junk in ("{not json", json.dumps({SPEC.slug: {"tile": {"rows": "x"}}}), "[]"):
        path.write_text(junk)
        assert tuning.tuned_tile(SPEC, isa) is None
        assert check_spec(SPEC) <= TOLERANCE["f32"]


def test_tune_command(fresh_cache, monkeypatch):
    monkeypatch.setitem(tuning.CANDIDATES, attngen.toolchain.detect().isa, CANDIDATES)
    monkeypatch.setattr(tuning, "default_case_args", lambda spec: dict(seq_q=64))
    result = CliRunner().invoke(main, ["tune", SPEC.slug, "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert SPEC.slug in result.output and "ms" in result.output


@pytest.mark.parametrize("gqa", [1, 2, 3, 4, 7, 8, 16, 32])
def test_decode_default_rows_divide_the_group(gqa):
    """One decode token's rows are its GQA group: the micro-kernel block must divide it, so
    no block computes padding rows. AVX-512 blocks up to 8 rows, the 16-register ISAs up to
    4, whose P.V accumulators (rows x output vectors) then fit in 8 registers."""
    from attngen.render import DEFAULT_TILES, ISA_PARAMS, default_tile

    for isa in DEFAULT_TILES:
        tile = default_tile(attngen.AttentionSpec(64, gqa, "causal", phase="decode"), isa)
        most = 8 if ISA_PARAMS[isa].vector_width == 16 else 4
        assert gqa % tile.rows == 0 and tile.rows <= most
        assert tile.rows == max(r for r in range(1, most + 1) if gqa % r == 0)
        if ISA_PARAMS[isa].registers == 16:
            assert tile.rows * tile.pv_chunk <= 8


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_decode_without_software_prefetch_matches_the_reference(fresh_cache, dtype):
    """The no-prefetch decode blocking `attngen tune` times is a kernel of its own (its
    source has no prefetch distance) and is as correct as the default."""
    from dataclasses import replace

    spec = attngen.AttentionSpec(128, 4, "causal", phase="decode", dtype=dtype)
    isa = attngen.toolchain.detect().isa
    candidates = tuning.candidate_tiles(spec, isa)
    quiet = next(tile for tile in candidates if not tile.decode_prefetch)
    assert quiet == replace(candidates[0], decode_prefetch=False)
    assert quiet.label().endswith("_nopf")
    entry = attngen.cache.lookup(spec, tile=quiet)
    kern = attngen.kernel.Kernel(spec, entry)
    assert "#define PREFETCH_KEYS 0\n" in kern.source
    assert "#define PREFETCH_KEYS 0\n" not in attngen.get_kernel(spec).source
    assert check_spec(spec, kern) <= TOLERANCE[dtype]
