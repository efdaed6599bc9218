"""The functional API: map call arguments to an AttentionSpec, get its kernel, call it."""
from __future__ import annotations

import functools

from . import kernel as _kernel
from .kernel import SPEC_DTYPE, as_array, get_kernel, mask_mode
from .spec import AttentionSpec

# Up to this many new queries per sequence (a token plus speculative ones) use the decode
# kernel, which splits the KV sequence across threads; longer query blocks use prefill.
DECODE_MAX_QUERIES = 16


def choose_phase(seq_q: int, documents: bool) -> str:
    return "decode" if seq_q <= DECODE_MAX_QUERIES and not documents else "prefill"


def spec_for_call(q, k, v, *, causal=False, window=None, prefix_len=None, document_ids=None,
                  bias=None, alibi=None, softcap=None, sinks=None, layout="bhsd",
                  block_table=None, phase=None) -> AttentionSpec:
    """The AttentionSpec a call with these arguments needs (phase: chosen from Sq if None)."""
    q_shape, dtype = _shape_and_spec_dtype(q, "q")
    k_shape = _shape_and_spec_dtype(k, "k")[0]
    for name, shape in (("q", q_shape), ("k", k_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4, got shape {shape}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    heads_q = q_shape[1] if layout == "bhsd" else q_shape[2]
    paged = block_table is not None
    heads_kv = k_shape[1] if (paged or layout == "bhsd") else k_shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of kv heads ({heads_kv})")
    mask = mask_mode(causal, window, prefix_len)
    if phase is None:
        seq_q = q_shape[2] if layout == "bhsd" else q_shape[1]
        phase = choose_phase(seq_q, document_ids is not None)
    has_alibi = alibi is not None and alibi is not False
    bias_mode = {(False, False): "none", (True, False): "tensor", (False, True): "alibi",
                 (True, True): "tensor+alibi"}[(bias is not None, has_alibi)]
    return _spec(int(q_shape[-1]), heads_q // heads_kv, mask, document_ids is not None,
                 bias_mode, softcap is not None, sinks is not None, dtype, phase,
                 "paged" if paged else "contiguous")


def _shape_and_spec_dtype(x, name: str) -> tuple:
    """x's shape and spec dtype (None if it has none). A tensor of a kernel dtype is read
    as it is: viewing it through DLPack costs 5-10 us of every call."""
    if type(x) is _kernel._torch_tensor:
        dtype = _kernel._torch_spec_dtypes.get(x.dtype)
        if dtype is not None:
            return tuple(x.shape), dtype
    array = as_array(x, name)
    dtype = SPEC_DTYPE.get(array.dtype)
    if dtype is None and name == "q":
        raise TypeError(f"q must be one of {[str(d) for d in SPEC_DTYPE]}, got {array.dtype}")
    return array.shape, dtype


# A call's spec, remembered: building and validating one costs 2 us of every call, and a
# model asks for the same few at every layer. typed: True and 1 are different arguments.
_spec = functools.lru_cache(maxsize=256, typed=True)(AttentionSpec)


def attention(q, k=None, v=None, *, scale=None, causal=False, window=None, prefix_len=None,
              document_ids=None, bias=None, alibi=None, softcap=None, sinks=None,
              return_lse=False, layout="bhsd", out=None, num_threads=None,
              kv_lens=None, block_table=None, num_splits=None, phase=None, cache=None):
    """Attention of q over k, v with a kernel specialised for the arguments given.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D] (layout="bshd": [B, S, H, D]); or a paged cache
    k, v [num_pages, Hkv, page_size, D] with block_table [B, max_pages] and kv_lens [B].
    Up to 16 queries per sequence run the decode kernel (KV split across threads, then
    merged); num_splits forces its partition count. phase="prefill"/"decode" overrides
    the choice. See README.md for the semantics of each argument.
    cache=: a KVCache or PagedKVCache to attend to instead of k, v; q holds the newest
    tokens of each sequence, so the call is always causal.
    Returns out, or (out, lse) with return_lse=True."""
    if cache is not None:
        if k is not None or v is not None or kv_lens is not None or block_table is not None:
            raise ValueError("with cache=, do not pass k, v, kv_lens or block_table")
        return cache.attention(q, scale=scale, causal=True, window=window,
                               prefix_len=prefix_len, document_ids=document_ids, bias=bias,
                               alibi=alibi, softcap=softcap, sinks=sinks, return_lse=return_lse,
                               layout=layout, out=out, num_threads=num_threads,
                               num_splits=num_splits, phase=phase)
    if k is None or v is None:
        raise TypeError("attention() needs k and v (or cache=)")
    spec = spec_for_call(q, k, v, causal=causal, window=window, prefix_len=prefix_len,
                         document_ids=document_ids, bias=bias, alibi=alibi, softcap=softcap,
                         sinks=sinks, layout=layout, block_table=block_table, phase=phase)
    return get_kernel(spec)(q, k, v, scale=scale, causal=causal, window=window,
                            prefix_len=prefix_len, document_ids=document_ids, bias=bias,
                            alibi=alibi, softcap=softcap, sinks=sinks, return_lse=return_lse,
                            layout=layout, out=out, num_threads=num_threads, kv_lens=kv_lens,
                            block_table=block_table, num_splits=num_splits)
