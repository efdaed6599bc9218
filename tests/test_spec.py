import pytest

import attngen
from attngen import AttentionSpec, SpecError


def test_slug_and_round_trip():
    spec = AttentionSpec(head_dim=128, gqa=4, mask="causal")
    assert spec.slug == "prefill_d128_g4_causal_nobias_f32"
    assert AttentionSpec.from_slug(spec.slug) == spec
    full = AttentionSpec(64, 3, "window", True, "tensor+alibi", True, True, kv_layout="paged")
    assert full.slug == "prefill_d64_g3_window_doc_bias_alibi_cap_sink_paged_f32"
    assert AttentionSpec.from_slug(full.slug) == full


def test_frozen_and_hashable():
    spec = AttentionSpec(head_dim=64)
    with pytest.raises(Exception):
        spec.head_dim = 32
    assert len({spec, AttentionSpec(head_dim=64), AttentionSpec(head_dim=64, dtype="float32")}) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_dim=60), "head_dim must be a multiple of 8 from 16 to 256, got 60"),
    (dict(head_dim=264), "got 264"),
    (dict(head_dim=8), "got 8"),
    (dict(head_dim=64, gqa=0), "gqa"),
    (dict(head_dim=64, mask="sliding"), "mask must be one of"),
    (dict(head_dim=64, bias="relative"), "bias must be one of"),
    (dict(head_dim=64, dtype="int8"), "dtype must be one of"),
    (dict(head_dim=64, softcap=1), "softcap must be True or False"),
    (dict(head_dim=64, kv_layout="ring"), "kv_layout must be one of"),
    (dict(head_dim=64.0), "head_dim must be an int"),
])
def test_invalid_specs(kwargs, message):
    with pytest.raises(SpecError, match=message):
        AttentionSpec(**kwargs)


def test_bad_slug():
    with pytest.raises(SpecError, match="not a spec slug"):
        AttentionSpec.from_slug("prefill_d128_causal")


def test_render_uses_strict_undefined_and_names_constants():
    src = attngen.render(AttentionSpec(head_dim=96, gqa=3, mask="window"), "avx2")
    assert "#define HEAD_DIM 96" in src and "#define GQA 3" in src and "#define VL 8" in src
    assert "p->window" in src
