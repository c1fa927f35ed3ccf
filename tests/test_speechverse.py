"""The composed model: full-size shapes (paper Table 11), padding invariance, the loss."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from speechverse_jax import configs
from speechverse_jax.models import config as model_cfg_lib
from speechverse_jax.models import presets
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax.models.speechverse import (
    SpeechVerse,
    SpeechVerseConfig,
    init_params,
    init_params_subset,
    pack_left,
    token_cross_entropy,
)
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    return configs.load(os.path.join(REPO, "configs", f"{name}.py"), arg)


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _hf_count(model_cls, config_cls, hf_dict, skip=()):
    """Parameter count of the HF PyTorch model, built on the meta device (no memory)."""
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        model = model_cls(config_cls(**hf_dict))
    n = sum(p.numel() for n, p in model.named_parameters() if n not in skip)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and not hf_dict.get("tie_word_embeddings", True) and lm_head.weight is model.shared.weight:
        n += lm_head.weight.numel()  # transformers 5 ties it anyway; Flan-T5 checkpoints have their own head
    return n


def test_full_size_multitask_wlm_counts_match_hf_and_the_paper():
    import transformers

    cfg = model_cfg_lib.build_model_config(load_config("multitask_wlm").model)
    shapes = nn.unbox(jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0)))
    flat = traverse_util.flatten_dict(shapes, sep="/")
    wavlm = _count(shapes["wavlm"])
    t5_base = sum(np.prod(v.shape) for k, v in flat.items() if k.startswith("t5/") and "/lora_" not in k)
    lora = sum(np.prod(v.shape) for k, v in flat.items() if "/lora_" in k)
    adaptor = _count(shapes["downsampler"]) + _count(shapes.get("layer_weights", {}))

    hf_wavlm = _hf_count(transformers.WavLMModel, transformers.WavLMConfig, presets.WAVLM["wavlm-large"],
                         skip=("masked_spec_embed",  # unused by a frozen encoder
                               # the weight-norm g is folded into our positional conv kernel
                               "encoder.pos_conv_embed.conv.parametrizations.weight.original0"))
    hf_t5 = _hf_count(transformers.T5ForConditionalGeneration, transformers.T5Config, presets.T5["flan-t5-xl"])
    assert wavlm == hf_wavlm and 314e6 < wavlm < 317e6  # WavLM-Large, about 315M
    assert t5_base == hf_t5 and 2.84e9 < t5_base < 2.86e9  # Flan-T5-XL, about 2.85B
    # Table 11: 28.3M trainable = downsampler 18.89M + LoRA r16 on q,v of 72 attention blocks 9.44M.
    assert adaptor == 18_886_656
    assert lora == 72 * 2 * 16 * (2048 + 2048) == 9_437_184
    assert round((adaptor + lora) / 1e6, 1) == 28.3
    # (Table 11 says 2.9B in total; WavLM-Large + Flan-T5-XL alone are 3.17B, so that figure cannot
    # include both frozen backbones in full. The per-part counts above are what we can check.)
    # (the paper presets scan the layers: count attention blocks in the unrolled layout)
    from speechverse_jax.models.scan_layout import unstack_layers

    assert cfg.scan_layers
    n_lora_blocks = len({k.rsplit("/", 2)[0] for k in unstack_layers(flat) if "/lora_" in k})
    assert n_lora_blocks == 72


def test_brq_style_config_adds_one_weight_per_layer():
    cfg = model_cfg_lib.build_model_config(load_config("multitask_wlm", "weighted").model)
    shapes = nn.unbox(jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0)))
    assert shapes["layer_weights"]["weights"].shape == (24,)


def test_bad_model_config_values_name_the_field():
    model = model_cfg_lib.model_config()
    model.layer_combination = "average"
    with pytest.raises(ValueError, match="layer_combination"):
        model_cfg_lib.build_model_config(model)
    model = model_cfg_lib.model_config()
    model.downsampler.strides = (2, 0)
    with pytest.raises(ValueError, match="downsampler.strides"):
        model_cfg_lib.build_model_config(model)
    model = model_cfg_lib.model_config()
    model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        model_cfg_lib.build_model_config(model)
    model = model_cfg_lib.model_config()
    model.t5_preset = "t5-11b-nope"
    with pytest.raises(ValueError, match="t5_preset"):
        model_cfg_lib.build_model_config(model)


def test_pack_left_puts_valid_items_first():
    a = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1) + 1
    am = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    b = -jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 1) - 1
    bm = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    out, mask = pack_left(a, am, b, bm)
    np.testing.assert_array_equal(out[0, :, 0], [1, 2, 3, -1, -2, 0, 0])
    np.testing.assert_array_equal(out[1, :, 0], [5, -4, -5, -6, 0, 0, 0])
    np.testing.assert_array_equal(mask.sum(-1), [5, 4])


@pytest.fixture(scope="module")
def tiny_model():
    from speechverse_jax.hf_tiny import TINY_T5, TINY_WAVLM

    wavlm = WavLMConfig.from_hf(dict(TINY_WAVLM, feat_extract_norm="layer", do_stable_layer_norm=True,
                                     conv_bias=True, hidden_act="gelu", feat_extract_activation="gelu",
                                     layer_norm_eps=1e-5))
    t5 = T5Config.from_hf(dict(TINY_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               layer_norm_epsilon=1e-6, dropout_rate=0.1, is_encoder_decoder=True))
    cfg = SpeechVerseConfig(wavlm=wavlm, t5=t5, layer_combination="weighted",
                            lora=LoRAConfig(rank=4, alpha=8.0))
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    # Non-zero LoRA b so the adapters take part in the comparison.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)
    return cfg, params


def test_padded_example_equals_the_example_alone(tiny_model):
    cfg, params = tiny_model
    model = SpeechVerse(cfg)
    rng = np.random.default_rng(0)
    lens, ins_lens, dec_lens = [8000, 4321], [7, 3], [5, 4]
    audio = np.zeros((2, max(lens)), np.float32)
    amask = np.zeros_like(audio, bool)
    for i, n in enumerate(lens):
        audio[i, :n] = rng.standard_normal(n) * 0.1
        amask[i, :n] = True
    audio[1, lens[1]:] = 5.0  # garbage in the padding must not leak
    ins = rng.integers(3, cfg.t5.vocab_size, (2, max(ins_lens)))
    imask = np.arange(ins.shape[1])[None] < np.array(ins_lens)[:, None]
    dec = rng.integers(3, cfg.t5.vocab_size, (2, max(dec_lens)))
    dmask = np.arange(dec.shape[1])[None] < np.array(dec_lens)[:, None]
    apply = jax.jit(lambda *a: model.apply({"params": params}, *a))
    batch = apply(audio, amask, ins, imask, dec, dmask)
    alone = apply(audio[1:, : lens[1]], amask[1:, : lens[1]], ins[1:, : ins_lens[1]], imask[1:, : ins_lens[1]],
                  dec[1:, : dec_lens[1]], dmask[1:, : dec_lens[1]])
    assert np.all(np.isfinite(batch))
    np.testing.assert_allclose(batch[1, : dec_lens[1]], alone[0], rtol=1e-4, atol=1e-4)


def test_cross_entropy_counts_target_tokens_only():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 4, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 4)))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    loss, per_example = token_cross_entropy(logits, targets, mask)
    logp = jax.nn.log_softmax(logits)
    manual = [-sum(float(logp[b, t, targets[b, t]]) for t in range(4) if mask[b, t]) for b in range(2)]
    np.testing.assert_allclose(per_example, manual, rtol=1e-6)
    np.testing.assert_allclose(loss, sum(manual) / 5, rtol=1e-6)
    noisy = logits.at[0, 3].set(1e9).at[1, 2:].set(-1e9)  # padded positions: anything goes
    np.testing.assert_allclose(token_cross_entropy(noisy, targets, mask)[0], loss, rtol=1e-6)


def test_init_subset_only_makes_the_kept_leaves(tiny_model):
    cfg, _ = tiny_model
    subset = init_params_subset(cfg, jax.random.PRNGKey(1),
                                keep=lambda p: not p.startswith(("wavlm/", "t5/")) or "/lora_" in p)
    flat = traverse_util.flatten_dict(subset, sep="/")
    assert set(k.split("/")[0] for k in flat) == {"layer_weights", "downsampler", "t5"}
    assert all("/lora_" in k for k in flat if k.startswith("t5/"))
    assert all(not np.any(np.asarray(v)) for k, v in flat.items() if k.endswith("lora_b"))
