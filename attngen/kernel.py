"""Kernel: a loaded library plus the one generic wrapper every variant is called through.

The wrapper checks dtypes, shapes, strides and lengths against the spec and raises a clear
ValueError/TypeError before any pointer reaches C; then it passes zero-copy pointers.
"""
from __future__ import annotations

import math
import threading
from time import monotonic

import cffi
import ml_dtypes
import numpy as np

from . import cache, config, tuning
from .errors import AttngenError
from .spec import AttentionSpec
from .toolchain import Toolchain, detect

CDEF = """
typedef struct {
    const void *q, *k, *v;
    void *out;
    float *lse;
    int64_t batch, heads_q, heads_kv, seq_q, seq_kv;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
    const int32_t *kv_lens;
    const int32_t *block_table;
    int64_t block_table_stride, page_size, num_pages;
    float scale, softcap;
    int64_t window, prefix_len;
    const int32_t *doc_ids;
    int64_t doc_stride;
    const float *bias;
    int64_t bias_stride[4];
    const float *alibi_slopes;
    const float *sinks;
    int32_t num_threads;
    int32_t num_splits;
} attngen_params;
int attngen_run(const attngen_params *layout, const void *q, const void *k, const void *v,
                void *out, float *lse, const int32_t *kv_lens, const int32_t *block_table);
const char *attngen_slug(void);
"""
ffi = cffi.FFI()
ffi.cdef(CDEF)

# Storage dtype of q, k, v and out per spec dtype (numpy has no bfloat16: ml_dtypes').
NUMPY_DTYPE = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16),
               "f16": np.dtype(np.float16)}
SPEC_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPE.items()}
LAYOUTS = ("bhsd", "bshd")
# Checked call layouts a kernel remembers (a model makes a few per kernel; a long-context
# loop whose length grows every step would otherwise grow the memo without bound).
CHECKED_LAYOUTS_KEPT = 64


def as_array(x, name: str) -> np.ndarray:
    """A zero-copy numpy view of an array-like on the CPU (numpy, DLPack, buffer protocol)."""
    if isinstance(x, np.ndarray):
        return x
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if _is_torch(x):
        import torch

        x = x.detach()     # no autograd through a C kernel
        if x.dtype == torch.bfloat16:   # numpy's DLPack has no bfloat16: view the bits
            return np.from_dlpack(x.view(torch.int16)).view(ml_dtypes.bfloat16)
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array_interface__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TypeError(f"{name}: cannot view {type(x).__name__} as a CPU array "
                            f"without copying ({exc})") from None
    return np.asarray(x)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


# torch.Tensor and the torch dtype of each spec dtype, once a call has brought torch in (the
# reused-layout path for tensors compares types against them without importing torch).
_torch_tensor = _torch_strided = None
_torch_dtypes: dict = {}
_torch_spec_dtypes: dict = {}


