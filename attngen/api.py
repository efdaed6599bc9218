"""The functional API: map call arguments to an AttentionSpec, get its kernel, call it."""
from __future__ import annotations

import numpy as np

from .kernel import as_array, get_kernel
from .spec import AttentionSpec

_DTYPE_NAMES = {np.dtype(np.float32): "f32"}


def spec_for_call(q, k, v, *, causal=False, window=None, prefix_len=None, document_ids=None,
                  bias=None, alibi=None, softcap=None, sinks=None, layout="bhsd",
                  block_table=None, phase="prefill") -> AttentionSpec:
    """The AttentionSpec a call with these arguments needs."""
    q_arr, k_arr = as_array(q, "q"), as_array(k, "k")
    for name, array in (("q", q_arr), ("k", k_arr)):
        if array.ndim != 4:
            raise ValueError(f"{name} must have rank 4, got shape {array.shape}")
    dtype = _DTYPE_NAMES.get(q_arr.dtype)
    if dtype is None:
        raise TypeError(f"q must be one of {[str(d) for d in _DTYPE_NAMES]}, got {q_arr.dtype}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    heads_q = q_arr.shape[1] if layout == "bhsd" else q_arr.shape[2]
    paged = block_table is not None
    heads_kv = k_arr.shape[1] if (paged or layout == "bhsd") else k_arr.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of kv heads ({heads_kv})")
    if window is not None and not causal:
        raise ValueError("window (sliding window) needs causal=True")
    if prefix_len is not None and not causal:
        raise ValueError("prefix_len (prefix-LM) needs causal=True")
    if window is not None and prefix_len is not None:
        raise ValueError("give at most one of window and prefix_len")
    mask = ("window" if window is not None else "prefix" if prefix_len is not None
            else "causal" if causal else "none")
    has_alibi = alibi is not None and alibi is not False
    bias_mode = {(False, False): "none", (True, False): "tensor", (False, True): "alibi",
                 (True, True): "tensor+alibi"}[(bias is not None, has_alibi)]
    return AttentionSpec(head_dim=int(q_arr.shape[-1]), gqa=heads_q // heads_kv, mask=mask,
                         documents=document_ids is not None, bias=bias_mode,
                         softcap=softcap is not None, sinks=sinks is not None, dtype=dtype,
                         phase=phase, kv_layout="paged" if paged else "contiguous")


def attention(q, k, v, *, scale=None, causal=False, window=None, prefix_len=None,
              document_ids=None, bias=None, alibi=None, softcap=None, sinks=None,
              return_lse=False, layout="bhsd", out=None, num_threads=None,
              kv_lens=None, block_table=None):
    """Attention of q over k, v with a kernel specialised for the arguments given.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D] (layout="bshd": [B, S, H, D]); or a paged cache
    k, v [num_pages, Hkv, page_size, D] with block_table [B, max_pages] and kv_lens [B].
    See README.md for the semantics of each argument. Returns out (and lse if asked)."""
    spec = spec_for_call(q, k, v, causal=causal, window=window, prefix_len=prefix_len,
                         document_ids=document_ids, bias=bias, alibi=alibi, softcap=softcap,
                         sinks=sinks, layout=layout, block_table=block_table)
    return get_kernel(spec)(q, k, v, scale=scale, causal=causal, window=window,
                            prefix_len=prefix_len, document_ids=document_ids, bias=bias,
                            alibi=alibi, softcap=softcap, sinks=sinks, return_lse=return_lse,
                            layout=layout, out=out, num_threads=num_threads, kv_lens=kv_lens,
                            block_table=block_table)
