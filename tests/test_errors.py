"""Bad input gets a clear exception naming the argument; fully masked rows are zeros."""
import numpy as np
import pytest

import attngen
from attngen.reference import attention_reference

rng = np.random.default_rng(0)


def arrays(B=1, Hq=4, Hkv=2, Sq=8, Skv=8, D=32, dtype=np.float32):
    return (rng.standard_normal((B, Hq, Sq, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Skv, D)).astype(dtype),
            rng.standard_normal((B, Hkv, Skv, D)).astype(dtype))


def test_wrong_rank():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"q must have rank 4, got shape \(4, 8, 32\)"):
        attngen.attention(q[0], k, v)


def test_heads_not_multiple():
    q, k, v = arrays(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of kv heads \(2\)"):
        attngen.attention(q, k, v)


def test_head_size_mismatch_with_spec():
    q, k, v = arrays(D=32)
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=64, gqa=2))
    with pytest.raises(ValueError, match="head size .* must be 64 .* got 32"):
        kern(q, k, v)


def test_k_head_size_mismatch():
    q, k, v = arrays(D=32)
    with pytest.raises(ValueError, match="k head size must equal q's"):
        attngen.attention(q, k[..., :16], v[..., :16])


def test_wrong_dtype():
    q, k, v = arrays(dtype=np.float64)
    with pytest.raises(TypeError, match="q must be one of .*float32.*got float64"):
        attngen.attention(q, k, v)
    q32, k, v = arrays()
    with pytest.raises(TypeError, match="k must be float32 .* got float64"):
        attngen.attention(q32, k.astype(np.float64), v)


def test_non_contiguous_last_dim():
    q, k, v = arrays(D=64)
    with pytest.raises(ValueError, match="k must be contiguous in its last dimension"):
        attngen.attention(np.ascontiguousarray(q[..., ::2]), k[..., ::2], v[..., ::2])


def test_window_without_causal():
    q, k, v = arrays()
    with pytest.raises(ValueError, match="window .* needs causal=True"):
        attngen.attention(q, k, v, window=4)


def test_document_ids_wrong_shape():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"document_ids must have shape \[B=1, S >= 8\].*got \(1, 5\)"):
        attngen.attention(q, k, v, document_ids=np.zeros((1, 5), np.int32))
    with pytest.raises(TypeError, match="document_ids must be an integer array"):
        attngen.attention(q, k, v, document_ids=np.zeros((1, 8), np.float32))


def test_bias_that_does_not_broadcast():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"bias of shape \(3, 8\) does not broadcast to"):
        attngen.attention(q, k, v, bias=np.zeros((3, 8), np.float32))


def test_lengths_that_do_not_fit():
    q, k, v = arrays(Sq=4, Skv=16)
    with pytest.raises(ValueError, match="kv_lens must be <= the cache capacity 16, got max 17"):
        attngen.attention(q, k, v, kv_lens=[17])
    with pytest.raises(ValueError, match="kv_lens must be >= 0, got min -1"):
        attngen.attention(q, k, v, kv_lens=[-1])
    with pytest.raises(ValueError, match=r"kv_lens must have shape \(1,\)"):
        attngen.attention(q, k, v, kv_lens=[5, 6])


def test_bad_block_table_fails_before_touching_memory():
    q = rng.standard_normal((2, 2, 1, 32)).astype(np.float32)
    pages = rng.standard_normal((4, 1, 16, 32)).astype(np.float32)
    with pytest.raises(ValueError, match=r"block_table\[1\] refers to page 9, outside 0..3"):
        attngen.attention(q, pages, pages, block_table=np.array([[0, 1], [2, 9]]), kv_lens=[20, 20])
    with pytest.raises(ValueError, match=r"block_table\[0\] refers to page -1"):
        attngen.attention(q, pages, pages, block_table=np.array([[-1, 1], [2, 3]]), kv_lens=[3, 3])
    with pytest.raises(ValueError, match="kv_lens must be <= the cache capacity 32"):
        attngen.attention(q, pages, pages, block_table=np.array([[0, 1], [2, 3]]), kv_lens=[33, 3])
    with pytest.raises(ValueError, match="kv_lens is required with a paged KV cache"):
        attngen.attention(q, pages, pages, block_table=np.array([[0, 1], [2, 3]]))


def test_unused_block_table_entries_may_be_padding():
    q = rng.standard_normal((1, 2, 1, 32)).astype(np.float32)
    pages = rng.standard_normal((4, 1, 16, 32)).astype(np.float32)
    table = np.array([[2, -1, -1]])
    out = attngen.attention(q, pages, pages, block_table=table, kv_lens=[10])
    ref = attention_reference(q, pages, pages, block_table=table, kv_lens=[10])
    assert np.abs(out - ref).max() < 1e-5


def test_bad_scalars():
    q, k, v = arrays()
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        attngen.attention(q, k, v, causal=True, window=0)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        attngen.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1"):
        attngen.attention(q, k, v, num_threads=0)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        attngen.attention(q, k, v, sinks=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="layout must be"):
        attngen.attention(q, k, v, layout="sbhd")


