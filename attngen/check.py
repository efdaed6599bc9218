"""Check a kernel against the float64 reference on seeded random inputs.

Shared by `attngen build --check` and the regression suite, so both exercise a spec with
the same kind of arguments: every mode the spec enables gets a value that matters
(a window shorter than the sequence, a softcap that bends the scores, ragged kv_lens).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .reference import attention_reference
from .spec import AttentionSpec

# Max abs error allowed against the float64 reference (computed from the same stored
# inputs), per storage dtype. f32: accumulation only. bf16 / f16: rounding the output to
# the storage type, half a unit in the last place of values up to ~4 (8 and 11 bit
# significands), with room for the float32 work before it.
TOLERANCE = {"f32": 1e-5, "bf16": 2e-2, "f16": 3e-3}


@dataclass
class Case:
    """Positional arrays and keyword arguments of one attention call."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict = field(default_factory=dict)


def make_case(spec: AttentionSpec, *, batch: int = 2, heads_kv: int = 2, seq_q: int = 37,
              seq_kv: int | None = None, layout: str = "bhsd", page_size: int = 16,
              kv_lens: list | None = None, capacity: int | None = None, seed: int = 0,
              window: int | None = None) -> Case:
    """Random unit-variance inputs for `spec`. seq_kv defaults to seq_q (self-attention);
    kv_lens or capacity turn it into a call against a KV cache (capacity >= every length)."""
    from .kernel import NUMPY_DTYPE

    rng = np.random.default_rng(seed)
    dtype = NUMPY_DTYPE[spec.dtype]
    d, hq = spec.head_dim, heads_kv * spec.gqa
    seq_kv = seq_q if seq_kv is None else seq_kv
    paged = spec.kv_layout == "paged"
    if paged and kv_lens is None:
        kv_lens = [max(seq_q, seq_kv - 3 * b) for b in range(batch)]
    if kv_lens is not None:
        kv_lens = np.asarray(kv_lens, dtype=np.int32)
        capacity = capacity or int(kv_lens.max())
    else:
        capacity = capacity or seq_kv

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float64).astype(dtype)

    q = randn(batch, hq, seq_q, d)
    kwargs: dict = {}
    if paged:
        pages_per_seq = -(-capacity // page_size)
        num_pages = batch * pages_per_seq + 3          # a few pages nobody uses
        k = randn(num_pages, heads_kv, page_size, d)
        v = randn(num_pages, heads_kv, page_size, d)
        order = rng.permutation(num_pages)[: batch * pages_per_seq]   # shuffled pages
        kwargs["block_table"] = order.reshape(batch, pages_per_seq).astype(np.int32)
    else:
        k = randn(batch, heads_kv, capacity, d)
        v = randn(batch, heads_kv, capacity, d)
    if kv_lens is not None:
        kwargs["kv_lens"] = kv_lens
    if layout == "bshd":
        q = np.ascontiguousarray(q.transpose(0, 2, 1, 3))
        if not paged:
            k = np.ascontiguousarray(k.transpose(0, 2, 1, 3))
            v = np.ascontiguousarray(v.transpose(0, 2, 1, 3))
        kwargs["layout"] = "bshd"

    if spec.causal:
        kwargs["causal"] = True
    if spec.mask == "window":
        kwargs["window"] = window or max(1, capacity // 3)
    if spec.mask == "prefix":
        kwargs["prefix_len"] = max(1, capacity // 4)
    if spec.documents:
        # Packed documents: sorted ids with random boundaries.
        cuts = np.sort(rng.integers(0, capacity, size=(batch, 3)), axis=1)
        ids = (np.arange(capacity)[None, :, None] >= cuts[:, None, :]).sum(-1)
        kwargs["document_ids"] = ids.astype(np.int32)
    if spec.bias in ("tensor", "tensor+alibi"):
        kwargs["bias"] = randn(1, hq, seq_q, capacity).astype(np.float32)   # over batch
    if spec.bias in ("alibi", "tensor+alibi"):
        kwargs["alibi"] = True
    if spec.softcap:
        kwargs["softcap"] = 2.0    # small enough to bend unit-variance scores
    if spec.sinks:
        kwargs["sinks"] = rng.standard_normal(hq).astype(np.float32)
    return Case(q, k, v, kwargs)


def max_errors(kernel, case: Case) -> tuple[float, float]:
    """(max |out - ref|, max |lse - ref lse| over rows with a finite lse). Also checks that
    fully masked rows are exactly zero with lse = -inf and that nothing is NaN."""
    out, lse = kernel(case.q, case.k, case.v, return_lse=True, **case.kwargs)
    ref_out, ref_lse = attention_reference(case.q, case.k, case.v, return_lse=True, **case.kwargs)
    out, lse = np.asarray(out), np.asarray(lse)
    if np.isnan(out).any() or np.isnan(lse).any():
        raise AssertionError(f"{kernel.spec.slug}: NaN in the output")
    empty = np.isneginf(ref_lse)
    if not np.array_equal(np.isneginf(lse), empty):
        raise AssertionError(f"{kernel.spec.slug}: fully masked rows differ from the reference")
    out_err = float(np.abs(out.astype(np.float64) - ref_out).max()) if out.size else 0.0
    finite = ~empty
    lse_err = float(np.abs(lse[finite] - ref_lse[finite]).max()) if finite.any() else 0.0
    return out_err, lse_err


def check_spec(spec: AttentionSpec, kernel=None, **case_args) -> float:
    """Max abs output error of `spec`'s kernel on a small random case."""
    if kernel is None:
        from .kernel import get_kernel

        kernel = get_kernel(spec)
    if spec.phase == "decode":   # a couple of new tokens against ragged, longer caches
        case_args = {"seq_q": 2, "kv_lens": [300, 70], "capacity": 320, **case_args}
    out_err, lse_err = max_errors(kernel, make_case(spec, **case_args))
    return max(out_err, lse_err)
