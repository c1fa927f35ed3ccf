"""LoRA inside the T5 projections: zero-init is a no-op, merging folds it exactly, tree helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from speechverse_jax.hf_tiny import TINY_T5
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax import tree
from speechverse_jax.models.lora import graft_lora, merge_lora, split_lora
from speechverse_jax.models.t5 import T5, T5Config

LORA = LoRAConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup():
    cfg = T5Config.from_hf(dict(TINY_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    rng = np.random.default_rng(0)
    b, s, t = 2, 9, 5
    enc_mask = np.arange(s)[None] < np.array([9, 6])[:, None]
    inputs = dict(
        inputs_embeds=jnp.asarray(rng.standard_normal((b, s, cfg.d_model)), jnp.float32),
        attention_mask=jnp.asarray(enc_mask),
        decoder_input_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t))),
    )
    params = nn.unbox(T5(cfg, lora=LORA).init(jax.random.PRNGKey(0), **inputs)["params"])
    return cfg, params, inputs


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def logits(cfg, params, inputs, lora=None):
    return np.asarray(jax.jit(lambda p: T5(cfg, lora=lora).apply({"params": p}, **inputs))(params))


def test_default_regex_adapts_q_and_v_of_every_attention_block(setup):
    cfg, params, _ = setup
    adapted = sorted({k.rsplit("/", 1)[0] for k in _flat(params) if "/lora_" in k})
    expected = sorted(
        [f"encoder/block_{i}/self_attention/{p}" for i in range(cfg.num_layers) for p in "qv"]
        + [f"decoder/block_{i}/{a}/{p}" for i in range(cfg.num_decoder_layers)
           for a in ("self_attention", "cross_attention") for p in "qv"]
    )
    assert adapted == expected
    assert len({p.rsplit("/", 1)[0] for p in adapted}) == 3 * cfg.num_layers
    flat = _flat(params)
    inner = cfg.num_heads * cfg.d_kv
    assert flat["encoder/block_0/self_attention/q/lora_a"].shape == (cfg.d_model, LORA.rank)
    assert flat["encoder/block_0/self_attention/q/lora_b"].shape == (LORA.rank, inner)
    assert not any(np.any(v) for k, v in flat.items() if k.endswith("lora_b"))
    base, adapters = split_lora(params)
    assert tree.count(adapters) == len(adapted) * LORA.rank * (cfg.d_model + inner)
    assert tree.count(base) + tree.count(adapters) == tree.count(params)


def test_custom_regex_targets_other_projections(setup):
    cfg, _, inputs = setup
    lora = LoRAConfig(rank=2, target_regex=r".*/mlp/(wi_0|wi_1)$")
    shapes = nn.unbox(jax.eval_shape(lambda r: T5(cfg, lora=lora).init(r, **inputs), jax.random.PRNGKey(0)))
    adapted = {k.rsplit("/", 1)[0] for k in _flat(shapes["params"]) if "/lora_" in k}
    assert len(adapted) == 2 * (cfg.num_layers + cfg.num_decoder_layers)
    assert all(k.endswith(("/mlp/wi_0", "/mlp/wi_1")) for k in adapted)


def test_zero_b_gives_exactly_the_base_model(setup):
    cfg, params, inputs = setup
    base, _ = split_lora(params)
    np.testing.assert_array_equal(logits(cfg, params, inputs, LORA), logits(cfg, base, inputs))


def test_merged_lora_equals_unmerged(setup):
    cfg, params, inputs = setup
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape) * 0.05, x.dtype) if p[-1].key == "lora_b" else x,
        params)
    with_lora = logits(cfg, params, inputs, LORA)
    base, _ = split_lora(params)
    assert not np.allclose(with_lora, logits(cfg, base, inputs), atol=1e-3)  # the adapters matter
    merged = merge_lora(params, LORA)
    assert not any("/lora_" in k for k in _flat(merged))
    assert _flat(merged).keys() == _flat(base).keys()
    np.testing.assert_allclose(logits(cfg, merged, inputs), with_lora, rtol=1e-5, atol=1e-5)


def test_split_merge_round_trip_and_graft(setup):
    cfg, params, inputs = setup
    base, adapters = split_lora(params)
    assert all("/lora_" in k for k in _flat(adapters)) and not any("/lora_" in k for k in _flat(base))
    rebuilt = tree.merge(base, adapters, disjoint=True)
    assert _flat(rebuilt).keys() == _flat(params).keys()
    for k, v in _flat(params).items():
        assert _flat(rebuilt)[k] is v
    with pytest.raises(ValueError, match="more than one tree"):
        tree.merge(base, base, disjoint=True)

    # Stage 2 starting from a stage-1 tree: fresh adapters, base leaves untouched.
    stage1 = jax.tree_util.tree_map(lambda x: x + 1.0, base)
    fresh = nn.unbox(T5(cfg, lora=LORA).init(jax.random.PRNGKey(7), **inputs)["params"])
    grafted, kept_fresh = graft_lora(tree.flatten(stage1), tree.flatten(fresh))
    g, s1, fr = grafted, tree.flatten(stage1), tree.flatten(fresh)
    assert g.keys() == fr.keys()
    assert kept_fresh == sorted(k for k in fr if "/lora_" in k)
    for k in g:
        assert g[k] is (fr[k] if "/lora_" in k else s1[k])
    # b = 0 after grafting: the stage-2 model starts where stage 1 ended.
    np.testing.assert_array_equal(logits(cfg, tree.unflatten(grafted), inputs, LORA), logits(cfg, stage1, inputs))

    bad = dict(tree.flatten(stage1), **{"lm_head/kernel": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="lm_head/kernel"):
        graft_lora(bad, tree.flatten(fresh))
    wrong_shape = dict(tree.flatten(stage1))
    key = next(k for k in wrong_shape if k.endswith("q/kernel"))
    wrong_shape[key] = jnp.zeros((1, 1))
    with pytest.raises(ValueError, match="has shape"):
        graft_lora(wrong_shape, tree.flatten(fresh))