def test_arguments_must_match_the_kernel():
    q, k, v = arrays()
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal"))
    with pytest.raises(ValueError, match="built for mask='causal', but the arguments ask for mask='none'"):
        kern(q, k, v)
    with pytest.raises(ValueError, match="softcap"):
        kern(q, k, v, causal=True, softcap=3.0)


def test_fully_masked_rows_are_zero_not_nan():
    # Sq > Skv with causal: the first queries sit before every key.
    q, k, v = arrays(Sq=12, Skv=5)
    for kwargs in ({}, {"sinks": np.ones(4, np.float32)}):
        out, lse = attngen.attention(q, k, v, causal=True, return_lse=True, **kwargs)
        assert not np.isnan(out).any()
        assert (out[:, :, :7] == 0).all() and np.isneginf(lse[:, :, :7]).all()
        ref = attention_reference(q, k, v, causal=True, **kwargs)
        assert np.abs(out - ref).max() < 1e-5
    # A window of 1 that excludes everything before a document boundary still sees itself;
    # documents that hide every key of a row are impossible (a key sees itself), so check
    # an empty cache too: zero keys, every row fully masked.
    q, k, v = arrays(Sq=3, Skv=0)
    out, lse = attngen.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_bad_arguments_are_caught_after_a_layout_was_remembered():
    """The checks a repeated call skips depend only on its key: anything else that differs
    from the remembered call still gets the full checks and their errors."""
    q, k, v = arrays(Sq=1, Skv=16)
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal",
                                                    phase="decode"))
    out = np.empty_like(q)
    for _ in range(2):
        kern(q, k, v, causal=True, out=out, num_threads=2)
    read_only = np.empty_like(q)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        kern(q, k, v, causal=True, out=read_only, num_threads=2)
    with pytest.raises(TypeError, match="causal must be True or False, got 1"):
        kern(q, k, v, causal=1, out=out, num_threads=2)
    with pytest.raises(ValueError, match="num_threads must be an int >= 1, got 2.0"):
        kern(q, k, v, causal=True, out=out, num_threads=2.0)
    with pytest.raises(TypeError, match="k must be float32 .* got float16"):
        kern(q, k.astype(np.float16), v, causal=True, out=out, num_threads=2)
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        kern(q, k, v, causal=True, out=out.astype(np.float64), num_threads=2)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        kern(q, k, v, causal=True, out=out, num_threads=2, scale=float("nan"))


def test_lengths_and_pages_are_checked_when_a_paged_layout_is_reused():
    """A reused layout skips the Python checks of kv_lens and block_table values; the C entry
    point refuses them instead, and the full checks then name the bad value."""
    q = rng.standard_normal((2, 2, 1, 32)).astype(np.float32)
    pages = rng.standard_normal((4, 1, 16, 32)).astype(np.float32)
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal",
                                                    phase="decode", kv_layout="paged"))
    table, lens = np.array([[0, 1], [2, 3]], np.int32), np.array([20, 5], np.int32)
    for _ in range(2):
        kern(q, pages, pages, causal=True, block_table=table, kv_lens=lens)
    assert len(kern._checked_layouts) == 1
    with pytest.raises(ValueError, match=r"block_table\[1\] refers to page 9, outside 0..3"):
        kern(q, pages, pages, causal=True, block_table=np.array([[0, 1], [9, 3]], np.int32),
             kv_lens=lens)
    with pytest.raises(ValueError, match="kv_lens must be <= the cache capacity 32, got max 33"):
        kern(q, pages, pages, causal=True, block_table=table, kv_lens=np.array([33, 5], np.int32))
    with pytest.raises(ValueError, match="kv_lens must be >= 0, got min -1"):
        kern(q, pages, pages, causal=True, block_table=table, kv_lens=np.array([3, -1], np.int32))
    padded = np.array([[2, -1], [3, 7]], np.int32)     # entries past each length are not read
    out = kern(q, pages, pages, causal=True, block_table=padded, kv_lens=np.array([10, 16], np.int32))
    ref = attention_reference(q, pages, pages, causal=True, block_table=padded, kv_lens=[10, 16])
    assert np.abs(out - ref).max() < 1e-5


def test_contiguous_lengths_are_checked_when_a_layout_is_reused():
    q, k, v = arrays(B=2, Sq=1, Skv=16)
    for _ in range(2):
        attngen.attention(q, k, v, causal=True, kv_lens=np.array([16, 3], np.int32))
    with pytest.raises(ValueError, match="kv_lens must be <= the cache capacity 16, got max 17"):
        attngen.attention(q, k, v, causal=True, kv_lens=np.array([17, 3], np.int32))
    lens = np.array([7, 12], np.int32)
    out = attngen.attention(q, k, v, causal=True, kv_lens=lens)
    ref = attention_reference(q, k, v, causal=True, kv_lens=lens)
    assert np.abs(out - ref).max() < 1e-5
