import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechverse_jax.models.downsampler import Downsampler, LayerCombination, downsampled_lengths


def _hidden(num=4, b=2, t=9, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in range(num))


def test_last_layer_has_no_params_and_returns_last():
    hs = _hidden()
    variables = LayerCombination("last").init(jax.random.PRNGKey(0), hs)
    assert not variables.get("params")
    np.testing.assert_array_equal(LayerCombination("last").apply(variables, hs), hs[-1])


def test_weighted_sum_is_eq1_and_starts_at_the_mean_of_the_layers():
    hs = _hidden(num=5)  # hidden_states[0] is the pre-transformer input: not in the sum
    module = LayerCombination("weighted")
    params = module.init(jax.random.PRNGKey(0), hs)["params"]
    w = nn_unbox(params)["weights"]
    np.testing.assert_array_equal(w, np.ones(4))
    np.testing.assert_allclose(module.apply({"params": params}, hs), np.mean(np.stack(hs[1:]), 0), rtol=1e-6)
    w2 = jnp.array([0.5, 2.0, -1.0, 3.0])
    expected = sum(wi * h for wi, h in zip(w2, hs[1:])) / 4
    out = module.apply({"params": {"weights": w2}}, hs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_softmax_variant_normalises_the_weights():
    hs = _hidden(num=3)
    module = LayerCombination("softmax")
    logits = jnp.array([1.0, -2.0])
    out = module.apply({"params": {"weights": logits}}, hs)
    p = jax.nn.softmax(logits)
    np.testing.assert_allclose(out, p[0] * hs[1] + p[1] * hs[2], rtol=1e-5, atol=1e-6)


def test_bad_mode_names_the_field():
    with pytest.raises(ValueError, match="layer_combination"):
        LayerCombination("mean").init(jax.random.PRNGKey(0), _hidden())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 50, 51])
def test_lengths_match_the_conv_output_shape(n):
    x = jnp.ones((1, n, 4))
    ds = Downsampler(features=8, strides=(2, 2))
    variables = ds.init(jax.random.PRNGKey(0), x, jnp.ones((1, n), bool))
    y, mask = ds.apply(variables, x, jnp.ones((1, n), bool))
    assert y.shape[1] == int(downsampled_lengths(jnp.array(n), (2, 2))) == -(-(-(-n // 2)) // 2)
    assert bool(mask.all())


def test_padded_clip_equals_clip_alone_and_mask_is_exact():
    rng = np.random.default_rng(1)
    long_len, short_len = 23, 10
    x = jnp.asarray(rng.standard_normal((2, long_len, 6)), jnp.float32)
    mask = jnp.asarray(np.arange(long_len)[None] < np.array([long_len, short_len])[:, None])
    x = jnp.where(mask[..., None], x, 123.0)  # garbage in the padding must not leak
    ds = Downsampler(features=8, strides=(2, 2))
    variables = ds.init(jax.random.PRNGKey(0), x, mask)
    y, ymask = ds.apply(variables, x, mask)
    alone, alone_mask = ds.apply(variables, x[1:, :short_len], mask[1:, :short_len])
    n = alone.shape[1]
    assert int(ymask[1].sum()) == n == 3
    assert int(ymask[0].sum()) == y.shape[1] == 6
    np.testing.assert_allclose(y[1, :n], alone[0], rtol=1e-5, atol=1e-6)


def test_paper_downsampler_parameter_count():
    # Multitask-WLM: 1024 -> 2048 -> 2048, kernel 3, with biases and LayerNorms = 18.89M (Table 11).
    ds = Downsampler(features=2048, strides=(2, 2))
    shapes = jax.eval_shape(ds.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 1024)), jnp.ones((1, 8), bool))
    count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn_unbox(shapes)))
    assert count == 3 * 1024 * 2048 + 2048 + 2 * 2048 + 3 * 2048 * 2048 + 2048 + 2 * 2048 == 18_886_656


def nn_unbox(tree):
    import flax.linen as nn

    return nn.unbox(tree["params"] if "params" in tree else tree)
