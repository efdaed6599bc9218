"""KVCache and PagedKVCache: ragged appends, full caches, attention through the cache."""
import numpy as np
import pytest

import attngen
from attngen.reference import attention_reference

rng = np.random.default_rng(2)
B, HKV, G, D = 3, 2, 2, 32


def new_tokens(t):
    return (rng.standard_normal((B, HKV, t, D)).astype(np.float32),
            rng.standard_normal((B, HKV, t, D)).astype(np.float32))


def gathered(cache):
    """Contiguous copies of what each sequence holds, for the reference."""
    if isinstance(cache, attngen.KVCache):
        return cache.k, cache.v
    cap = cache.block_table.shape[1] * cache.page_size
    k = np.zeros((B, HKV, cap, D), np.float32)
    v = np.zeros_like(k)
    for b in range(B):
        for pos in range(int(cache.lens[b])):
            page = cache.block_table[b, pos // cache.page_size]
            k[b, :, pos] = cache.k_pages[page, :, pos % cache.page_size]
            v[b, :, pos] = cache.v_pages[page, :, pos % cache.page_size]
    return k, v


def make(kind):
    if kind == "contiguous":
        return attngen.KVCache(B, HKV, D, capacity=64)
    return attngen.PagedKVCache(B, HKV, D, num_pages=40, page_size=8, max_pages_per_seq=8)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_prefill_then_decode_through_the_cache(kind):
    cache = make(kind)
    k0, v0 = new_tokens(20)
    cache.append(k0, v0, lengths=[20, 7, 13])              # ragged prompts
    assert cache.lens.tolist() == [20, 7, 13]
    for step in range(5):
        k1, v1 = new_tokens(1)
        cache.append(k1, v1)
        q = rng.standard_normal((B, HKV * G, 1, D)).astype(np.float32)
        out, lse = cache.attention(q, return_lse=True)
        same = attngen.attention(q, cache=cache)
        k, v = gathered(cache)
        ref, ref_lse = attention_reference(q, k, v, kv_lens=cache.lens, causal=True, return_lse=True)
        assert np.abs(out - ref).max() <= 1e-5 and np.abs(lse - ref_lse).max() <= 1e-4
        np.testing.assert_array_equal(out, same)
    assert cache.lens.tolist() == [25, 12, 18]
    # The appended tokens landed where they belong.
    k, _ = gathered(cache)
    np.testing.assert_array_equal(k[1, :, :7], k0[1, :, :7])


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_full_cache_raises_and_writes_nothing(kind):
    cache = make(kind)
    k0, v0 = new_tokens(60)
    cache.append(k0, v0, lengths=[60, 10, 10])
    before = [a.copy() for a in gathered(cache)] + [cache.lens.copy()]
    table = cache.block_table.copy() if kind == "paged" else None
    k1, v1 = new_tokens(5)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.append(k1, v1)
    after = list(gathered(cache)) + [cache.lens]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
    if kind == "paged":
        np.testing.assert_array_equal(table, cache.block_table)


def test_paged_pages_run_out_and_come_back():
    cache = attngen.PagedKVCache(B, HKV, D, num_pages=6, page_size=8)
    k0, v0 = new_tokens(16)
    cache.append(k0, v0)                                   # 2 pages each: all 6 used
    assert cache.free_pages == 0
    k1, v1 = new_tokens(1)
    with pytest.raises(ValueError, match="needs 3 new pages, 0 are free"):
        cache.append(k1, v1)
    cache.free(1)
    assert cache.free_pages == 2 and cache.lens[1] == 0 and (cache.block_table[1] == -1).all()
    cache.append(k1, v1, lengths=[0, 1, 0])
    assert cache.lens.tolist() == [16, 1, 16]


def test_append_validates_shapes():
    cache = attngen.KVCache(B, HKV, D, capacity=8)
    with pytest.raises(ValueError, match=r"k_new must have shape \[B=3, Hkv=2, T, D=32\]"):
        cache.append(np.zeros((B, HKV, 1, 16), np.float32), np.zeros((B, HKV, 1, 16), np.float32))
    with pytest.raises(TypeError, match="k_new must be float32"):
        cache.append(np.zeros((B, HKV, 1, D)), np.zeros((B, HKV, 1, D)))
    with pytest.raises(ValueError, match="lengths must be in 0..1"):
        cache.append(*new_tokens(1), lengths=[2, 0, 0])


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_ragged_prompts_with_padded_query_rows(kind):
    """One padded query block for prompts of different lengths: each sequence's real queries
    are its last rows (bottom-right aligned); rows before its start see nothing (zeros)."""
    cache = make(kind)
    lengths = [20, 7, 13]
    k0, v0 = new_tokens(20)
    cache.append(k0, v0, lengths=lengths)
    q = rng.standard_normal((B, HKV * G, 20, D)).astype(np.float32)
    out = cache.attention(q)
    k, v = gathered(cache)
    for b, n in enumerate(lengths):
        alone = attention_reference(q[b:b + 1, :, 20 - n:], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                    causal=True)
        assert np.abs(out[b:b + 1, :, 20 - n:] - alone).max() <= 1e-5
        assert (out[b, :, :20 - n] == 0).all()
