"""Map a Hugging Face ``config.json`` to the attention kernels a model needs.

A model's attention layers differ only in a few ways that matter to attngen:
head_dim and grouped-query ratio (the same for every layer), whether a layer
is full causal or sliding-window, logit softcapping and learned sinks. This
module reads those from the config and groups the layers that can share one
generated kernel::

    >>> from attngen.models import load_config, model_kernels
    >>> for k in model_kernels(load_config("gemma-2-9b")):
    ...     print(k.spec.slug, k.window, k.softcap)
    prefill_d256_g2_window_nobias_cap_f32 4096 50.0
    prefill_d256_g2_causal_nobias_cap_f32 None 50.0

Which layers slide (first rule that applies wins):

1. ``layer_types`` present: ``"sliding_attention"`` -> window,
   ``"full_attention"`` -> causal (newer transformers configs, gpt-oss).
2. ``model_type == "gemma2"``: even layers (0, 2, ...) slide, odd layers are
   full, as in transformers' Gemma-2.
3. ``sliding_window`` set and ``use_sliding_window`` absent or true: when the
   config has ``max_window_layers`` (the Qwen family), layers with index
   ``>= max_window_layers`` slide and the rest are full; otherwise every layer
   slides (Mistral, Phi-3).
4. Otherwise every layer is full causal.

A sliding window at least ``max_position_embeddings`` long never masks
anything a model can see, so such layers are treated as full causal.

The window size is passed through exactly as the config states it; what it
means at the token boundary is the kernel's runtime argument to interpret.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Tuple

from .errors import AttngenError
from .spec import AttentionSpec

__all__ = ["ModelKernel", "ModelConfigError", "embedded_models", "load_config",
           "model_kernels"]

_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# model_type values whose attention has one learned sink logit per head.
_SINK_MODEL_TYPES = frozenset({"gpt_oss"})


class ModelConfigError(AttngenError, ValueError):
    """A model name or config.json could not be turned into attention kernels."""


@dataclass(frozen=True)
class ModelKernel:
    """One generated kernel a model needs, with the runtime values to call it with.

    ``spec`` is what gets compiled; ``num_heads``, ``num_kv_heads``, ``scale``,
    ``window`` and ``softcap`` are call arguments. ``layers`` lists the
    (0-based) layer indices that use this kernel.
    """

    spec: AttentionSpec
    num_heads: int
    num_kv_heads: int
    scale: float
    window: Optional[int]
    softcap: Optional[float]
    layers: Tuple[int, ...]
    description: str


def embedded_models() -> list[str]:
    """Names of the configs shipped with attngen, sorted."""
    if not _CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str) -> dict:
    """Return a config dict from an embedded model name or a path.

    A path may name a ``config.json`` file or a directory containing one
    (a local Hugging Face checkout).
    """
    name = os.fspath(name_or_path)
    names = embedded_models()
    key = name[:-5] if name.endswith(".json") else name
    if key in names and os.path.sep not in name:
        return _read_json(_CONFIG_DIR / f"{key}.json")
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        return _read_json(path)
    raise ModelConfigError(
        f"{name!r} is neither an embedded model nor a config.json path; "
        f"embedded models: {', '.join(names)}")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path} does not hold a JSON object")
    return config


def _positive_int(config: dict, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model under ``text_config``."""
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def _layer_windows(config: dict, num_layers: int) -> list[Optional[int]]:
    """Sliding-window size per layer, ``None`` for full causal layers."""
    window = config.get("sliding_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ModelConfigError(
                f"config field 'sliding_window' must be a positive integer, got {window!r}")
        max_pos = config.get("max_position_embeddings")
        if isinstance(max_pos, int) and not isinstance(max_pos, bool) and window >= max_pos:
            window = None  # never masks anything within the model's context

    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers:
            raise ModelConfigError(
                f"'layer_types' must list one entry per layer ({num_layers}), "
                f"got {layer_types!r}")
        windows = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                windows.append(None)
            elif kind == "sliding_attention":
                if config.get("sliding_window") is None:
                    raise ModelConfigError(
                        f"layer {i} is 'sliding_attention' but the config has no sliding_window")
                windows.append(window)
            else:
                raise ModelConfigError(
                    f"layer {i}: unknown layer type {kind!r} "
                    "(expected 'sliding_attention' or 'full_attention')")
        return windows

    if window is None:
        return [None] * num_layers
    if config.get("model_type") == "gemma2":
        return [window if i % 2 == 0 else None for i in range(num_layers)]
    use_sliding = config.get("use_sliding_window", True)
    if not use_sliding:
        return [None] * num_layers
    first = config.get("max_window_layers")
    if first is not None:
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers


def model_kernels(config: dict, phases: Iterable[str] = ("prefill",),
                  kv_layouts: Iterable[str] = ("contiguous",),
                  dtype: str = "f32") -> list[ModelKernel]:
    """The kernels the model described by ``config`` needs.

    Layers with the same spec and runtime values share one ``ModelKernel``.
    Every group is emitted once per requested phase and kv layout (the caller
    decides which combinations make sense). Order: groups by their first
    layer, then phases, then kv layouts, each in the order given.
    """
    if not isinstance(config, dict):
        raise ModelConfigError(f"config must be a dict, got {type(config).__name__}")
    config = _text_config(config)
    num_heads = _positive_int(config, "num_attention_heads")
    num_kv_heads = config.get("num_key_value_heads")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    else:
        num_kv_heads = _positive_int(config, "num_key_value_heads")
    if num_heads % num_kv_heads:
        raise ModelConfigError(
            f"num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})")
    gqa = num_heads // num_kv_heads

    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim")
    else:
        hidden = _positive_int(config, "hidden_size")
        if hidden % num_heads:
            raise ModelConfigError(
                f"hidden_size ({hidden}) is not a multiple of num_attention_heads "
                f"({num_heads}) and the config gives no head_dim")
        head_dim = hidden // num_heads

    scalar = config.get("query_pre_attn_scalar")
    scale = float(scalar) ** -0.5 if scalar is not None else float(head_dim) ** -0.5

    softcap = config.get("attn_logit_softcapping")
    softcap = float(softcap) if softcap is not None and softcap != 0 else None
    sinks = config.get("model_type") in _SINK_MODEL_TYPES

    num_layers = _positive_int(config, "num_hidden_layers")
    windows = _layer_windows(config, num_layers)

    groups = {}  # window -> layer indices; dicts keep first-layer order
    for layer, window in enumerate(windows):
        groups.setdefault(window, []).append(layer)

    phases = tuple(phases)
    kv_layouts = tuple(kv_layouts)
    kernels = []
    for window, layers in groups.items():
        count = f"{len(layers)} of {num_layers} layers"
        if window is None:
            what = f"full causal layers ({count})"
        else:
            what = f"sliding layers (window {window}; {count})"
        for phase in phases:
            for kv_layout in kv_layouts:
                spec = AttentionSpec(
                    head_dim=head_dim, gqa=gqa,
                    mask="causal" if window is None else "window",
                    softcap=softcap is not None, sinks=sinks, dtype=dtype,
                    phase=phase, kv_layout=kv_layout)
                kernels.append(ModelKernel(
                    spec=spec, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    scale=scale, window=window, softcap=softcap,
                    layers=tuple(layers), description=what))
    return kernels
