"""The ISAs below the detected one (AVX-512 with BF16 dot products but no AMX, without BF16
dot products, AVX2, generic) build and agree with the reference too."""
import pytest

from attngen import config, kernel, toolchain
from attngen.check import TOLERANCE, check_spec
from attngen.spec import AttentionSpec

ISAS = [isa for isa in config.ISAS
        if toolchain.ISA_RANK[isa] < toolchain.ISA_RANK[toolchain.detect().isa]]
SPECS = [AttentionSpec(head_dim=24, gqa=3, mask="window", documents=True, bias="tensor+alibi",
                       softcap=True, sinks=True),
         AttentionSpec(head_dim=128, gqa=4, mask="causal", kv_layout="paged"),
         AttentionSpec(head_dim=64, gqa=4, mask="window", sinks=True, phase="decode"),
         *(AttentionSpec(head_dim=d, gqa=2, mask="causal", bias="alibi", dtype=dtype, phase=phase)
           for d in (40, 128) for dtype in ("bf16", "f16") for phase in ("prefill", "decode"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.slug)
def test_fallback_isa(spec, isa, monkeypatch, empty_kernel_memo):
    monkeypatch.setenv("ATTNGEN_ISA", isa)
    assert toolchain.detect().isa == isa
    k = kernel.get_kernel(spec)
    assert f"({isa}, " in k.source.splitlines()[0]
    assert check_spec(spec, k) <= TOLERANCE[spec.dtype]


AMX_SPECS = [AttentionSpec(head_dim=d, gqa=g, mask=mask, dtype="bf16", **extra)
             for d, g, mask, extra in ((128, 4, "causal", {}), (64, 1, "none", {}),
                                       (256, 2, "window", {"softcap": True}),
                                       (32, 3, "prefix", {"documents": True, "bias": "tensor+alibi"}),
                                       (96, 2, "causal", {"kv_layout": "paged", "sinks": True}))]


@pytest.mark.skipif(toolchain.detect().isa != "amx", reason="this CPU (or OS) has no AMX-BF16")
@pytest.mark.parametrize("spec", AMX_SPECS, ids=lambda s: s.slug)
def test_amx_bf16_prefill(spec, empty_kernel_memo):
    """bf16 prefill multiplies on AMX tiles where the CPU has them: ragged row blocks (300
    queries: the last 16-row block part padding), masked tiles and whole tiles alike."""
    k = kernel.get_kernel(spec)
    assert "_tile_dpbf16ps" in k.source
    assert check_spec(spec, k) <= TOLERANCE["bf16"]
    assert check_spec(spec, k, seq_q=300) <= TOLERANCE["bf16"]


AMX_DECODE_SPECS = [AttentionSpec(head_dim=d, gqa=g, mask=mask, dtype="bf16", phase="decode", **extra)
                    for d, g, mask, extra in ((128, 4, "causal", {}), (96, 1, "causal", {"softcap": True}),
                                              (64, 8, "window", {"kv_layout": "paged", "sinks": True}),
                                              (128, 32, "none", {}))]


@pytest.mark.skipif(toolchain.detect().isa != "amx", reason="this CPU (or OS) has no AMX-BF16")
@pytest.mark.parametrize("spec", AMX_DECODE_SPECS, ids=lambda s: s.slug)
def test_amx_bf16_decode(spec, empty_kernel_memo):
    """bf16 decode scores K rows in place on AMX tiles: evenly strided blocks of 16 keys,
    and copies where a block ends the cache, crosses a page boundary (pages of 16 keys,
    misaligned by ragged lengths) or holds more than 16 query rows (GQA 32, 3 queries)."""
    k = kernel.get_kernel(spec)
    assert "qk_rows_amx(p, st" in k.source
    assert check_spec(spec, k) <= TOLERANCE["bf16"]
    assert check_spec(spec, k, seq_q=3, kv_lens=[1000, 17], capacity=1024) <= TOLERANCE["bf16"]


def test_amx_only_where_tiles_fit():
    """Head sizes that are not whole 32-dimension tile columns, fp32 and f16 keep the
    vector paths on an AMX ISA."""
    from attngen.render import render

    assert "_tile_dpbf16ps" in render(AttentionSpec(128, 4, "causal", dtype="bf16"), "amx")
    assert "qk_rows_amx(p, st" in render(AttentionSpec(64, 4, "causal", dtype="bf16", phase="decode"), "amx")
    for spec in (AttentionSpec(40, 2, "causal", dtype="bf16"),
                 AttentionSpec(40, 2, "causal", dtype="bf16", phase="decode"),
                 AttentionSpec(128, 4, "causal"), AttentionSpec(128, 4, "causal", dtype="f16")):
        assert "_tile_dpbf16ps" not in render(spec, "amx"), spec.slug


SPLIT_SPECS = [AttentionSpec(head_dim=d, gqa=g, mask="causal", dtype="bf16", phase="decode", **extra)
               for d, g, extra in ((48, 2, {}), (80, 3, {}), (128, 4, {"kv_layout": "paged"}))]


@pytest.mark.skipif(toolchain.ISA_RANK["avx2"] > toolchain.ISA_RANK[toolchain.detect().isa],
                    reason="this CPU has no AVX2")
@pytest.mark.parametrize("spec", SPLIT_SPECS, ids=lambda s: s.slug)
def test_avx2_bf16_decode_word_pairs(spec, monkeypatch, empty_kernel_memo):
    """AVX2 bf16 decode reads K/V rows as word pairs (even and odd dimensions) where the head
    size is whole 16-dimension words, P.V passes of 2 or 4 vectors (D=48: a pass of 4, then
    one of 2), and several queries per sequence; D=40 and AVX-512 keep plain loads."""
    from attngen.render import render

    assert "#define SPLIT_BF16 1" in render(spec, "avx2")
    assert "#define SPLIT_BF16 0" in render(AttentionSpec(40, 2, "causal", dtype="bf16", phase="decode"), "avx2")
    assert "#define SPLIT_BF16 0" in render(spec, "avx512bf16")
    assert "#define SPLIT_BF16 0" in render(spec, "avx512")
    monkeypatch.setenv("ATTNGEN_ISA", "avx2")
    k = kernel.get_kernel(spec)
    assert check_spec(spec, k) <= TOLERANCE["bf16"]
    assert check_spec(spec, k, seq_q=3) <= TOLERANCE["bf16"]
