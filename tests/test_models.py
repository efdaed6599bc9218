"""attngen.models: Hugging Face config.json -> the attention kernels a model needs."""
import json
import math

import pytest

from attngen.models import ModelKernel, embedded_models, load_config, model_kernels
from attngen.spec import AttentionSpec

# name -> (head_dim, gqa, {window or None: number of layers}, softcap, sinks)
EXPECTED = {
    "llama-3.1-8b": (128, 4, {None: 32}, None, False),
    "llama-3.2-1b": (64, 4, {None: 16}, None, False),
    "mistral-7b": (128, 4, {4096: 32}, None, False),
    "qwen2.5-7b": (128, 7, {None: 28}, None, False),
    "gemma-2-9b": (256, 2, {4096: 21, None: 21}, 50.0, False),
    "phi-3-mini": (96, 1, {2047: 32}, None, False),
    "gpt-oss-20b": (64, 8, {128: 12, None: 12}, None, True),
}


def test_embedded_models_listed_sorted():
    names = embedded_models()
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_config_kernels(name):
    head_dim, gqa, windows, softcap, sinks = EXPECTED[name]
    config = load_config(name)
    assert "/" in config["_source"]
    kernels = model_kernels(config)
    assert kernels and all(isinstance(k, ModelKernel) for k in kernels)
    assert {k.window: len(k.layers) for k in kernels} == windows
    all_layers = sorted(layer for k in kernels for layer in k.layers)
    assert all_layers == list(range(config["num_hidden_layers"]))
    for k in kernels:
        spec = k.spec
        assert (spec.head_dim, spec.gqa) == (head_dim, gqa)
        assert spec.mask == ("causal" if k.window is None else "window")
        assert spec.softcap == (softcap is not None) and k.softcap == softcap
        assert spec.sinks is sinks
        assert (spec.bias, spec.documents, spec.dtype) == ("none", False, "f32")
        assert (spec.phase, spec.kv_layout) == ("prefill", "contiguous")
        assert k.num_heads == config["num_attention_heads"]
        assert k.num_heads == gqa * k.num_kv_heads
        assert AttentionSpec.from_slug(spec.slug) == spec
        assert k.description


def test_scales():
    gemma = model_kernels(load_config("gemma-2-9b"))
    assert all(math.isclose(k.scale, 256 ** -0.5) for k in gemma)
    phi = model_kernels(load_config("phi-3-mini"))
    assert all(math.isclose(k.scale, 96 ** -0.5) for k in phi)


def test_gemma2_even_layers_slide():
    kernels = model_kernels(load_config("gemma-2-9b"))
    sliding = next(k for k in kernels if k.window == 4096)
    full = next(k for k in kernels if k.window is None)
    assert sliding.layers == tuple(range(0, 42, 2))
    assert full.layers == tuple(range(1, 42, 2))
    assert kernels[0] is sliding  # ordered by first layer


def test_gpt_oss_layer_types():
    kernels = model_kernels(load_config("gpt-oss-20b"))
    assert [k.spec.slug for k in kernels] == [
        "prefill_d64_g8_window_nobias_sink_f32", "prefill_d64_g8_causal_nobias_sink_f32"]
    assert kernels[0].layers == tuple(range(0, 24, 2))


def test_phases_and_layouts():
    kernels = model_kernels(load_config("mistral-7b"), phases=("prefill", "decode"),
                            kv_layouts=("contiguous", "paged"))
    assert [(k.spec.phase, k.spec.kv_layout) for k in kernels] == [
        ("prefill", "contiguous"), ("prefill", "paged"),
        ("decode", "contiguous"), ("decode", "paged")]
    assert len({k.spec for k in kernels}) == 4
    assert all(k.window == 4096 for k in kernels)
    again = model_kernels(load_config("mistral-7b"), phases=("prefill", "decode"),
                          kv_layouts=("contiguous", "paged"))
    assert again == kernels  # deterministic


def test_qwen2_sliding_rules():
    base = dict(model_type="qwen2", hidden_size=1024, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2,
                max_position_embeddings=32768, sliding_window=4096, max_window_layers=6)
    off = model_kernels(dict(base, use_sliding_window=False))
    assert [(k.window, k.layers) for k in off] == [(None, tuple(range(8)))]
    on = model_kernels(dict(base, use_sliding_window=True))
    assert [(k.window, k.layers) for k in on] == [(None, tuple(range(6))), (4096, (6, 7))]


def test_window_as_long_as_context_is_causal():
    config = dict(model_type="mistral", hidden_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, max_position_embeddings=4096, sliding_window=4096)
    [k] = model_kernels(config)
    assert k.window is None and k.spec.mask == "causal"
    assert k.num_kv_heads == 8 and k.spec.gqa == 1  # kv heads default to Hq


def test_null_fields_ignored():
    config = dict(model_type="llama", hidden_size=2048, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=None,
                  sliding_window=None, attn_logit_softcapping=None,
                  query_pre_attn_scalar=None)
    [k] = model_kernels(config)
    assert k.spec.slug == "prefill_d128_g4_causal_nobias_f32"
    assert k.softcap is None and math.isclose(k.scale, 128 ** -0.5)


def test_load_config_from_path(tmp_path):
    config = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 3,
              "num_attention_heads": 8, "num_key_value_heads": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert load_config(str(path)) == config
    assert load_config(str(tmp_path)) == config  # a checkout directory works too
    [k] = model_kernels(load_config(str(path)))
    assert k.spec.slug == "prefill_d64_g4_causal_nobias_f32"
    assert k.layers == (0, 1, 2)


def test_load_config_bad_name_lists_embedded():
    with pytest.raises(ValueError) as info:
        load_config("no-such-model-xyz")
    message = str(info.value)
    for name in embedded_models():
        assert name in message


def test_non_divisible_heads():
    config = dict(model_type="llama", hidden_size=1536, num_hidden_layers=2,
                  num_attention_heads=12, num_key_value_heads=5)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        model_kernels(config)


def test_unknown_layer_type():
    config = dict(model_type="x", hidden_size=512, num_hidden_layers=2,
                  num_attention_heads=8, sliding_window=64,
                  layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match="chunked_attention"):
        model_kernels(config)
