"""Plain numpy float64 attention: the oracle every generated kernel is tested against.

Clarity comes before speed. The work loops over batch and query head and, inside
that, over blocks of query rows, so memory stays at a few [rows, Skv] float64
arrays however long the sequences are (S = 4096 with B*H = 32 is fine).

Semantics, in the order they are applied for query row i of sequence b, head h:

* positions: kv_len = kv_lens[b] (or the key capacity when kv_lens is None); the
  query sits at pos = kv_len - Sq + i (bottom-right aligned); keys 0..kv_len-1 exist.
  kv_lens must lie in [0, capacity]; a length below Sq (like Skv < Sq without kv_lens)
  puts the first queries at negative positions: padding rows of a ragged batch, which
  see no key under a causal mask. Not allowed with document_ids (no id there).
* s_j = scale * q . k_j  (scale defaults to 1/sqrt(D)); query head h reads kv head
  h // (Hq // Hkv).
* softcap c: s_j = c * tanh(s_j / c).
* additive bias[b, h, i, j] (numpy broadcasting) and ALiBi slope[h] * (j - pos).
* mask: causal j <= pos; window w: pos - w < j <= pos; prefix P: j < P is also
  visible; document_ids: same document as the query's position (AND).
* softmax over visible keys, with an optional per-head sink logit in the
  denominator; lse = log(sum_visible exp(s_j) [+ exp(sink_h)]).
* a row with no visible key gives out = 0 and lse = -inf, with or without sinks.
  A key hidden only by a -inf bias is not "masked": it weighs nothing, but a sink
  still counts, so such a row gives out = 0 and lse = sink_h.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["alibi_slopes", "attention_reference"]

LAYOUTS = ("bhsd", "bshd")

# Query rows handled at once inside one (batch, head): bounds the temporaries
# to about _ROW_BLOCK * Skv float64 values each.
_ROW_BLOCK = 512


# --------------------------------------------------------------------------- helpers

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _float_array(name, value):
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":   # ml_dtypes' bf16
        raise ValueError(f"{name} must be a real (float) array, got dtype {array.dtype}")
    return array.astype(np.float64)


def _int_array(name, value):
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_rank(name, array, rank, meaning):
    if array.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({meaning}), got shape {array.shape}")


# --------------------------------------------------------------------------- ALiBi

def _power_of_two_slopes(n: int) -> list:
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Standard ALiBi slopes (Press et al.) for `num_heads` heads, float64 [num_heads].

    For a power of two n: slope_i = 2 ** (-8 i / n), i = 1..n. Otherwise, with
    m the largest power of two below n: the m slopes for m heads, then the slopes
    for 2m heads taken at indices 0, 2, 4, ... until there are n in all.
    """
    if not _is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    n = int(num_heads)
    m = 1 << (n.bit_length() - 1)  # 2 ** floor(log2(n))
    slopes = _power_of_two_slopes(m)
    if m < n:
        slopes += _power_of_two_slopes(2 * m)[0::2][: n - m]
    return np.asarray(slopes, dtype=np.float64)


# --------------------------------------------------------------------------- paged KV

