"""Decode: split-KV flash-decoding over contiguous and paged caches, against the reference."""
import numpy as np
import pytest

import attngen
from attngen import AttentionSpec, manifest
from attngen.check import TOLERANCE, make_case, max_errors
from attngen.reference import attention_reference

DECODE = [s for s in manifest.regression_specs() if s.phase == "decode"]

SHAPES = [
    # one token per sequence, ragged lengths including 1 and non-multiples of tiles/pages
    ("token_ragged", dict(batch=3, seq_q=1, kv_lens=[1, 300, 77], capacity=320)),
    # speculative tokens
    ("spec4", dict(batch=2, seq_q=4, kv_lens=[4, 1000], capacity=1024)),
    ("long_single", dict(batch=1, seq_q=1, kv_lens=[5000], capacity=5000)),
    # a [B, S, H, D] cache: one item reads every kv head of its keys, side by side
    ("token_ragged_bshd", dict(batch=3, seq_q=1, kv_lens=[1, 300, 77], capacity=320,
                               layout="bshd")),
]


@pytest.mark.parametrize("spec, args", [
    pytest.param(spec, args, id=f"{spec.slug}-{label}") for spec in DECODE for label, args in SHAPES])
def test_decode_matches_reference(spec, args, manifest_kernels):
    case = make_case(spec, heads_kv=2 if spec.gqa < 16 else 1, seed=len(args), **args)
    out_err, lse_err = max_errors(manifest_kernels[spec], case)
    assert out_err <= TOLERANCE[spec.dtype] and lse_err <= 10 * TOLERANCE[spec.dtype]


@pytest.mark.parametrize("spec", [AttentionSpec(128, 4, "causal", phase="decode"),
                                  AttentionSpec(24, 3, "causal", bias="tensor+alibi", softcap=True,
                                                phase="decode", kv_layout="paged"),
                                  AttentionSpec(64, 8, "window", sinks=True, phase="decode")],
                         ids=lambda s: s.slug)
def test_split_counts_agree(spec, manifest_kernels):
    """The merged partial softmaxes equal the unsplit result up to float32 rounding."""
    case = make_case(spec, batch=2, seq_q=2, kv_lens=[3000, 2], capacity=3000, seed=5,
                     window=700)
    kernel = manifest_kernels[spec]
    base, base_lse = kernel(case.q, case.k, case.v, num_splits=1, return_lse=True, **case.kwargs)
    for splits in (2, 3, 7, 16, 100):
        out, lse = kernel(case.q, case.k, case.v, num_splits=splits, return_lse=True, **case.kwargs)
        assert np.abs(out - base).max() <= 2e-6, splits
        assert np.abs(lse - base_lse).max() <= 2e-6, splits
        assert np.array_equal(np.isneginf(lse), np.isneginf(base_lse))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_bshd_cache_equals_bhsd(dtype):
    """A cache whose kv heads lie side by side per key is read all heads together. With the
    same partitions each head's arithmetic is that of a [B, H, S, D] cache, so the outputs are
    bit for bit equal; the default partitions differ (fewer item groups)."""
    spec = AttentionSpec(128, 4, "causal", phase="decode", dtype=dtype)
    kernel = attngen.get_kernel(spec)
    case = make_case(spec, batch=2, heads_kv=4, seq_q=2, kv_lens=[700, 3], capacity=700,
                     seed=9)
    k_bshd = np.ascontiguousarray(case.k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    v_bshd = np.ascontiguousarray(case.v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert k_bshd.strides[1] < k_bshd.strides[2]
    ref = attention_reference(case.q, case.k, case.v, **case.kwargs)
    got = kernel(case.q, k_bshd, v_bshd, **case.kwargs)
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= TOLERANCE[dtype]
    for splits in (1, 3, 16):
        want = kernel(case.q, case.k, case.v, num_splits=splits, **case.kwargs)
        got = kernel(case.q, k_bshd, v_bshd, num_splits=splits, **case.kwargs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128, 256])
def test_paged_with_shuffled_and_shared_pages_equals_contiguous(page_size):
    rng = np.random.default_rng(page_size)
    B, Hkv, G, D = 3, 2, 4, 64
    lens = np.array([1, page_size * 3 + 5, 700])
    capacity = int(lens.max())
    k = rng.standard_normal((B, Hkv, capacity, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, capacity, D)).astype(np.float32)
    k[2, :, :page_size] = k[1, :, :page_size]            # sequences 1 and 2 share a prefix page
    v[2, :, :page_size] = v[1, :, :page_size]
    pages_per_seq = -(-capacity // page_size)
    num_pages = B * pages_per_seq + 2
    order = rng.permutation(num_pages)
    table = np.full((B, pages_per_seq), -1, np.int32)
    k_pages = rng.standard_normal((num_pages, Hkv, page_size, D)).astype(np.float32)  # garbage
    v_pages = rng.standard_normal((num_pages, Hkv, page_size, D)).astype(np.float32)
    next_page = 0
    for b in range(B):
        for p in range(-(-int(lens[b]) // page_size)):
            if b == 2 and p == 0:
                table[b, p] = table[1, 0]                  # the shared page, read by both
                continue
            page = order[next_page]
            next_page += 1
            table[b, p] = page
            chunk = slice(p * page_size, min((p + 1) * page_size, int(lens[b])))
            n = chunk.stop - chunk.start
            k_pages[page, :, :n] = k[b, :, chunk]
            v_pages[page, :, :n] = v[b, :, chunk]
    q = rng.standard_normal((B, Hkv * G, 1, D)).astype(np.float32)
    paged = attngen.attention(q, k_pages, v_pages, block_table=table, kv_lens=lens, causal=True)
    contiguous = attngen.attention(q, k, v, kv_lens=lens, causal=True)
    assert np.abs(paged - contiguous).max() <= 1e-6
    ref = attention_reference(q, k, v, kv_lens=lens, causal=True)
    assert np.abs(paged - ref).max() <= 1e-5


def test_attention_picks_decode_for_few_queries():
    q = np.zeros((1, 4, 3, 32), np.float32)
    k = np.zeros((1, 2, 50, 32), np.float32)
    assert attngen.spec_for_call(q, k, k, causal=True).phase == "decode"
    q17 = np.zeros((1, 4, 17, 32), np.float32)
    assert attngen.spec_for_call(q17, k, k, causal=True).phase == "prefill"


def test_num_splits_rejected_by_prefill_kernel():
    q = np.zeros((1, 2, 20, 32), np.float32)
    with pytest.raises(ValueError, match="num_splits is a decode option"):
        attngen.attention(q, q, q, num_splits=2)
