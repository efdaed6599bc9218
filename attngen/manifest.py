"""The one list of variants that `attngen build --suite` builds and the regression suite
tests. Invalid combinations never appear: every entry is a constructed AttentionSpec."""
from __future__ import annotations

from .models import embedded_models, load_config, model_kernels
from .spec import AttentionSpec, MAX_HEAD_DIM, MIN_HEAD_DIM

# Specs rendered into generated/ (checked in, so template changes show up as C diffs).
CANONICAL = (
    AttentionSpec(head_dim=128, gqa=4, mask="causal"),
    AttentionSpec(head_dim=64, gqa=8, mask="window", sinks=True),
    AttentionSpec(head_dim=256, gqa=2, mask="window", softcap=True),
    AttentionSpec(head_dim=64, gqa=1, mask="prefix", documents=True, bias="tensor+alibi"),
    AttentionSpec(head_dim=128, gqa=4, mask="causal", kv_layout="paged"),
    AttentionSpec(head_dim=128, gqa=4, mask="causal", phase="decode"),
    AttentionSpec(head_dim=64, gqa=8, mask="window", sinks=True, phase="decode", kv_layout="paged"),
    AttentionSpec(head_dim=128, gqa=4, mask="causal", dtype="bf16"),
    AttentionSpec(head_dim=128, gqa=4, mask="causal", phase="decode", dtype="f16"),
)
GENERATED_ISA = "avx512bf16"   # generated/ is rendered for one fixed ISA, machine-independent
# ... and these also for AMX (bf16 prefill multiplies on tiles there), as <slug>.amx.c.
GENERATED_AMX = (AttentionSpec(head_dim=128, gqa=4, mask="causal", dtype="bf16"),)


def generated_files() -> list[tuple[str, AttentionSpec, str]]:
    """(file name, spec, ISA) of every file in generated/."""
    return ([(f"{spec.slug}.c", spec, GENERATED_ISA) for spec in CANONICAL]
            + [(f"{spec.slug}.amx.c", spec, "amx") for spec in GENERATED_AMX])


def head_dim_specs(dtype: str = "f32") -> list[AttentionSpec]:
    """Every supported head size (multiples of 8), causal, alternating MHA and GQA 2."""
    return [AttentionSpec(head_dim=d, gqa=1 + (d // 8) % 2, mask="causal", dtype=dtype)
            for d in range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1, 8)]


def mode_specs(dtype: str = "f32") -> list[AttentionSpec]:
    """Each mask, bias, softcap, sink and layout option alone and in useful combinations."""
    base = dict(head_dim=64, dtype=dtype)
    specs = []
    for mask in ("none", "causal", "window", "prefix"):
        for documents in (False, True):
            specs.append(AttentionSpec(gqa=2, mask=mask, documents=documents, **base))
    for bias in ("tensor", "alibi", "tensor+alibi"):
        specs.append(AttentionSpec(gqa=2, mask="causal", bias=bias, **base))
        specs.append(AttentionSpec(gqa=1, mask="none", bias=bias, **base))
    specs += [
        AttentionSpec(gqa=2, mask="causal", softcap=True, **base),
        AttentionSpec(gqa=2, mask="none", sinks=True, **base),
        AttentionSpec(gqa=4, mask="window", sinks=True, **base),
        AttentionSpec(gqa=3, mask="window", documents=True, bias="tensor+alibi",
                      softcap=True, sinks=True, **base),
        AttentionSpec(gqa=3, mask="causal", **base),
        AttentionSpec(gqa=8, mask="causal", **base),
        AttentionSpec(gqa=16, mask="none", **base),          # MQA with 16 query heads
        AttentionSpec(gqa=2, mask="causal", kv_layout="paged", **base),
        AttentionSpec(gqa=2, mask="window", softcap=True, sinks=True, kv_layout="paged", **base),
        AttentionSpec(gqa=1, mask="prefix", bias="alibi", kv_layout="paged", **base),
    ]
    return specs


def decode_specs(dtype: str = "f32") -> list[AttentionSpec]:
    """Decode variants: each mode that makes sense at decode, both KV layouts, head sizes
    that take the in-place path and the packed one (24 is not a whole number of vectors)."""
    base = dict(phase="decode", dtype=dtype)
    specs = []
    for layout in ("contiguous", "paged"):
        specs += [
            AttentionSpec(head_dim=128, gqa=4, mask="causal", kv_layout=layout, **base),
            AttentionSpec(head_dim=64, gqa=8, mask="window", sinks=True, kv_layout=layout, **base),
            AttentionSpec(head_dim=24, gqa=3, mask="causal", bias="tensor+alibi", softcap=True,
                          kv_layout=layout, **base),
        ]
    specs += [
        AttentionSpec(head_dim=64, gqa=1, mask="none", **base),
        AttentionSpec(head_dim=64, gqa=2, mask="prefix", bias="alibi", **base),
        AttentionSpec(head_dim=256, gqa=2, mask="window", softcap=True, **base),
        AttentionSpec(head_dim=96, gqa=16, mask="causal", sinks=True, **base),
        AttentionSpec(head_dim=40, gqa=1, mask="causal", bias="tensor", **base),
    ]
    return specs


def model_specs(dtype: str = "f32", phases=("prefill", "decode"),
                kv_layouts=("contiguous", "paged")):
    """The kernels of every embedded model config."""
    specs = []
    for name in embedded_models():
        for mk in model_kernels(load_config(name), phases=phases, kv_layouts=kv_layouts,
                                dtype=dtype):
            specs.append(mk.spec)
    return specs


def regression_specs(dtypes=("f32", "bf16", "f16")) -> list[AttentionSpec]:
    """Everything the regression suite checks, without duplicates, in a stable order."""
    seen, ordered = set(), []
    for dtype in dtypes:
        for spec in [*CANONICAL, *mode_specs(dtype), *head_dim_specs(dtype), *decode_specs(dtype),
                     *model_specs(dtype)]:
            spec = spec.replace(dtype=dtype)
            if spec not in seen:
                seen.add(spec)
                ordered.append(spec)
    return ordered
