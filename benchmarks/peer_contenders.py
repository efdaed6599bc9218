"""The contenders of bench_peers.py: attngen and its peers, each built for one case.

A case (`AttnCase`) is one attention call shape and mask. Every builder here takes the
case, the shared inputs (`CaseInputs`) and a storage dtype ("fp32" or "bf16") and returns
a `Prepared` contender: a zero-argument call that runs the attention once in the
contender's own native layout (inputs converted before, never inside the call), and a
function turning what the call returned into a float64 [B, Hq, Sq, D] array for the
accuracy check. A builder raises `NotApplicable` with a short reason when the contender
cannot express the case (SDPA has no softcap, ORT's CPU kernel has no bf16, ...).

Contenders:
* attngen  attngen.attention(q, k, v, causal=True, window=, softcap=, document_ids=)
* numpy    materialised float32 softmax per (batch, head), fp32 only
* sdpa     torch.nn.functional.scaled_dot_product_attention (is_causal, or a boolean
           attn_mask for windows and documents; enable_gqa=True); no softcap
* flex     torch.nn.attention.flex_attention under torch.compile (score_mod for the
           softcap, a BlockMask from create_block_mask for the masks); its first call
           compiles and is timed separately
* ort      ONNX Runtime's com.microsoft.GroupQueryAttention on the CPU provider, in a
           one-node model built with onnx.helper; run through an IOBinding with the
           outputs preallocated (decode: past_key/past_value share one buffer with
           present_key/present_value, as a KV cache is used in generation)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np

import attngen

PEERS = ("numpy", "sdpa", "flex", "ort")
CONTENDERS = ("attngen",) + PEERS
LABELS = {"attngen": "attngen", "numpy": "numpy", "sdpa": "torch SDPA",
          "flex": "flex_attention", "ort": "ORT GQA"}


class NotApplicable(Exception):
    """The contender cannot run this case; str(exc) says why (shown as n/a)."""


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class AttnCase:
    name: str
    phase: str                 # "prefill" or "decode"
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    seq_q: int
    seq_kv: int
    window: int | None = None
    softcap: float | None = None
    documents: int | None = None     # equal-length packed documents (prefill only)
    q_scale: float = 1.0             # q's standard deviation (softcap: make the cap bend)
    slow: bool = False               # skipped by --quick
    numpy: bool = True               # run the (slow) numpy baseline
    check_kv_heads: int | None = None  # check only the first kv heads' group (None: all)
    default: bool = True             # part of the default set

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def shape_text(self) -> str:
        text = (f"B{self.batch} Hq{self.heads_q} Hkv{self.heads_kv} D{self.head_dim} "
                + (f"S{self.seq_q}" if self.phase == "prefill" else f"Skv{self.seq_kv}"))
        if self.window:
            text += f" w{self.window}"
        if self.softcap:
            text += f" cap{self.softcap:g}"
        if self.documents:
            text += f" {self.documents} docs"
        return text

    def doc_ids(self) -> np.ndarray | None:
        """int32 [B, S]: `documents` equal runs of ids 0, 1, ... (None without documents)."""
        if not self.documents:
            return None
        length = self.seq_q // self.documents
        ids = np.minimum(np.arange(self.seq_q) // length, self.documents - 1).astype(np.int32)
        return np.tile(ids, (self.batch, 1))

    def visible(self, b: int = 0) -> np.ndarray:
        """bool [Sq, Skv]: which keys each query sees (bottom-right aligned causal)."""
        pos = np.arange(self.seq_q)[:, None] + (self.seq_kv - self.seq_q)
        key = np.arange(self.seq_kv)[None, :]
        seen = key <= pos
        if self.window:
            seen &= key > pos - self.window
        ids = self.doc_ids()
        if ids is not None:
            seen &= ids[b][:, None] == ids[b][None, :]
        return seen

    def visible_pairs(self) -> int:
        """(query, key) pairs attended to, all batches: what the FLOP count is based on."""
        return sum(int(self.visible(b).sum()) for b in range(self.batch))

    def flops(self) -> float:
        """Useful FLOPs: QK^T and PV, 2 flops per multiply-add, per visible pair."""
        return 4.0 * self.heads_q * self.head_dim * self.visible_pairs()

    def kv_bytes(self, dtype: str) -> int:
        itemsize = 4 if dtype == "fp32" else 2
        return 2 * self.batch * self.heads_kv * self.seq_kv * self.head_dim * itemsize

    def attngen_kwargs(self) -> dict:
        kwargs: dict = {"causal": True}
        if self.window:
            kwargs["window"] = self.window
        if self.softcap:
            kwargs["softcap"] = self.softcap
        if self.documents:
            kwargs["document_ids"] = self.doc_ids()
        return kwargs


@dataclass
class CaseInputs:
    """Seeded inputs, drawn once per case and rounded to bf16 values (kept in float32),
    so the fp32 and bf16 runs compute on exactly the same numbers and share one
    float64 reference."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    _cache: dict = field(default_factory=dict)

    @classmethod
    def make(cls, case: AttnCase, seed: int) -> "CaseInputs":
        rng = np.random.default_rng(seed)

        def draw(heads, seq, std=1.0):
            x = rng.standard_normal((case.batch, heads, seq, case.head_dim), dtype=np.float32)
            if std != 1.0:
                x *= np.float32(std)
            return x.astype(ml_dtypes.bfloat16).astype(np.float32)
        q = draw(case.heads_q, case.seq_q, case.q_scale)
        k = draw(case.heads_kv, case.seq_kv)
        v = draw(case.heads_kv, case.seq_kv)
        return cls(q, k, v)

    def arrays(self, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q, k, v as numpy arrays of the storage dtype (bf16: ml_dtypes, exact)."""
        if dtype == "fp32":
            return self.q, self.k, self.v
        if dtype not in self._cache:
            self._cache[dtype] = tuple(x.astype(ml_dtypes.bfloat16)
                                       for x in (self.q, self.k, self.v))
        return self._cache[dtype]

    def drop(self, dtype: str) -> None:
        self._cache.pop(dtype, None)


@dataclass
class Prepared:
    call: Callable[[], object]
    to_numpy: Callable[[object], np.ndarray]
    setup: dict = field(default_factory=dict)   # e.g. {"compile": 7.2, "block mask": 0.1}


def _to_numpy_bhsd(out) -> np.ndarray:
    if hasattr(out, "detach"):          # a torch tensor (maybe bf16)
        out = out.detach().float().numpy()
    return np.asarray(out).astype(np.float64)


# --------------------------------------------------------------------------- attngen

def build_attngen(case: AttnCase, inputs: CaseInputs, dtype: str, threads: int,
                  **_) -> Prepared:
    q, k, v = inputs.arrays(dtype)
    kwargs = case.attngen_kwargs()
    start = time.perf_counter()
    kernel = attngen.get_kernel(attngen.spec_for_call(q, k, v, **kwargs))
    setup = kernel_info(kernel, time.perf_counter() - start)

    def call():
        return attngen.attention(q, k, v, num_threads=threads, **kwargs)
    return Prepared(call, _to_numpy_bhsd, setup)


def prebuild_attngen(case: AttnCase, dtype: str) -> dict:
    """Build (or load) the kernel `case` needs in `dtype` now, so that a later call finds
    it in attngen's in-process memo. Only shapes and dtypes matter here: the arrays are
    zero-stride views, nothing is allocated."""
    np_dtype = np.float32 if dtype == "fp32" else ml_dtypes.bfloat16

    def shaped(heads, seq):
        return np.broadcast_to(np.zeros((), dtype=np_dtype),
                               (case.batch, heads, seq, case.head_dim))
    q, k = shaped(case.heads_q, case.seq_q), shaped(case.heads_kv, case.seq_kv)
    start = time.perf_counter()
    kernel = attngen.get_kernel(attngen.spec_for_call(q, k, k, **case.attngen_kwargs()))
    return kernel_info(kernel, time.perf_counter() - start)


def kernel_info(kernel, seconds: float) -> dict:
    entry = getattr(kernel, "entry", None)
    return {"kernel": getattr(getattr(entry, "directory", None), "name", "?"),
            "seconds": seconds, "cached": bool(getattr(kernel, "was_cached", False))}


# --------------------------------------------------------------------------- numpy

def _softmax_rows_inplace(s: np.ndarray, axis: int) -> None:
    s -= s.max(axis=axis, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=axis, keepdims=True)


def numpy_prefill(q, k, v, case: AttnCase, masks: list) -> np.ndarray:
    """Textbook float32 attention: the whole [Sq, Skv] score matrix per (batch, head),
    softcap, an additive 0/-inf mask, stable softmax, then @ v. Query head h reads
    kv head h // group by indexing, without copies."""
    scale = np.float32(case.scale)
    cap = np.float32(case.softcap) if case.softcap else None
    scores = np.empty((case.seq_q, case.seq_kv), dtype=np.float32)
    out = np.empty_like(q)
    for b in range(case.batch):
        mask = masks[b if len(masks) > 1 else 0]
        for h in range(case.heads_q):
            kv = h // case.group
            np.matmul(q[b, h], k[b, kv].T, out=scores)
            scores *= scale
            if cap is not None:
                scores /= cap
                np.tanh(scores, out=scores)
                scores *= cap
            scores += mask
            _softmax_rows_inplace(scores, axis=1)
            np.matmul(scores, v[b, kv], out=out[b, h])
    return out


def numpy_decode(q, k, v, case: AttnCase) -> np.ndarray:
    """One query per sequence: per kv head, the scores of its whole query-head group at
    once (k @ q_group.T: [Skv, G]), softmax down the keys, v.T @ p. Sees every key."""
    scale = np.float32(case.scale)
    g = case.group
    out = np.empty_like(q)
    for b in range(case.batch):
        for kv in range(case.heads_kv):
            qg = q[b, kv * g:(kv + 1) * g, 0]                # [G, D]
            s = k[b, kv] @ qg.T                              # [Skv, G]
            s *= scale
            if case.softcap:
                s /= np.float32(case.softcap)
                np.tanh(s, out=s)
                s *= np.float32(case.softcap)
            _softmax_rows_inplace(s, axis=0)
            out[b, kv * g:(kv + 1) * g, 0] = (v[b, kv].T @ s).T
    return out


def build_numpy(case: AttnCase, inputs: CaseInputs, dtype: str, threads: int,
                **_) -> Prepared:
    if dtype != "fp32":
        raise NotApplicable("numpy baseline is float32 only")
    if not case.numpy:
        raise NotApplicable("skipped: too slow at this size")
    q, k, v = inputs.arrays(dtype)
    if case.phase == "decode":
        if case.window or case.documents:
            raise NotApplicable("numpy decode baseline has no masks")
        return Prepared(lambda: numpy_decode(q, k, v, case), _to_numpy_bhsd)
    batches = case.batch if case.documents else 1
    masks = [np.where(case.visible(b), np.float32(0), np.float32(-np.inf)).astype(np.float32)
             for b in range(batches)]
    return Prepared(lambda: numpy_prefill(q, k, v, case, masks), _to_numpy_bhsd)


# --------------------------------------------------------------------------- torch

def _torch_inputs(torch, inputs: CaseInputs, dtype: str):
    tensors = tuple(torch.from_numpy(x) for x in (inputs.q, inputs.k, inputs.v))
    if dtype == "bf16":
        tensors = tuple(t.to(torch.bfloat16) for t in tensors)   # exact: bf16 values
    return tensors


def build_sdpa(case: AttnCase, inputs: CaseInputs, dtype: str, threads: int, torch=None,
               **_) -> Prepared:
    if torch is None:
        raise NotApplicable("torch is not importable")
    if case.softcap:
        raise NotApplicable("SDPA has no softcap")
    tq, tk, tv = _torch_inputs(torch, inputs, dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kwargs: dict = {"enable_gqa": True, "scale": case.scale}
    if case.phase == "decode" and not (case.window or case.documents):
        pass        # one query at the end sees every key: no mask (is_causal is top-left)
    elif not (case.window or case.documents) and case.seq_q == case.seq_kv:
        kwargs["is_causal"] = True
    else:
        visible = np.stack([case.visible(b) for b in range(case.batch if case.documents
                                                            else 1)])
        kwargs["attn_mask"] = torch.from_numpy(visible)[:, None]     # [B or 1, 1, Sq, Skv]

    def call():
        with torch.inference_mode():
            return sdpa(tq, tk, tv, **kwargs)
    return Prepared(call, _to_numpy_bhsd)


class FlexUnavailable(Exception):
    """flex_attention failed in a way that will not get better for the next case."""


def build_flex(case: AttnCase, inputs: CaseInputs, dtype: str, threads: int, torch=None,
               **_) -> Prepared:
    if torch is None:
        raise NotApplicable("torch is not importable")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:
        raise FlexUnavailable(f"cannot import flex_attention ({type(exc).__name__}: "
                              f"{exc})") from exc
    tq, tk, tv = _torch_inputs(torch, inputs, dtype)

    score_mod = None
    if case.softcap:
        cap = float(case.softcap)

        def softcap_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        score_mod = softcap_mod

    offset = case.seq_kv - case.seq_q        # bottom-right alignment
    mask_parts = []
    if case.phase == "prefill" or case.window or case.documents:
        mask_parts.append(lambda b, q_idx, kv_idx: q_idx + offset >= kv_idx)
    if case.window:
        w = case.window
        mask_parts.append(lambda b, q_idx, kv_idx: q_idx + offset - kv_idx < w)
    if case.documents:
        doc = torch.from_numpy(case.doc_ids())
        mask_parts.append(lambda b, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx])

    setup: dict = {}
    block_mask = None
    if mask_parts:
        def mask_mod(b, h, q_idx, kv_idx):
            keep = mask_parts[0](b, q_idx, kv_idx)
            for part in mask_parts[1:]:
                keep = keep & part(b, q_idx, kv_idx)
            return keep
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, case.batch if case.documents else None, None,
                                       case.seq_q, case.seq_kv, device="cpu")
        setup["block mask"] = time.perf_counter() - start

    torch._dynamo.reset()        # each case compiles afresh (and no recompile limit is hit)
    compiled = torch.compile(flex_attention, dynamic=False)

    def call():
        with torch.inference_mode():
            return compiled(tq, tk, tv, score_mod=score_mod, block_mask=block_mask,
                            scale=case.scale, enable_gqa=True)
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise NotApplicable(f"torch.compile failed: {type(exc).__name__}: "
                            f"{first[:160]}") from exc
    setup["compile"] = time.perf_counter() - start
    return Prepared(call, _to_numpy_bhsd, setup)


