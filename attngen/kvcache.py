"""KV caches for decode and chunked prefill: a contiguous one and a paged one.

Both append new tokens for a batch of sequences of different lengths and attend with the
same kernels as attngen.attention (the arrays are read in place). An append that does not
fit raises before anything is written.
"""
from __future__ import annotations

import numpy as np

from .kernel import as_array, whole_number


def _check_new(name, array, batch, heads_kv, head_dim, dtype):
    array = as_array(array, name)
    if array.ndim != 4 or array.shape[0] != batch or array.shape[1] != heads_kv \
            or array.shape[3] != head_dim:
        raise ValueError(f"{name} must have shape [B={batch}, Hkv={heads_kv}, T, D={head_dim}], "
                         f"got {array.shape}")
    if array.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} like the cache, got {array.dtype}")
    return array


def _new_lengths(lengths, batch, tokens):
    if lengths is None:
        return np.full(batch, tokens, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be an int array of shape ({batch},), got "
                         f"{lengths.dtype} {lengths.shape}")
    if lengths.min() < 0 or lengths.max() > tokens:
        raise ValueError(f"lengths must be in 0..{tokens} (the T of k_new), got "
                         f"{lengths.min()}..{lengths.max()}")
    return lengths.astype(np.int64)


def _append_args(k_new, v_new, lengths, batch, heads_kv, head_dim, dtype):
    """Validated (k_new, v_new, lengths as int64 [B]) of an append."""
    k_new = _check_new("k_new", k_new, batch, heads_kv, head_dim, dtype)
    v_new = _check_new("v_new", v_new, batch, heads_kv, head_dim, dtype)
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new and v_new must have the same shape, got {k_new.shape} "
                         f"and {v_new.shape}")
    return k_new, v_new, _new_lengths(lengths, batch, k_new.shape[2])


class KVCache:
    """Contiguous cache: k, v [B, Hkv, capacity, D] and lens [B] (valid tokens per sequence)."""

    def __init__(self, batch: int, heads_kv: int, head_dim: int, capacity: int,
                 dtype=np.float32):
        for name, value in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim),
                            ("capacity", capacity)):
            whole_number(value, name, 1)
        self.dtype = np.dtype(dtype)
        self.k = np.zeros((batch, heads_kv, capacity, head_dim), self.dtype)
        self.v = np.zeros_like(self.k)
        self.lens = np.zeros(batch, np.int32)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k_new, v_new, lengths=None):
        """Append k_new, v_new [B, Hkv, T, D]; sequence b takes its first lengths[b] tokens
        (default: all T). Raises ValueError, writing nothing, if any sequence would overflow."""
        batch, heads_kv, _, head_dim = self.k.shape
        k_new, v_new, lengths = _append_args(k_new, v_new, lengths, batch, heads_kv, head_dim,
                                             self.dtype)
        after = self.lens + lengths
        if after.max() > self.capacity:
            b = int(np.argmax(after))
            raise ValueError(f"KV cache full: sequence {b} holds {self.lens[b]} tokens, appending "
                             f"{lengths[b]} would exceed the capacity {self.capacity}")
        for b in range(batch):
            start, n = int(self.lens[b]), int(lengths[b])
            self.k[b, :, start:start + n] = k_new[b, :, :n]
            self.v[b, :, start:start + n] = v_new[b, :, :n]
        self.lens[:] = after
        return self

    def reset(self, sequence: int | None = None):
        """Forget every sequence's tokens (or one sequence's)."""
        if sequence is None:
            self.lens[:] = 0
        else:
            self.lens[sequence] = 0

    def attention(self, q, *, causal=True, **kwargs):
        """Attend q [B, Hq, Sq, D] (the newest Sq positions of each sequence) to the cache."""
        from .api import attention

        return attention(q, self.k, self.v, kv_lens=self.lens, causal=causal, **kwargs)


class PagedKVCache:
    """Paged cache: k_pages, v_pages [num_pages, Hkv, page_size, D], block_table [B, max_pages]
    (-1 where no page is allocated) and lens [B]. Pages come from one shared free list."""

    def __init__(self, batch: int, heads_kv: int, head_dim: int, num_pages: int,
                 page_size: int = 16, max_pages_per_seq: int | None = None, dtype=np.float32):
        for name, value in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim),
                            ("num_pages", num_pages), ("page_size", page_size)):
            whole_number(value, name, 1)
        max_pages_per_seq = max_pages_per_seq or num_pages
        self.dtype = np.dtype(dtype)
        self.k_pages = np.zeros((num_pages, heads_kv, page_size, head_dim), self.dtype)
        self.v_pages = np.zeros_like(self.k_pages)
        self.block_table = np.full((batch, max_pages_per_seq), -1, np.int32)
        self.lens = np.zeros(batch, np.int32)
        self._free = list(range(num_pages - 1, -1, -1))   # pop() hands out 0, 1, 2, ...

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def _pages_held(self, b: int) -> int:
        return -(-int(self.lens[b]) // self.page_size)

    def append(self, k_new, v_new, lengths=None):
        """Append k_new, v_new [B, Hkv, T, D], allocating pages as needed. Raises ValueError,
        writing and allocating nothing, if a sequence outgrows its table or pages run out."""
        batch = self.block_table.shape[0]
        _, heads_kv, page_size, head_dim = self.k_pages.shape
        k_new, v_new, lengths = _append_args(k_new, v_new, lengths, batch, heads_kv, head_dim,
                                             self.dtype)
        after = self.lens + lengths
        pages_after = -(-after // page_size)
        max_pages = self.block_table.shape[1]
        if pages_after.max() > max_pages:
            b = int(np.argmax(pages_after))
            raise ValueError(f"KV cache full: sequence {b} would need {pages_after[b]} pages, "
                             f"more than max_pages_per_seq={max_pages}")
        new_pages = int(sum(pages_after[b] - self._pages_held(b) for b in range(batch)))
        if new_pages > len(self._free):
            raise ValueError(f"KV cache full: appending needs {new_pages} new pages, "
                             f"{len(self._free)} are free")
        for b in range(batch):
            for slot in range(self._pages_held(b), int(pages_after[b])):
                self.block_table[b, slot] = self._free.pop()
            for t in range(int(lengths[b])):
                pos = int(self.lens[b]) + t
                page = self.block_table[b, pos // page_size]
                self.k_pages[page, :, pos % page_size] = k_new[b, :, t]
                self.v_pages[page, :, pos % page_size] = v_new[b, :, t]
        self.lens[:] = after
        return self

    def free(self, sequence: int):
        """Return sequence's pages to the free list and empty it."""
        held = self._pages_held(sequence)
        self._free.extend(int(p) for p in self.block_table[sequence, :held][::-1])
        self.block_table[sequence] = -1
        self.lens[sequence] = 0

    def attention(self, q, *, causal=True, **kwargs):
        """Attend q [B, Hq, Sq, D] (the newest Sq positions of each sequence) to the cache."""
        from .api import attention

        return attention(q, self.k_pages, self.v_pages, block_table=self.block_table,
                         kv_lens=self.lens, causal=causal, **kwargs)