def _gather_pages(name, pages, block_table, kv_lens, capacity):
    """Copy paged keys or values [num_pages, Hkv, page_size, D] into [B, Hkv, capacity, D].

    Slots at or past kv_lens[b] are left zero (they are never visible); only the
    block-table entries those keys need are read, so unused entries may hold
    anything (-1, say).
    """
    num_pages, hkv, page_size, dim = pages.shape
    batch = block_table.shape[0]
    out = np.zeros((batch, hkv, capacity, dim), dtype=np.float64)
    for b in range(batch):
        length = int(kv_lens[b])
        for page_index in range((length + page_size - 1) // page_size):
            page = int(block_table[b, page_index])
            if not 0 <= page < num_pages:
                raise ValueError(
                    f"block_table[{b}, {page_index}] must be a page index in "
                    f"[0, {num_pages}) ({name} has {num_pages} pages), got {page}")
            start = page_index * page_size
            stop = min(start + page_size, length)
            out[b, :, start:stop, :] = pages[page, :, : stop - start, :]
    return out


# --------------------------------------------------------------------------- main entry

def attention_reference(q, k, v, *, scale=None, causal=False, window=None, prefix_len=None,
                        document_ids=None, bias=None, alibi=None, softcap=None, sinks=None,
                        kv_lens=None, block_table=None, return_lse=False, layout="bhsd"):
    """Exact attention in float64; see the module docstring for the full contract.

    layout "bhsd": q [B, Hq, Sq, D], k, v [B, Hkv, Skv, D]; "bshd": q [B, Sq, Hq, D],
    k, v [B, Skv, Hkv, D]. With block_table ([B, max_pages] ints) k and v are pages
    [num_pages, Hkv, page_size, D] whatever the layout, and kv_lens is required.

    Returns out (float64, q's layout and shape), or (out, lse) with lse float64
    [B, Hq, Sq] when return_lse is true.
    """
    # ---- layout and ranks
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    q = _float_array("q", q)
    k = _float_array("k", k)
    v = _float_array("v", v)
    q_meaning = "[B, Hq, Sq, D]" if layout == "bhsd" else "[B, Sq, Hq, D]"
    _check_rank("q", q, 4, q_meaning)
    paged = block_table is not None
    if paged:
        kv_meaning = "pages [num_pages, Hkv, page_size, D]"
    else:
        kv_meaning = "[B, Hkv, Skv, D]" if layout == "bhsd" else "[B, Skv, Hkv, D]"
    _check_rank("k", k, 4, kv_meaning)
    _check_rank("v", v, 4, kv_meaning)
    if k.shape != v.shape:
        raise ValueError(f"v must have the same shape as k {k.shape}, got {v.shape}")

    if layout == "bshd":
        q = q.transpose(0, 2, 1, 3)
        if not paged:
            k = k.transpose(0, 2, 1, 3)
            v = v.transpose(0, 2, 1, 3)
    batch, hq, sq, dim = q.shape
    hkv = k.shape[1]
    if k.shape[3] != dim:
        raise ValueError(f"k and v must have head dim D = {dim} (q's last axis), "
                         f"got {k.shape[3]} (k shape {k.shape})")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the number of query heads Hq = {hq} must be a multiple of the "
                         f"number of kv heads Hkv = {hkv} (k shape {k.shape})")
    group = hq // hkv

    # ---- lengths, paging
    if paged:
        block_table = _int_array("block_table", block_table)
        _check_rank("block_table", block_table, 2, "[B, max_pages]")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape [B={batch}, max_pages], "
                             f"got {block_table.shape}")
        if kv_lens is None:
            raise ValueError("kv_lens is required when block_table is given, got None")
        capacity = block_table.shape[1] * k.shape[2]
        capacity_desc = (f"the paged capacity max_pages * page_size = "
                         f"{block_table.shape[1]} * {k.shape[2]} = {capacity}")
    else:
        if k.shape[0] != batch:
            raise ValueError(f"k and v must have batch size B = {batch} (q's), "
                             f"got {k.shape[0]} (k shape {k.shape})")
        capacity = k.shape[2]
        capacity_desc = f"k's sequence length Skv = {capacity}"

    if kv_lens is None:
        # Skv < Sq is allowed here (as in FlashAttention): the first queries then
        # sit at negative positions, and under a causal mask they see no key.
        lengths = np.full(batch, capacity, dtype=np.int64)
    else:
        lengths = _int_array("kv_lens", kv_lens)
        if lengths.shape != (batch,):
            raise ValueError(f"kv_lens must have shape [B] = ({batch},), got {lengths.shape}")
        for b in range(batch):
            if lengths[b] > capacity:
                raise ValueError(f"kv_lens[{b}] = {lengths[b]} exceeds {capacity_desc}")
            if lengths[b] < 0:
                raise ValueError(f"kv_lens[{b}] = {lengths[b]} must be >= 0")

    if paged:
        k = _gather_pages("k", k, block_table, lengths, capacity)
        v = _gather_pages("v", v, block_table, lengths, capacity)

    # ---- scalar options
    if scale is None:
        scale = 1.0 / np.sqrt(dim)
    elif not _is_real(scale):
        raise ValueError(f"scale must be a real number or None, got {scale!r}")
    scale = float(scale)

    if softcap is not None:
        if not _is_real(softcap) or not softcap > 0:
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        softcap = float(softcap)

    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    causal = bool(causal)
    if window is not None:
        if not causal:
            raise ValueError(f"window requires causal=True, got window={window!r} "
                             "with causal=False")
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        window = int(window)
    if prefix_len is not None:
        if not causal:
            raise ValueError(f"prefix_len requires causal=True, got prefix_len={prefix_len!r} "
                             "with causal=False")
        if not _is_int(prefix_len) or prefix_len < 0:
            raise ValueError(f"prefix_len must be an int >= 0 or None, got {prefix_len!r}")
        prefix_len = int(prefix_len)

    # ---- per-position and per-head arrays
    if document_ids is not None:
        document_ids = _int_array("document_ids", document_ids)
        if paged:
            ok = (document_ids.ndim == 2 and document_ids.shape[0] == batch
                  and document_ids.shape[1] >= int(lengths.max(initial=0)))
            expected = f"[B={batch}, L] with L >= max(kv_lens) = {int(lengths.max(initial=0))}"
        else:
            ok = document_ids.shape == (batch, capacity)
            expected = f"[B, Skv] = ({batch}, {capacity})"
        if not ok:
            raise ValueError(f"document_ids must have shape {expected}, "
                             f"got {document_ids.shape}")
        if int(lengths.min(initial=sq)) < sq:
            raise ValueError(f"document_ids needs Skv >= Sq (every query's position must "
                             f"have a document id), got Skv = {capacity} and Sq = {sq}")

    if alibi is None or alibi is False:
        slopes = None
    elif alibi is True:
        slopes = alibi_slopes(hq)
    else:
        slopes = _float_array("alibi", alibi)
        if slopes.shape != (hq,):
            raise ValueError(f"alibi must be None, True or an array of slopes of shape "
                             f"[Hq] = ({hq},), got shape {slopes.shape}")

    if sinks is not None:
        sinks = _float_array("sinks", sinks)
        if sinks.shape != (hq,):
            raise ValueError(f"sinks must have shape [Hq] = ({hq},), got {sinks.shape}")

    if bias is not None:
        bias = _float_array("bias", bias)
        if bias.ndim > 4:
            raise ValueError(f"bias must be broadcastable to [B, Hq, Sq, Skv], "
                             f"got rank {bias.ndim} shape {bias.shape}")
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        key_ok = (bias.shape[3] == 1
                  or (bias.shape[3] >= int(lengths.max(initial=0)) if paged
                      else bias.shape[3] == capacity))
        if (bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, hq)
                or bias.shape[2] not in (1, sq) or not key_ok):
            raise ValueError(f"bias must be broadcastable to [B, Hq, Sq, Skv] = "
                             f"({batch}, {hq}, {sq}, {capacity}), got shape {bias.shape}")

    # ---- the computation
    out = np.zeros((batch, hq, sq, dim), dtype=np.float64)
    lse = np.full((batch, hq, sq), -np.inf, dtype=np.float64)
    with np.errstate(under="ignore"):
        for b in range(batch):
            kv_len = int(lengths[b])
            key_pos = np.arange(kv_len)
            for h in range(hq):
                kv_head = h // group
                keys = k[b, kv_head, :kv_len, :]
                values = v[b, kv_head, :kv_len, :]
                for row0 in range(0, sq, _ROW_BLOCK):
                    row1 = min(row0 + _ROW_BLOCK, sq)
                    query_pos = kv_len - sq + np.arange(row0, row1)

                    scores = scale * (q[b, h, row0:row1, :] @ keys.T)
                    if softcap is not None:
                        scores = softcap * np.tanh(scores / softcap)
                    if bias is not None:
                        bb = b if bias.shape[0] > 1 else 0
                        bh = h if bias.shape[1] > 1 else 0
                        rows = slice(row0, row1) if bias.shape[2] > 1 else slice(0, 1)
                        cols = slice(0, kv_len) if bias.shape[3] > 1 else slice(0, 1)
                        scores = scores + bias[bb, bh, rows, cols]
                    if slopes is not None:
                        scores = scores + slopes[h] * (key_pos[None, :] - query_pos[:, None])

                    visible = _visible(query_pos, key_pos, causal, window, prefix_len,
                                       None if document_ids is None else document_ids[b])
                    sink = None if sinks is None else sinks[h]
                    out[b, h, row0:row1], lse[b, h, row0:row1] = _softmax_rows(
                        scores, visible, values, sink)

    if layout == "bshd":
        out = np.ascontiguousarray(out.transpose(0, 2, 1, 3))
    if return_lse:
        return out, lse
    return out


