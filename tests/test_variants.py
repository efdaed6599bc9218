"""Every variant of the manifest against the float64 reference, with explicit tolerances."""
import numpy as np
import pytest

from attngen import manifest
from attngen.check import TOLERANCE, make_case, max_errors

SPECS = manifest.regression_specs()

# (label, make_case arguments): self-attention of odd sizes, queries against a longer
# history (bottom-right aligned), and chunked prefill against a ragged KV cache.
SHAPES = [
    ("self_37", dict(seq_q=37)),
    ("self_130_bshd", dict(seq_q=130, layout="bshd", batch=1)),
    ("q5_kv70", dict(seq_q=5, seq_kv=70)),
    ("cache_ragged", dict(seq_q=3, kv_lens=[40, 77], capacity=90)),
    ("single_token", dict(seq_q=1, seq_kv=1)),
    # a ragged batch with padded query rows: sequence 0 holds fewer tokens than Sq
    ("cache_padded_rows", dict(seq_q=6, kv_lens=[2, 50], capacity=60)),
]


def _valid(spec, args):
    # Document ids are defined for Sq == Skv (or a cache holding the ids of every position).
    if not spec.documents:
        return True
    shorter = min(args.get("kv_lens", [args["seq_q"]])) < args["seq_q"]
    return args.get("seq_kv", args["seq_q"]) == args["seq_q"] and not shorter


CASES = [pytest.param(spec, seed, args, id=f"{spec.slug}-{label}")
         for spec in SPECS
         for seed, (label, args) in enumerate(SHAPES) if _valid(spec, args)]


@pytest.mark.parametrize("spec, seed, args", CASES)
def test_variant_matches_reference(spec, seed, args, manifest_kernels):
    case = make_case(spec, heads_kv=2 if spec.gqa < 16 else 1, seed=seed, **args)
    out_err, lse_err = max_errors(manifest_kernels[spec], case)
    tol = TOLERANCE[spec.dtype]
    assert out_err <= tol, f"max |out - ref| = {out_err:.2e} > {tol:.0e}"
    assert lse_err <= tol * 10, f"max |lse - ref| = {lse_err:.2e}"


@pytest.mark.parametrize("spec", [manifest.CANONICAL[0], manifest.CANONICAL[2],
                                  manifest.CANONICAL[3]],
                         ids=lambda s: s.slug)
def test_long_sequence_4096(spec, manifest_kernels):
    """The 1e-5 bound holds at S = 4096 (unit-variance inputs), not only on toy sizes."""
    case = make_case(spec, batch=1, heads_kv=1, seq_q=4096, seed=7, window=1024)
    out_err, lse_err = max_errors(manifest_kernels[spec], case)
    assert out_err <= 1e-5 and lse_err <= 1e-4, (out_err, lse_err)


@pytest.mark.parametrize("spec", [s for s in manifest.CANONICAL if s.phase == "prefill"],
                         ids=lambda s: s.slug)
def test_results_do_not_depend_on_thread_count(spec, manifest_kernels):
    """Bit for bit: the work split changes with the thread count, the sums must not. A
    window of 100 keys starts mid-tile for most query blocks."""
    case = make_case(spec, batch=1, heads_kv=1, seq_q=300, seed=3, window=100)
    kernel = manifest_kernels[spec]
    one = kernel(case.q, case.k, case.v, num_threads=1, **case.kwargs)
    two = kernel(case.q, case.k, case.v, num_threads=2, **case.kwargs)
    three = kernel(case.q, case.k, case.v, num_threads=3, **case.kwargs)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, three)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("head_dim", [128, 40])   # whole vectors, and vectors plus a tail
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_output_rounds_to_nearest_even(dtype, head_dim, phase):
    """The float32 result is rounded to the storage type the way numpy rounds it, ties to
    even, with NaN kept. Zero queries weigh two keys equally, so the output is (v0 + v1) / 2,
    exact in float32 for values of one binade: any rounding difference shows."""
    import attngen
    from attngen.kernel import NUMPY_DTYPE
    dtype_np = NUMPY_DTYPE[dtype]
    rng = np.random.default_rng(11)
    seq_q = 2 if phase == "prefill" else 1
    q = np.zeros((1, 2, seq_q, head_dim), dtype=dtype_np)
    k = rng.standard_normal((1, 2, 2, head_dim)).astype(dtype_np)
    v = (rng.uniform(1.0, 2.0, (1, 2, 2, head_dim))
         * rng.choice([-1.0, 1.0], (1, 2, 2, head_dim))).astype(dtype_np)
    v[0, 1, :, 3] = np.nan
    out = attngen.attention(q, k, v, phase=phase)
    half_sum = (v[:, :, 0].astype(np.float32) + v[:, :, 1].astype(np.float32)) / np.float32(2)
    expected = np.broadcast_to(half_sum[:, :, None], out.shape).astype(dtype_np)
    assert np.isnan(out[0, 1, :, 3].astype(np.float32)).all()
    numbers = ~np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(out.view(np.uint16)[numbers], expected.view(np.uint16)[numbers])
    assert (half_sum.astype(dtype_np).astype(np.float32) != half_sum).any(), "no rounding tested"


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_sink_survives_a_bias_that_hides_every_key(phase):
    """A -inf bias over all of a row's keys leaves the sink alone in the denominator: zeros
    and lse = the sink, as in the reference. Rows the causal mask leaves no key (sequence 0
    holds fewer tokens than Sq) keep lse = -inf."""
    from attngen import AttentionSpec, get_kernel

    spec = AttentionSpec(head_dim=64, gqa=2, mask="causal", bias="tensor", sinks=True,
                         phase=phase)
    case = make_case(spec, seq_q=4, kv_lens=[3, 40], capacity=48, seed=11)
    bias = case.kwargs["bias"]
    bias[0, 1, 3, :] = -np.inf        # head 1, last query: every key hidden
    bias[0, 2, 1, 5:] = -np.inf       # head 2, query 1: keys from 5 on hidden
    kernel = get_kernel(spec)
    out, lse = kernel(case.q, case.k, case.v, return_lse=True, **case.kwargs)
    sinks = case.kwargs["sinks"]
    assert lse[1, 1, 3] == pytest.approx(float(sinks[1]), abs=1e-6)
    np.testing.assert_array_equal(out[:, 1, 3], 0.0)
    assert np.isneginf(lse[0, :, 0]).all()            # position -1 of sequence 0: masked
    out_err, lse_err = max_errors(kernel, case)
    assert out_err <= TOLERANCE["f32"] and lse_err <= TOLERANCE["f32"] * 10, (out_err, lse_err)
