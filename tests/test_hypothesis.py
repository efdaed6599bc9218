"""Random small shapes and random combinations of modes, against the reference."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attngen
from attngen.check import TOLERANCE, make_case, max_errors


@st.composite
def specs_and_shapes(draw):
    mask = draw(st.sampled_from(["none", "causal", "window", "prefix"]))
    documents = draw(st.booleans())
    spec = attngen.AttentionSpec(
        head_dim=draw(st.sampled_from([16, 40, 64])),
        gqa=draw(st.sampled_from([1, 2, 3])),
        mask=mask,
        documents=documents,
        bias=draw(st.sampled_from(["none", "tensor", "alibi", "tensor+alibi"])),
        softcap=draw(st.booleans()),
        sinks=draw(st.booleans()),
        kv_layout=draw(st.sampled_from(["contiguous", "paged"])),
        dtype=draw(st.sampled_from(["f32", "bf16", "f16"])),
        phase=draw(st.sampled_from(["prefill", "decode"])) if not documents else "prefill",
    )
    seq_q = draw(st.integers(1, 150))
    args = dict(batch=draw(st.integers(1, 3)), heads_kv=draw(st.integers(1, 3)), seq_q=seq_q,
                layout=draw(st.sampled_from(["bhsd", "bshd"])), seed=draw(st.integers(0, 99)))
    if spec.kv_layout == "paged":
        args["page_size"] = draw(st.sampled_from([8, 16, 32]))
        args["kv_lens"] = [draw(st.integers(seq_q, seq_q + 100)) for _ in range(args["batch"])]
    elif not documents:
        args["seq_kv"] = draw(st.integers(1, 200))
    if mask == "window":
        args["window"] = draw(st.integers(1, 64))
    return spec, args


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs_and_shapes())
def test_random_variants_match_reference(spec_and_args):
    spec, args = spec_and_args
    out_err, lse_err = max_errors(attngen.get_kernel(spec), make_case(spec, **args))
    assert out_err <= TOLERANCE[spec.dtype]
    assert lse_err <= 10 * TOLERANCE[spec.dtype]