def _visible(query_pos, key_pos, causal, window, prefix_len, doc_row):
    """Boolean [rows, kv_len]: key j visible to the query at each position."""
    j = key_pos[None, :]
    pos = query_pos[:, None]
    visible = np.ones((query_pos.size, key_pos.size), dtype=bool)
    if causal:
        visible = j <= pos
        if window is not None:
            visible = visible & (j > pos - window)
        if prefix_len is not None:
            visible = visible | (j < prefix_len)
    if doc_row is not None:
        visible = visible & (doc_row[query_pos][:, None] == doc_row[key_pos][None, :])
    return visible


def _softmax_rows(scores, visible, values, sink):
    """Softmax of the visible scores (plus an optional sink logit) times values.

    Returns (out [rows, D], lse [rows]). Rows with no visible key give zeros and
    -inf. Keys whose score is -inf (from a -inf bias) simply weigh nothing.
    """
    rows = scores.shape[0]
    masked = np.where(visible, scores, -np.inf)
    has_key = visible.any(axis=1)
    if masked.shape[1] > 0:
        row_max = masked.max(axis=1)
    else:
        row_max = np.full(rows, -np.inf)
    if sink is not None:
        row_max = np.maximum(row_max, sink)
    # Shift by a finite amount: -inf rows (nothing to add up) use 0 instead.
    shift = np.where(np.isfinite(row_max), row_max, 0.0)

    weights = np.exp(masked - shift[:, None])  # masked keys: exp(-inf) = 0
    denom = weights.sum(axis=1)
    if sink is not None:
        denom = denom + np.exp(sink - shift)
    denom = np.where(has_key, denom, 0.0)

    positive = denom > 0
    out = np.zeros((rows, values.shape[1]), dtype=np.float64)
    np.divide(weights @ values, denom[:, None], out=out, where=positive[:, None])
    lse = np.full(rows, -np.inf, dtype=np.float64)
    np.log(denom, out=lse, where=positive)
    lse = np.where(positive, lse + shift, -np.inf)
    return out, lse
