"""AttentionSpec: everything that changes the generated C, and nothing else.

Batch, head count, lengths, window size, prefix length, softcap value, scale,
strides and thread count are call arguments, so one compiled kernel serves them all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .errors import SpecError

MASKS = ("none", "causal", "window", "prefix")
BIASES = ("none", "tensor", "alibi", "tensor+alibi")
DTYPES = ("f32", "bf16", "f16")
PHASES = ("prefill", "decode")
KV_LAYOUTS = ("contiguous", "paged")

_DTYPE_ALIASES = {"f32": "f32", "float32": "f32", "fp32": "f32",
                  "bf16": "bf16", "bfloat16": "bf16",
                  "f16": "f16", "float16": "f16", "fp16": "f16", "half": "f16"}
_BIAS_SLUG = {"none": "nobias", "tensor": "bias", "alibi": "alibi", "tensor+alibi": "bias_alibi"}
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_GQA = 256


@dataclass(frozen=True)
class AttentionSpec:
    """One attention variant; one spec is one generated kernel.

    mask: "none"; "causal"; "window" (sliding window, implies causal); "prefix"
    (prefix-LM: a bidirectional prefix, causal after it). documents: queries
    only see keys with the same document id (combines with any mask).
    bias: "none", "tensor" (additive array), "alibi", or "tensor+alibi".
    """

    head_dim: int
    gqa: int = 1
    mask: str = "none"
    documents: bool = False
    bias: str = "none"
    softcap: bool = False
    sinks: bool = False
    dtype: str = "f32"
    phase: str = "prefill"
    kv_layout: str = "contiguous"

    def __post_init__(self):
        dtype = _DTYPE_ALIASES.get(str(self.dtype).lower())
        if dtype is None or dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        for name in ("head_dim", "gqa"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{name} must be an int, got {value!r}")
        if not (MIN_HEAD_DIM <= self.head_dim <= MAX_HEAD_DIM and self.head_dim % 8 == 0):
            raise SpecError(
                f"head_dim must be a multiple of 8 from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, "
                f"got {self.head_dim}")
        if not 1 <= self.gqa <= MAX_GQA:
            raise SpecError(f"gqa (query heads per kv head) must be 1..{MAX_GQA}, got {self.gqa}")
        for name, allowed in (("mask", MASKS), ("bias", BIASES), ("phase", PHASES),
                              ("kv_layout", KV_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise SpecError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("documents", "softcap", "sinks"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.phase == "decode" and self.documents:
            raise SpecError("documents masking needs Sq == Skv, so it has no decode variant; "
                            "use phase='prefill'")

    @property
    def causal(self) -> bool:
        return self.mask in ("causal", "window", "prefix")

    @property
    def has_mask(self) -> bool:
        return self.mask != "none" or self.documents

    @property
    def slug(self) -> str:
        """Readable unique name, e.g. prefill_d128_g4_causal_nobias_f32."""
        mask = [self.mask] if self.mask != "none" else []
        if self.documents:
            mask.append("doc")
        parts = [self.phase, f"d{self.head_dim}", f"g{self.gqa}",
                 "_".join(mask) or "nomask", _BIAS_SLUG[self.bias]]
        if self.softcap:
            parts.append("cap")
        if self.sinks:
            parts.append("sink")
        if self.kv_layout == "paged":
            parts.append("paged")
        parts.append(self.dtype)
        return "_".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """sha256 of the canonical field values (part of the cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_slug(cls, slug: str) -> "AttentionSpec":
        """Inverse of `slug`: AttentionSpec.from_slug(s).slug == s."""
        tokens = slug.strip().split("_")
        try:
            phase, d, g = tokens[0], tokens[1], tokens[2]
            if phase not in PHASES or d[0] != "d" or g[0] != "g":
                raise ValueError
            fields = dict(phase=phase, head_dim=int(d[1:]), gqa=int(g[1:]))
            rest = tokens[3:]
            fields["dtype"] = rest.pop()
            mask_tokens = []
            while rest and rest[0] in MASKS + ("doc", "nomask"):
                mask_tokens.append(rest.pop(0))
            fields["documents"] = "doc" in mask_tokens
            masks = [t for t in mask_tokens if t in MASKS]
            fields["mask"] = masks[0] if masks else "none"
            bias_tokens = []
            while rest and rest[0] in ("nobias", "bias", "alibi"):
                bias_tokens.append(rest.pop(0))
            by_slug = {v: k for k, v in _BIAS_SLUG.items()}
            fields["bias"] = by_slug["_".join(bias_tokens)]
            fields["softcap"] = "cap" in rest
            fields["sinks"] = "sink" in rest
            fields["kv_layout"] = "paged" if "paged" in rest else "contiguous"
            if set(rest) - {"cap", "sink", "paged"}:
                raise ValueError
        except (ValueError, IndexError, KeyError):
            raise SpecError(f"not a spec slug: {slug!r} "
                            "(expected e.g. prefill_d128_g4_causal_nobias_f32)") from None
        spec = cls(**fields)
        if spec.slug != slug.strip():
            raise SpecError(f"not a canonical spec slug: {slug!r} (did you mean {spec.slug!r}?)")
        return spec