# --------------------------------------------------------------------------- ONNX Runtime

# ORT's CPU GroupQueryAttention allocates B*Hq*Sq*Skv float32 scores per call; above
# this we do not run it (the machine is shared and has ~23 GB).
ORT_MAX_SCORES = 4 << 30


def _ort_modules():
    try:
        import onnx
        import onnxruntime
    except Exception as exc:
        raise NotApplicable(f"onnx / onnxruntime not importable ({type(exc).__name__})") \
            from exc
    return onnx, onnxruntime


def ort_gqa_session(case: AttnCase, dtype: str, threads: int, with_bias: bool):
    """An InferenceSession of one com.microsoft.GroupQueryAttention node for `case`."""
    onnx, ort = _ort_modules()
    from onnx import TensorProto, helper
    elem = {"fp32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16}[dtype]
    hq, hkv, d = case.heads_q, case.heads_kv, case.head_dim
    decode = case.phase == "decode"
    info = helper.make_tensor_value_info
    graph_inputs = [info("query", elem, ["B", "S", hq * d]),
                    info("key", elem, ["B", "S", hkv * d]),
                    info("value", elem, ["B", "S", hkv * d])]
    names = ["query", "key", "value"]
    if decode:
        graph_inputs += [info("past_key", elem, ["B", hkv, "P", d]),
                         info("past_value", elem, ["B", hkv, "P", d])]
        names += ["past_key", "past_value"]
    else:
        names += ["", ""]
    graph_inputs += [info("seqlens_k", TensorProto.INT32, ["B"]),
                     info("total_sequence_length", TensorProto.INT32, [])]
    names += ["seqlens_k", "total_sequence_length"]
    if with_bias:
        graph_inputs.append(info("attention_bias", elem, ["BB", 1, "S", "T"]))
        names += ["", "", "", "attention_bias"]       # cos_cache, sin_cache, position_ids
    attrs = {"num_heads": hq, "kv_num_heads": hkv, "scale": case.scale}
    if case.window:
        attrs["local_window_size"] = case.window
    if case.softcap:
        attrs["softcap"] = float(case.softcap)
    node = helper.make_node("GroupQueryAttention", names,
                            ["output", "present_key", "present_value"],
                            domain="com.microsoft", **attrs)
    outputs = [info(n, elem, None) for n in ("output", "present_key", "present_value")]
    model = helper.make_model(helper.make_graph([node], "gqa", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _bsh(x: np.ndarray) -> np.ndarray:
    """[B, H, S, D] -> [B, S, H*D] (ORT's query/key/value layout), contiguous."""
    b, h, s, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, s, h * d))


def build_ort(case: AttnCase, inputs: CaseInputs, dtype: str, threads: int, **_) -> Prepared:
    onnx, ort = _ort_modules()
    if case.phase == "decode" and (case.window or case.documents):
        raise NotApplicable("not wired up for masked decode")
    scores = 4 * case.batch * case.heads_q * case.seq_q * case.seq_kv
    if scores > ORT_MAX_SCORES:
        raise NotApplicable(f"skipped: its CPU kernel materialises the fp32 scores of "
                            f"every head at once ({scores / 2**30:.0f} GiB here)")
    np_dtype = np.float32 if dtype == "fp32" else ml_dtypes.bfloat16
    with_bias = bool(case.documents)
    try:
        session = ort_gqa_session(case, dtype, threads, with_bias)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if "NOT_IMPLEMENTED" in first or "Could not find an implementation" in first:
            raise NotApplicable(f"no CPU kernel for {dtype} (NOT_IMPLEMENTED)") from exc
        raise NotApplicable(f"session failed: {first[:160]}") from exc
    q, k, v = inputs.arrays(dtype)
    B, hq, d = case.batch, case.heads_q, case.head_dim
    total = case.seq_kv
    feeds = {"seqlens_k": np.full(B, total - 1, dtype=np.int32),
             "total_sequence_length": np.array(total, dtype=np.int32)}
    binding = session.io_binding()
    if case.phase == "decode":
        # The KV cache: a [B, Hkv, capacity, D] buffer bound as both past and present
        # (ORT writes the new token's k, v into it at position seqlens_k); the new token's
        # key/value are the last rows of k, v, already in the buffer.
        cache_k, cache_v = np.array(k, copy=True), np.array(v, copy=True)
        feeds.update(query=_bsh(q), key=_bsh(k[:, :, -case.seq_q:]),
                     value=_bsh(v[:, :, -case.seq_q:]), past_key=cache_k, past_value=cache_v)
        present = (cache_k, cache_v)
    else:
        feeds.update(query=_bsh(q), key=_bsh(k), value=_bsh(v))
        if with_bias:
            visible = np.stack([case.visible(b) for b in range(B)])
            feeds["attention_bias"] = np.where(visible, 0.0, -np.inf).astype(np_dtype)[:, None]
        present = (np.empty_like(k), np.empty_like(v))
    out = np.empty((B, case.seq_q, hq * d), dtype=np_dtype)
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, array in (("output", out), ("present_key", present[0]),
                        ("present_value", present[1])):
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape),
                            array.ctypes.data)
    keep_alive = (feeds, present)

    def call(_keep=keep_alive):      # the bound buffers live as long as the call
        session.run_with_iobinding(binding)
        return out

    def to_numpy(result) -> np.ndarray:
        return np.asarray(result).astype(np.float64).reshape(
            B, case.seq_q, hq, d).transpose(0, 2, 1, 3)
    try:
        call()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if "NOT_IMPLEMENTED" in first:
            raise NotApplicable(f"no CPU kernel for {dtype}") from exc
        raise NotApplicable(f"run failed: {first[:160]}") from exc
    return Prepared(call, to_numpy)


BUILDERS = {"attngen": build_attngen, "numpy": build_numpy, "sdpa": build_sdpa,
            "flex": build_flex, "ort": build_ort}
