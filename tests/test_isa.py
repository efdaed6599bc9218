"""The ISAs below the detected one (AVX-512 without BF16 dot products, AVX2, generic) build
and agree with the reference too."""
import pytest

from attngen import kernel, toolchain
from attngen.check import TOLERANCE, check_spec
from attngen.spec import AttentionSpec

ISAS = [isa for isa in ("avx512", "avx2", "generic")
        if toolchain.ISA_RANK[isa] <= toolchain.ISA_RANK[toolchain.detect().isa]]
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
