"""The analytic FLOP count against XLA's cost analysis, its parts against the model's shapes, and
the MFU bookkeeping."""

import types

import jax
import jax.numpy as jnp
import pytest

from speechverse_jax.models import config as model_cfg_lib
from speechverse_jax.models import layers as layers_lib
from speechverse_jax.train import config as train_cfg_lib
from speechverse_jax.models.speechverse import SpeechVerse, init_params
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig, feature_lengths
from speechverse_jax.train import flops
from speechverse_jax.train import optimizer as opt_lib
from speechverse_jax.train.step import init_state, make_train_step
from speechverse_jax.data.synthetic import random_batch


def _small_cfg(lora_rank=4, combination="weighted"):
    model = model_cfg_lib.model_config(layer_combination=combination, lora_rank=lora_rank)
    model.lora.dropout = 0.0
    model.t5_dropout_rate = 0.0
    wavlm = WavLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        conv_dim=(64, 64), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
    t5 = T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=8,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    return model_cfg_lib.build_model_config(model, wavlm, t5)


def test_wavlm_frames_match_the_model():
    cfg = _small_cfg()
    for n in (1600, 4000, 16000):
        assert flops.wavlm_frames(cfg.wavlm, n) == int(feature_lengths(cfg.wavlm, jnp.array([n]))[0])


@pytest.mark.parametrize("combination,lora_rank", [("weighted", 4), ("last", 0)])
def test_analytic_train_step_flops_agree_with_xla(combination, lora_rank):
    """XLA also counts element-wise work (norms, softmax, gelu, the optimizer), so it is a bit above
    the matmul-only count; a missing or doubled matmul term would move the ratio far outside this band."""
    cfg = _small_cfg(lora_rank, combination)
    model = SpeechVerse(cfg)
    params = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    import flax.linen as nn
    from flax import traverse_util

    params = traverse_util.flatten_dict(nn.unbox(params), sep="/")
    rules = train_cfg_lib.RULES_STAGE2 if lora_rank else train_cfg_lib.RULES_STAGE1
    labels = opt_lib.label_params(traverse_util.unflatten_dict(params, sep="/"), [tuple(r) for r in rules])
    pick = lambda which: traverse_util.unflatten_dict({k: v for k, v in params.items() if labels[k] == which}, sep="/")  # noqa: E731
    frozen, trainable = pick(opt_lib.FREEZE), pick(opt_lib.TRAIN)
    train_config = train_cfg_lib.train_config()
    tx, schedule = opt_lib.make_optimizer(train_config.optim, int(train_config.train.max_steps))
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), trainable)
    b, samples, ins, tgt = 4, 16000, 24, 16
    batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   random_batch(0, b, samples, ins, tgt, 512))
    cost = jax.jit(make_train_step(model, tx, schedule)).lower(state, frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = flops.train_step_flops(cfg, b, samples, ins, tgt)
    ratio = float(cost["flops"]) / analytic["total"]
    assert 1.0 <= ratio <= 1.25, (ratio, analytic)
    assert analytic["lora"] > 0 if lora_rank else analytic["lora"] == 0
    assert analytic["layer_weights"] > 0 if combination == "weighted" else analytic["layer_weights"] == 0


def test_t5_forward_count_by_hand():
    cfg = T5Config(vocab_size=100, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                   feed_forward_proj="relu")
    got = flops.t5_step(cfg, batch=1, source_len=3, target_len=2, lora_rank=0, lora_regex="")
    inner = 4
    enc = 2 * 3 * 8 * inner * 4 + 2 * 2 * 3 * 3 * inner + 2 * 2 * 3 * 8 * 16
    dec_self = 2 * 2 * 8 * inner * 4 + 2 * 2 * 2 * 2 * inner
    dec_cross = 2 * (2 * 2 * 8 * inner) + 2 * (2 * 3 * 8 * inner) + 2 * 2 * 2 * 3 * inner
    dec = dec_self + dec_cross + 2 * 2 * 2 * 8 * 16 + 2 * 2 * 8 * 100
    assert got["forward"] == enc + dec
    attn = 2 * 2 * 3 * 3 * inner + 2 * 2 * 2 * 2 * inner + 2 * 2 * 2 * 3 * inner
    assert got["backward"] == got["forward"] + attn  # input gradients: 1x weights, 2x attention
    lora = flops.t5_step(cfg, 1, 3, 2, lora_rank=1, lora_regex=layers_lib.DEFAULT_LORA_TARGETS)["lora"]
    # q, v of encoder self (3, 3 rows), decoder self (2, 2) and cross (2 for q, 3 for v), forward x 3
    assert lora == 3 * 2 * (3 + 3 + 2 + 2 + 2 + 3) * 1 * (8 + inner)


def test_peak_table_and_cpu_measurement():
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu")) == 197e12
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3",
                                                             platform="gpu")) == 989e12
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind="Some NPU", platform="npu")) is None
    measured = flops.measure_matmul_flops(n=256, seconds=0.05)
    assert 1e8 < measured < 1e13
