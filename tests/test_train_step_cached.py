"""train/step.py's cached-hidden-states branch (the one the demo trains through) against raw audio.

One step from the frozen encoder's states equals one step from the audio they came from: same loss,
gradient norm, per-task sums and updated trainable params (layer weights, downsampler, LoRA), with
dropout on and the same step rng. The tiny model is the converted base of tests/conftest.py.
"""

import jax
import numpy as np
import pytest
from flax import traverse_util

from speechverse_jax import tree
from speechverse_jax.models.config import model_config
from speechverse_jax.train.config import RULES_STAGE2, train_config
from speechverse_jax.data.synthetic import random_batch
from speechverse_jax.models.speechverse import SpeechVerse
from speechverse_jax.train import optimizer as opt_lib
from speechverse_jax.train.loop import build_setup
from speechverse_jax.train.step import init_state, make_train_step


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module")
def parts(tiny_base):
    """(setup, jitted train step, initial state, encoder) for a stage-2 model: weighted layers, LoRA rank 4."""
    config = train_config(max_steps=10, lr=1e-2, warmup_steps=0, rules=RULES_STAGE2)
    config.base_checkpoint = tiny_base
    config.model = model_config(layer_combination="weighted", lora_rank=4)
    config.model.lora.dropout = 0.1  # dropout on (T5 dropout too): the step's rng must drive both paths alike
    config.model.t5_dropout_rate = 0.1
    setup = build_setup(config, log_fn=lambda *a: None)
    tx, schedule = opt_lib.make_optimizer(config.optim, int(config.train.max_steps))
    step = jax.jit(make_train_step(setup.model, tx, schedule, num_tasks=2))
    state = init_state(setup.trainable, tx, seed=0)
    params = tree.merge(setup.trainable, setup.frozen)
    encode = jax.jit(lambda a, m: setup.model.apply({"params": params}, a, m, method=SpeechVerse.encode_audio))
    return setup, step, state, encode


def _batches(encode, dtype=np.float32):
    """A raw-audio batch (one padding row, as the loader makes) and the same batch with cached states."""
    batch = random_batch(seed=3, batch_size=4, samples=8000, instruction_len=6, target_len=5, vocab_size=40,
                         num_tasks=2)
    batch["example_mask"][-1] = False
    hidden, frame_mask = encode(batch["audio"], batch["audio_mask"])
    cached = {k: v for k, v in batch.items() if k not in ("audio", "audio_mask")}
    cached["hidden_states"] = np.stack([np.asarray(h) for h in hidden], axis=1).astype(dtype)  # [b, L+1, frames, dim]
    cached["frame_mask"] = np.asarray(frame_mask)
    return batch, cached


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.slow
def test_one_step_from_cached_states_equals_one_step_from_audio(parts):
    setup, step, state, encode = parts
    raw, cached = _batches(encode)
    s_raw, m_raw = step(state, setup.frozen, raw)
    s_cached, m_cached = step(state, setup.frozen, cached)
    assert bool(m_raw["finite"]) and bool(m_cached["finite"])
    assert int(m_raw["target_tokens"]) == int(m_cached["target_tokens"]) == int(raw["target_mask"][:3].sum())
    for k in ("loss", "grad_norm", "task_nll"):
        assert _rel(m_cached[k], m_raw[k]) < 1e-5, (k, m_cached[k], m_raw[k])
    np.testing.assert_array_equal(m_cached["task_tokens"], m_raw["task_tokens"])

    before, after_raw, after_cached = _flat(state.params), _flat(s_raw.params), _flat(s_cached.params)
    assert any(k.startswith("layer_weights/") for k in before) and any("/lora_b" in k for k in before)
    assert any(k.startswith("downsampler/") for k in before)
    moved = {k: float(np.abs(after_raw[k] - before[k]).max()) for k in before}
    for k in ("layer_weights/weights", "downsampler/conv_0/kernel"):
        assert moved[k] > 1e-3, (k, moved[k])  # lr 1e-2: a real step, not a vacuous comparison
    assert any(v > 1e-3 for k, v in moved.items() if "/lora_b" in k)
    for k in before:  # the same update: the results differ by far less than the step moved them
        assert np.abs(after_cached[k] - after_raw[k]).max() <= 1e-4 * moved[k] + 1e-7, (k, moved[k])
    for a, b in zip(jax.tree_util.tree_leaves(s_raw.opt_state), jax.tree_util.tree_leaves(s_cached.opt_state)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-9)


def test_cached_step_reads_the_states(parts):
    """States rounded to float16 (what the cache stores) give nearly the same step; noisy states or a
    shorter frame mask do not (measured: float16 ~1e-6 relative, noise ~1e-2, mask ~5e-2). The states
    are fed as float32 to reuse the compiled step; the demo test trains on float16 states end to end."""
    setup, step, state, encode = parts
    _, cached = _batches(encode)
    _, base = step(state, setup.frozen, cached)
    states = cached["hidden_states"]
    noise = np.random.default_rng(0).standard_normal(states.shape).astype(np.float32) * states.std()
    shorter = cached["frame_mask"] & (np.arange(cached["frame_mask"].shape[1]) < 5)
    variants = {"float16": dict(cached, hidden_states=states.astype(np.float16).astype(np.float32)),
                "noisy": dict(cached, hidden_states=states + noise), "shorter": dict(cached, frame_mask=shorter)}
    diff = {}
    for name, batch in variants.items():
        _, m = step(state, setup.frozen, batch)
        diff[name] = max(_rel(m["loss"], base["loss"]), _rel(m["grad_norm"], base["grad_norm"]))
    assert diff["float16"] < 1e-4, diff
    assert diff["noisy"] > 100 * max(diff["float16"], 1e-6) and diff["shorter"] > 1e-2, diff