def _note_torch() -> None:
    global _torch_tensor, _torch_strided
    import torch

    _torch_dtypes.update(f32=torch.float32, bf16=torch.bfloat16, f16=torch.float16,
                         int32=torch.int32)
    _torch_spec_dtypes.update({torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"})
    _torch_strided = torch.strided
    _torch_tensor = torch.Tensor


def _options_key(layout, scale, causal, window, prefix_len, softcap, return_lse, num_threads,
                 num_splits) -> tuple:
    """The part of a reused layout's key that the call options make; types too, so that
    True and 1 (which the checks treat differently) do not share a layout."""
    return (layout, scale, type(scale), causal, type(causal), window, type(window), prefix_len,
            type(prefix_len), softcap, return_lse, num_threads, type(num_threads), num_splits,
            type(num_splits))


def _torch_int32_ptr(x):
    """A dense CPU int32 tensor's address (a reused call's kv_lens or block_table), else None."""
    if type(x) is not _torch_tensor or x.dtype is not _torch_dtypes["int32"] or not x.is_cpu \
            or x.layout is not _torch_strided or not x.is_contiguous():
        return None
    return ffi.cast(_CTYPES["const int32_t *"], x.data_ptr())


_CTYPES = {name: ffi.typeof(name) for name in
           ("const void *", "void *", "float *", "const float *", "const int32_t *")}
INT32 = np.dtype(np.int32)
ATTNGEN_ENOMEM, ATTNGEN_EINVAL, ATTNGEN_ENOAMX = 1, 2, 3   # attngen_run's failures (common.c.j2)


def _ptr(ctype: str, array: np.ndarray | None):
    """The address of array's first element as a `ctype`. A dense array goes through the
    buffer protocol (five times cheaper than .ctypes, which builds an object per call)."""
    if array is None:
        return ffi.NULL
    ctype = _CTYPES[ctype]
    if array.flags.c_contiguous:
        try:
            return ffi.cast(ctype, ffi.from_buffer(array))
        except (TypeError, ValueError, BufferError):
            pass    # an exporter that refuses a plain buffer: take the slow way
    return ffi.cast(ctype, array.ctypes.data)


def _dense_int32_ptr(array: np.ndarray | None):
    """An int32 array's address, or a ValueError when it is not C-contiguous (the layout
    a reused call relies on)."""
    if array is None:
        return ffi.NULL
    return ffi.cast(_CTYPES["const int32_t *"], ffi.from_buffer(array))


def _element_strides(array: np.ndarray, name: str) -> tuple[int, ...]:
    """Strides in elements; the last dimension must be contiguous."""
    itemsize, strides = array.itemsize, array.strides
    if array.size == 0:     # numpy gives empty arrays zero strides; nothing is read
        return (0,) * array.ndim
    if array.shape[-1] > 1 and strides[-1] != itemsize:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride "
                         f"{itemsize} bytes), got strides {strides}; "
                         f"pass np.ascontiguousarray({name}) or a view whose last axis is dense")
    combined = 0
    for stride in strides:
        combined |= stride
    if combined % itemsize:     # item sizes are powers of two: one test covers every stride
        raise ValueError(f"{name} has strides {strides} that are not multiples of its "
                         f"item size {itemsize}")
    return tuple([stride // itemsize for stride in strides])


def _int_array(x, name: str, shape: tuple) -> np.ndarray:
    """A small int32 argument (lengths, ids, tables): converted (copied) and checked."""
    array = as_array(x, name)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if array.size and (array.max() > np.iinfo(np.int32).max or array.min() < np.iinfo(np.int32).min):
        raise ValueError(f"{name} values must fit in int32")
    return np.ascontiguousarray(array, dtype=np.int32)


def whole_number(value, name: str, minimum: int) -> int:
    """`value` as an int, or a ValueError naming `name` (bools are not numbers here)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def mask_mode(causal, window, prefix_len) -> str:
    """The spec mask the mask arguments ask for, after checking they make sense together."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if window is not None and not causal:
        raise ValueError("window (sliding window) needs causal=True")
    if prefix_len is not None and not causal:
        raise ValueError("prefix_len (prefix-LM) needs causal=True")
    if window is not None and prefix_len is not None:
        raise ValueError("give at most one of window and prefix_len")
    return ("window" if window is not None else "prefix" if prefix_len is not None
            else "causal" if causal else "none")


def _float_vector(x, name: str, length: int) -> np.ndarray:
    array = as_array(x, name)
    if array.dtype.kind not in "fiu" and array.dtype != NUMPY_DTYPE["bf16"]:
        raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one value per query head), "
                         f"got {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _open_library(path) -> object:
    """dlopen a kernel library for the life of the process. RTLD_NODELETE: cffi dlcloses its
    libraries at interpreter exit, which unmapped libgomp under OpenMP workers still spinning
    in it (a segfault at exit, about one run in 15 with two processes sharing 2 cores)."""
    return ffi.dlopen(str(path), ffi.RTLD_NOW | ffi.RTLD_NODELETE)


class Kernel:
    """A compiled attention kernel for one AttentionSpec. Call it like attngen.attention."""

    def __init__(self, spec: AttentionSpec, entry: cache.CacheEntry):
        self.spec = spec
        self.entry = entry
        self._dtype = NUMPY_DTYPE[spec.dtype]
        self._checked_layouts: dict = {}    # see __call__
        try:
            self._lib = _open_library(entry.library_path)
        except OSError:
            # Valid-looking but unloadable: replace it (once) and load the new one.
            entry = cache.lookup(spec, broken_library_sha256=entry.meta["library_sha256"])
            self.entry = entry
            self._lib = _open_library(entry.library_path)
        loaded = ffi.string(self._lib.attngen_slug()).decode()
        if loaded != spec.slug:
            raise AttngenError(f"library {entry.library_path} is {loaded!r}, expected {spec.slug!r}")

    @property
    def was_cached(self) -> bool:
        return self.entry.was_cached

    @property
    def build_seconds(self) -> float:
        return self.entry.build_seconds

    @property
    def source(self) -> str:
        return self.entry.source_path.read_text()

    def __repr__(self):
        return f"<attngen.Kernel {self.spec.slug} at {self.entry.directory}>"

    def __call__(self, q, k, v, *, scale=None, causal=False, window=None, prefix_len=None,
                 document_ids=None, bias=None, alibi=None, softcap=None, sinks=None,
                 return_lse=False, layout="bhsd", out=None, num_threads=None,
                 kv_lens=None, block_table=None, num_splits=None):
        if num_threads is None:
            num_threads = config.default_num_threads()
        # A call that repeats the shapes, strides and options of an earlier plain call
        # (numpy arrays; no bias, alibi, sinks or document ids) reuses that call's checked
        # layout: every check in _checked_call depends only on what the key holds, but for
        # the values of kv_lens and block_table, which the C entry point checks. With cold
        # caches (a model's other layers ran since) the checks cost ~100 us, more than a
        # 4k-key decode step.
        dtype = self._dtype
        if (type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray
                and q.dtype is dtype and k.dtype is dtype and v.dtype is dtype
                and (out is None or (type(out) is np.ndarray and out.dtype is dtype))
                and (kv_lens is None or (type(kv_lens) is np.ndarray and kv_lens.dtype is INT32))
                and (block_table is None
                     or (type(block_table) is np.ndarray and block_table.dtype is INT32))
                and document_ids is None and bias is None and alibi is None and sinks is None):
            key = (q.shape, q.strides, k.shape, k.strides, v.shape, v.strides,
                   None if out is None else (out.shape, out.strides),
                   None if kv_lens is None else kv_lens.shape,
                   None if block_table is None else block_table.shape,
                   *_options_key(layout, scale, causal, window, prefix_len, softcap,
                                 return_lse, num_threads, num_splits))
            try:
                checked = self._checked_layouts.get(key)
            except TypeError:   # an unhashable argument: the full checks will say what is wrong
                key = checked = None
            if checked is not None:
                try:
                    q_buf, k_buf, v_buf = ffi.from_buffer(q), ffi.from_buffer(k), ffi.from_buffer(v)
                    if out is None:
                        out = np.empty(q.shape, dtype)
                    out_buf = ffi.from_buffer(out, require_writable=True)
                    lens_ptr, table_ptr = _dense_int32_ptr(kv_lens), _dense_int32_ptr(block_table)
                except ValueError:  # not C-contiguous, or a read-only out: the checked way
                    pass
                else:
                    lse = np.empty(checked[1], np.float32) if return_lse else None
                    status = self._lib.attngen_run(checked[0], q_buf, k_buf, v_buf, out_buf,
                                                   _ptr("float *", lse), lens_ptr, table_ptr)
                    if status == 0:
                        return (out, lse) if return_lse else out
                    if status != ATTNGEN_EINVAL:
                        self._raise_for(status)
                    # A length or page out of range: _checked_call says which.
        elif type(q) is _torch_tensor and type(k) is _torch_tensor and type(v) is _torch_tensor:
            key, result = self._reused_torch_call(q, k, v, out, kv_lens, block_table, document_ids,
                                                  bias, alibi, sinks, layout, scale, causal,
                                                  window, prefix_len, softcap, return_lse,
                                                  num_threads, num_splits)
            if result is not None:
                return result
        else:
            key = None
        return self._checked_call(q, k, v, key, scale=scale, causal=causal, window=window,
                                  prefix_len=prefix_len, document_ids=document_ids, bias=bias,
                                  alibi=alibi, softcap=softcap, sinks=sinks,
                                  return_lse=return_lse, layout=layout, out=out,
                                  num_threads=num_threads, kv_lens=kv_lens,
                                  block_table=block_table, num_splits=num_splits)

    def _reused_torch_call(self, q, k, v, out, kv_lens, block_table, document_ids, bias, alibi,
                           sinks, layout, scale, causal, window, prefix_len, softcap, return_lse,
                           num_threads, num_splits):
        """The reused-layout path of __call__ for CPU tensors (torch.Tensor itself): (key,
        result), result None where the checked way must run, key where it may remember
        the layout. Going through numpy views and every check cost 25-50 us a call. Strides
        are in elements, and data_ptr() is the first element's address for any strides."""
        tdtype, strided = _torch_dtypes[self.spec.dtype], _torch_strided
        if not (q.dtype is tdtype and k.dtype is tdtype and v.dtype is tdtype
                and q.is_cpu and k.is_cpu and v.is_cpu
                and q.layout is strided and k.layout is strided and v.layout is strided
                and (out is None or (type(out) is _torch_tensor and out.dtype is tdtype
                                     and out.is_cpu and out.layout is strided))
                and document_ids is None and bias is None and alibi is None and sinks is None):
            return None, None
        lens_ptr = table_ptr = ffi.NULL
        if kv_lens is not None:
            lens_ptr = _torch_int32_ptr(kv_lens)
            if lens_ptr is None:
                return None, None
        if block_table is not None:
            table_ptr = _torch_int32_ptr(block_table)
            if table_ptr is None:
                return None, None
        key = ("torch", q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
               None if out is None else (out.shape, out.stride()),
               None if kv_lens is None else kv_lens.shape,
               None if block_table is None else block_table.shape,
               *_options_key(layout, scale, causal, window, prefix_len, softcap, return_lse,
                             num_threads, num_splits))
        try:
            checked = self._checked_layouts.get(key)
        except TypeError:   # an unhashable argument: the full checks will say what is wrong
            return None, None
        if checked is None:
            return key, None
        import torch

        if out is None:
            out = torch.empty(q.shape, dtype=tdtype)
        lse = torch.empty(checked[1], dtype=torch.float32) if return_lse else None
        status = self._lib.attngen_run(
            checked[0], ffi.cast(_CTYPES["const void *"], q.data_ptr()),
            ffi.cast(_CTYPES["const void *"], k.data_ptr()),
            ffi.cast(_CTYPES["const void *"], v.data_ptr()),
            ffi.cast(_CTYPES["void *"], out.data_ptr()),
            ffi.NULL if lse is None else ffi.cast(_CTYPES["float *"], lse.data_ptr()),
            lens_ptr, table_ptr)
        if status == 0:
            return key, ((out, lse) if return_lse else out)
        if status != ATTNGEN_EINVAL:
            self._raise_for(status)
        return key, None    # a length or page out of range: _checked_call says which

    def _checked_call(self, q, k, v, key, *, scale, causal, window, prefix_len, document_ids,
                      bias, alibi, softcap, sinks, return_lse, layout, out, num_threads,
                      kv_lens, block_table, num_splits):
        """Check every argument, run the kernel, and remember the checked layout under `key`
        (None: this call's kind is not reused)."""
        spec = self.spec
        torch_in = _is_torch(q)
        if torch_in and _torch_tensor is None:
            _note_torch()
        q_arr, k_arr, v_arr = as_array(q, "q"), as_array(k, "k"), as_array(v, "v")
        dtype = self._dtype
        for name, array in (("q", q_arr), ("k", k_arr), ("v", v_arr)):
            if array.dtype != dtype:
                raise TypeError(f"{name} must be {dtype} for this kernel (spec dtype "
                                f"{spec.dtype}), got {array.dtype}")
            if array.ndim != 4:
                raise ValueError(f"{name} must have rank 4, got shape {array.shape}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        paged = spec.kv_layout == "paged"
        if paged != (block_table is not None):
            raise ValueError(f"kernel {spec.slug} is for a {spec.kv_layout} KV cache: "
                             + ("block_table is required" if paged else
                                "block_table is only accepted by a paged kernel"))

        # Logical views: q [B, Hq, Sq, D]; k, v [B|pages, Hkv, S|page_size, D].
        qv = q_arr if layout == "bhsd" else q_arr.transpose(0, 2, 1, 3)
        if paged:
            kv, vv = k_arr, v_arr   # pages are always [num_pages, Hkv, page_size, D]
        else:
            kv, vv = (k_arr, v_arr) if layout == "bhsd" else (
                k_arr.transpose(0, 2, 1, 3), v_arr.transpose(0, 2, 1, 3))
        B, Hq, Sq, D = qv.shape
        Hkv, Skv = kv.shape[1], kv.shape[2]
        if D != spec.head_dim:
            raise ValueError(f"q head size (last dimension) must be {spec.head_dim} for kernel "
                             f"{spec.slug}, got {D}")
        if kv.shape != vv.shape:
            raise ValueError(f"k and v must have the same shape, got {k_arr.shape} and {v_arr.shape}")
        if kv.shape[3] != D:
            raise ValueError(f"k head size must equal q's ({D}), got {kv.shape[3]}")
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
        if Hq // Hkv != spec.gqa:
            raise ValueError(f"kernel {spec.slug} has GQA group {spec.gqa}, but q has {Hq} heads "
                             f"and k has {Hkv} (group {Hq // Hkv})")
        if not paged and kv.shape[0] != B:
            raise ValueError(f"k batch size must equal q's ({B}), got {kv.shape[0]}")

        params = ffi.new("attngen_params *")
        keep = []   # arrays whose memory the kernel reads: alive until it returns

        # KV lengths and paging.
        lens = None
        if paged:
            if kv_lens is None:
                raise ValueError("kv_lens is required with a paged KV cache (block_table)")
            num_pages, page_size = kv.shape[0], Skv
            table = as_array(block_table, "block_table")
            if table.ndim != 2 or table.shape[0] != B:
                raise ValueError(f"block_table must have shape [B={B}, max_pages], got {table.shape}")
            table = _int_array(table, "block_table", table.shape)
            capacity = table.shape[1] * page_size
        else:
            capacity = Skv
        if kv_lens is not None:
            lens = _int_array(kv_lens, "kv_lens", (B,))
            if B and lens.min() < 0:
                raise ValueError(f"kv_lens must be >= 0, got min {int(lens.min())}")
            if B and spec.documents and lens.min() < Sq:
                raise ValueError(f"with document_ids, kv_lens must be >= Sq={Sq} (every query "
                                 f"position needs an id), got min {int(lens.min())}")
            if B and lens.max() > capacity:
                raise ValueError(f"kv_lens must be <= the cache capacity {capacity}, "
                                 f"got max {int(lens.max())}")
            keep.append(lens)
        if paged:
            pages_needed = (lens.astype(np.int64) + page_size - 1) // page_size
            for b in range(B):
                used = table[b, :pages_needed[b]]
                if used.size and (used.min() < 0 or used.max() >= num_pages):
                    bad = used[(used < 0) | (used >= num_pages)][0]
                    raise ValueError(f"block_table[{b}] refers to page {int(bad)}, outside "
                                     f"0..{num_pages - 1} (num_pages={num_pages})")
            keep.append(table)
            params.block_table_stride = table.shape[1]
            params.page_size = page_size
            params.num_pages = num_pages

        longest = int(lens.max()) if lens is not None and B else Skv

        # Mask arguments must match what the kernel was built for.
        self._check_mask_args(causal, window, prefix_len, document_ids)
        if spec.mask == "window":
            params.window = whole_number(window, "window", 1)
        if spec.mask == "prefix":
            params.prefix_len = whole_number(prefix_len, "prefix_len", 0)
        if spec.documents:
            if kv_lens is None and Sq != Skv:
                raise ValueError(f"document_ids needs Sq == Skv, got Sq={Sq}, Skv={Skv}")
            docs = as_array(document_ids, "document_ids")
            if docs.ndim != 2 or docs.shape[0] != B or docs.shape[1] < longest:
                raise ValueError(f"document_ids must have shape [B={B}, S >= {longest}] (an id "
                                 f"for every key position), got {docs.shape}")
            docs = _int_array(docs, "document_ids", docs.shape)
            keep.append(docs)
            params.doc_ids = _ptr("const int32_t *", docs)
            params.doc_stride = docs.shape[1]

        # Score modifications.
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        if not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        params.scale = float(scale)
        if spec.softcap != (softcap is not None):
            raise ValueError(f"kernel {spec.slug} was built with softcap={spec.softcap}, "
                             f"got softcap={softcap!r}")
        if spec.softcap:
            if not isinstance(softcap, (int, float, np.floating)) or not softcap > 0 or not math.isfinite(softcap):
                raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
            params.softcap = float(softcap)
        wants_tensor = spec.bias in ("tensor", "tensor+alibi")
        wants_alibi = spec.bias in ("alibi", "tensor+alibi")
        if wants_tensor != (bias is not None):
            raise ValueError(f"kernel {spec.slug} was built with bias={spec.bias!r}: "
                             + ("bias is required" if wants_tensor else "bias is not accepted"))
        has_alibi = alibi is not None and alibi is not False
        if wants_alibi != has_alibi:
            raise ValueError(f"kernel {spec.slug} was built with bias={spec.bias!r}: "
                             + ("alibi is required" if wants_alibi else "alibi is not accepted"))
        if wants_tensor:
            bias_arr = as_array(bias, "bias")
            if bias_arr.dtype.kind != "f" and bias_arr.dtype != NUMPY_DTYPE["bf16"]:
                raise TypeError(f"bias must be a float array, got dtype {bias_arr.dtype}")
            if bias_arr.dtype != np.float32:
                bias_arr = bias_arr.astype(np.float32)
            # The key axis is 1 (broadcast) or covers every key position.
            key_axis = bias_arr.shape[-1] if bias_arr.ndim else 1
            if key_axis != 1 and key_axis < longest:
                raise ValueError(f"bias must cover every key position: its last axis must be 1 "
                                 f"or >= {longest}, got shape {bias_arr.shape}")
            target = (B, Hq, Sq, key_axis)
            try:
                bias_view = np.broadcast_to(bias_arr, target)
            except ValueError:
                raise ValueError(f"bias of shape {bias_arr.shape} does not broadcast to "
                                 f"[B, Hq, Sq, Skv] = {target}") from None
            keep.append(bias_arr)
            params.bias = _ptr("const float *", bias_view)
            params.bias_stride = [s // 4 for s in bias_view.strides]
        if wants_alibi:
            if alibi is True:
                from .reference import alibi_slopes
                slopes = alibi_slopes(Hq).astype(np.float32)
            else:
                slopes = _float_vector(alibi, "alibi", Hq)
            keep.append(slopes)
            params.alibi_slopes = _ptr("const float *", slopes)
        if spec.sinks != (sinks is not None):
            raise ValueError(f"kernel {spec.slug} was built with sinks={spec.sinks}: "
                             + ("sinks is required" if spec.sinks else "sinks is not accepted"))
        if spec.sinks:
            sink_arr = _float_vector(sinks, "sinks", Hq)
            keep.append(sink_arr)
            params.sinks = _ptr("const float *", sink_arr)

        # Output (and lse).
        out_shape = q_arr.shape
        if out is None:
            out_arr = np.empty(out_shape, dtype=dtype)
            out_user = None
        else:
            out_user = out
            out_arr = as_array(out, "out")
            if out_arr.shape != out_shape or out_arr.dtype != dtype:
                raise ValueError(f"out must be {dtype} of shape {out_shape}, got "
                                 f"{out_arr.dtype} of shape {out_arr.shape}")
            if not out_arr.flags.writeable:
                raise ValueError("out must be writeable")
        outv = out_arr if layout == "bhsd" else out_arr.transpose(0, 2, 1, 3)
        lse = np.empty((B, Hq, Sq), dtype=np.float32) if return_lse else None

        num_threads = whole_number(num_threads, "num_threads", 1)

        params.batch, params.heads_q, params.heads_kv = B, Hq, Hkv
        params.seq_q, params.seq_kv = Sq, Skv
        params.q_stride = _element_strides(qv, "q")[:3]
        params.k_stride = _element_strides(kv, "k")[:3]
        params.v_stride = _element_strides(vv, "v")[:3]
        params.out_stride = _element_strides(outv, "out")[:3]
        params.num_threads = num_threads
        if num_splits is not None:
            if spec.phase != "decode":
                raise ValueError(f"num_splits is a decode option; kernel {spec.slug} is {spec.phase}")
            params.num_splits = whole_number(num_splits, "num_splits", 1)

        if B and Hq and Sq:
            status = self._lib.attngen_run(
                params, _ptr("const void *", qv), _ptr("const void *", kv),
                _ptr("const void *", vv), _ptr("void *", outv), _ptr("float *", lse),
                _ptr("const int32_t *", lens), _ptr("const int32_t *", table if paged else None))
            if status:
                self._raise_for(status)
            if key is not None:
                if len(self._checked_layouts) >= CHECKED_LAYOUTS_KEPT:
                    self._checked_layouts.clear()
                self._checked_layouts[key] = (params, lse.shape if return_lse else None)
        del keep

        result = out_arr if out_user is None else out_user
        if torch_in and out_user is None:
            import torch
            result = (torch.from_numpy(out_arr.view(np.int16)).view(torch.bfloat16)
                      if out_arr.dtype == NUMPY_DTYPE["bf16"] else torch.from_numpy(out_arr))
            lse = torch.from_numpy(lse) if lse is not None else None
        return (result, lse) if return_lse else result

    def _raise_for(self, status: int) -> None:
        """Raise for attngen_run's non-zero `status`."""
        if status == ATTNGEN_ENOMEM:
            raise MemoryError(f"kernel {self.spec.slug} could not allocate its scratch memory")
        if status == ATTNGEN_ENOAMX:
            raise AttngenError(f"kernel {self.spec.slug} multiplies on AMX tiles, but Linux did "
                               "not grant this process AMX tile data; set ATTNGEN_ISA=avx512bf16")
        # The checks before the call rule out anything else.
        raise AttngenError(f"kernel {self.spec.slug} refused its arguments (status {status})")

    def _check_mask_args(self, causal, window, prefix_len, document_ids):
        spec = self.spec
        given = mask_mode(causal, window, prefix_len)
        if given != spec.mask:
            raise ValueError(f"kernel {spec.slug} was built for mask={spec.mask!r}, but the "
                             f"arguments ask for mask={given!r}")
        if spec.documents != (document_ids is not None):
            raise ValueError(f"kernel {spec.slug} was built with documents={spec.documents}: "
                             + ("document_ids is required" if spec.documents
                                else "document_ids is not accepted"))


_memo: dict = {}
_memo_locks: dict = {}
_memo_guard = threading.Lock()
# The lookup a model makes at every layer of every step: (spec, build environment) ->
# (kernel, its ISA's tuning table, that table's stamp, when the stamp was read). A hit costs
# a few environment reads, where _memo_key resolves the toolchain and the blocking (~12 us).
_recent: dict = {}
# How often a hit re-reads its tuning table's stamp, to see a table another process stored
# (`attngen tune` here forgets the spec at once). The stat costs ~25-50 us with cold caches.
TABLE_RECHECK_SECONDS = 1.0


def _memo_key(spec: AttentionSpec, toolchain: Toolchain):
    return (spec, toolchain, tuning.tile_for(spec, toolchain.isa), tuple(config.extra_cflags()),
            str(config.cache_dir()))


def forget(spec: AttentionSpec) -> None:
    """Drop `spec`'s kernels from this process's memo (after tuning changed its blocking)."""
    for memo in (_memo, _recent):
        for key in [k for k in memo if k[0] == spec]:
            memo.pop(key, None)


def loaded_kernel(spec: AttentionSpec):
    """The kernel for `spec` if this process has already loaded it, else None."""
    return _memo.get(_memo_key(spec, detect()))


def get_kernel(spec: AttentionSpec) -> Kernel:
    """The kernel for `spec`: from this process's memo, else the disk cache, else built.
    The same spec (under the same toolchain and cache directory) gives the same object,
    until a tuning table stored meanwhile (by any process) gives it another blocking."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    recent_key = (spec, config.build_environment())
    recent = _recent.get(recent_key)
    if recent is not None:
        kernel, table, table_stamp, checked_at = recent
        now = monotonic()
        if now - checked_at < TABLE_RECHECK_SECONDS:
            return kernel
        if tuning.stamp(table) == table_stamp:
            _recent[recent_key] = (kernel, table, table_stamp, now)
            return kernel
    toolchain = detect()
    table = tuning.table_path(toolchain.isa)
    checked_at = monotonic()
    table_stamp = tuning.stamp(table)   # before the table is read: a later change is seen
    memo_key = _memo_key(spec, toolchain)
    kernel = _memo.get(memo_key)
    if kernel is None:
        with _memo_guard:   # one lock per spec, so different specs build in parallel
            lock = _memo_locks.setdefault(memo_key, threading.Lock())
        with lock:
            kernel = _memo.get(memo_key)
            if kernel is None:
                kernel = Kernel(spec, cache.lookup(spec))
                _memo[memo_key] = kernel
    _recent[recent_key] = (kernel, table, table_stamp, checked_at)
    return kernel
