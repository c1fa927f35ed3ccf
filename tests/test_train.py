"""Training: only trainables move, skipped non-finite steps, exact resume, stage transitions."""


import jax
import numpy as np
import pytest
from flax import traverse_util

from speechverse_jax import tree as tree_lib
from speechverse_jax import checkpoints as base_ckpt
from speechverse_jax.models import config as model_cfg_lib
from speechverse_jax.train import config as train_cfg_lib
from speechverse_jax.data.synthetic import SyntheticData
from speechverse_jax.train.loop import NonFiniteError, build_setup, train


# The learning-rate schedule's length is a constant of the compiled train step: runs of one tiny
# config with the same schedule share one compilation (cached across tests), whatever their max_steps.
SCHEDULE_STEPS = 4


def tiny_config(base, stage=2, steps=3, schedule_steps=None, **train_overrides):
    """`steps` train steps of the tiny model on `base`; `schedule_steps` (default `steps`) is the
    length of the learning-rate schedule (a shorter run follows a prefix of it)."""
    config = train_cfg_lib.train_config(max_steps=steps, lr=1e-2, warmup_steps=1,
                                     rules=train_cfg_lib.RULES_STAGE2 if stage == 2 else train_cfg_lib.RULES_STAGE1)
    if schedule_steps:
        config.optim.total_steps = schedule_steps
    config.base_checkpoint = base
    config.model = model_cfg_lib.model_config(layer_combination="weighted", lora_rank=4 if stage == 2 else 0)
    config.model.lora.dropout = 0.0
    config.train.log_every = 1
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.tensorboard = False
    config.train.update(train_overrides)
    return config


def tiny_data(**kw):
    return SyntheticData(batch_size=4, samples=4000, instruction_len=6, target_len=5, vocab_size=40,
                         task_names=["asr", "ic"], **kw)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_only_trainable_params_change_and_moments_cover_them_only(tiny_base, tmp_path):
    config = tiny_config(tiny_base, steps=3, schedule_steps=SCHEDULE_STEPS)
    out = train(config, str(tmp_path / "run"), tiny_data(), progress=False)
    state, setup = out["state"], out["setup"]
    base = _flat(base_ckpt.load_base_params(tiny_base))
    frozen = _flat(setup.frozen)
    assert set(frozen) == set("/".join(k.split("/")) for k in frozen)
    assert frozen.keys() == {k for k in base}  # every frozen leaf is a base leaf
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)  # bit-identical
    init = _flat(build_setup(config, log_fn=lambda *a: None).trainable)
    trained = _flat(state.params)
    assert trained.keys() == init.keys()
    assert any("/lora_a" in k for k in trained) and any(k.startswith("downsampler/") for k in trained)
    for k in trained:
        assert not np.array_equal(trained[k], init[k]), f"{k} did not change"
    n_train = tree_lib.count(state.params)
    moments = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * n_train  # Adam mu and nu of the trainable leaves, nothing else
    assert int(state.skipped_steps) == 0
    # Throughput records carry the analytic model FLOP rate and MFU against the measured CPU peak.
    rows = [r for r in map(eval_json, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    timed = [r for r in rows if "step_time_s" in r]
    assert timed and all(0 < r["mfu"] < 1.5 and r["model_tflops_per_s"] > 0 for r in timed)


def test_every_param_must_match_a_rule(tiny_base):
    config = tiny_config(tiny_base)
    config.train.param_rules = [[r"downsampler/.*", "train"], [r"wavlm/.*", "freeze"]]
    with pytest.raises(ValueError, match=r"(?s)match none of these .*t5/"):
        build_setup(config, log_fn=lambda *a: None)


class PoisonedData(SyntheticData):
    """Batch number `bad` (0-based) has a NaN in its audio."""

    def __init__(self, bad, **kw):
        super().__init__(**kw)
        self.bad = bad

    def train_iterator(self):
        inner, bad = super().train_iterator(), self.bad

        class It:
            def __next__(self_):
                i = inner.index
                b = next(inner)
                if i in bad:
                    b["audio"][0, 10] = np.nan
                return b

            get_state, set_state = inner.get_state, inner.set_state

        return It()


def test_non_finite_step_is_skipped_and_counted(tiny_base, tmp_path):
    config = tiny_config(tiny_base, steps=3, schedule_steps=SCHEDULE_STEPS)
    data = PoisonedData(bad={1}, batch_size=4, samples=4000, instruction_len=6, target_len=5, vocab_size=40,
                        task_names=["asr", "ic"])
    out = train(config, str(tmp_path / "run"), data, progress=False)
    assert int(out["state"].skipped_steps) == 1
    rows = [r for r in map(eval_json, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(np.isfinite(v) for k, v in _flat(out["state"].params).items() for v in [v.sum()])

    config = tiny_config(tiny_base, steps=4, schedule_steps=SCHEDULE_STEPS, max_consecutive_skips=1)
    data = PoisonedData(bad={0, 1, 2}, batch_size=4, samples=4000, instruction_len=6, target_len=5, vocab_size=40,
                        task_names=["asr", "ic"])
    with pytest.raises(NonFiniteError, match="in a row"):
        train(config, str(tmp_path / "run2"), data, progress=False)


def eval_json(line):
    import json

    return json.loads(line)


def test_resume_is_bitwise_identical(tiny_base, tmp_path):
    straight = train(tiny_config(tiny_base, steps=4), str(tmp_path / "a"), tiny_data(), progress=False)
    first = tiny_config(tiny_base, steps=2, schedule_steps=SCHEDULE_STEPS, checkpoint_every=2)  # its first half
    train(first, str(tmp_path / "b"), tiny_data(), progress=False)
    resumed = train(tiny_config(tiny_base, steps=4), str(tmp_path / "b"), tiny_data(), progress=False)
    assert int(resumed["state"].step) == 4
    a, b = _flat(straight["state"].params), _flat(resumed["state"].params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    oa, ob = jax.tree_util.tree_leaves(straight["state"].opt_state), jax.tree_util.tree_leaves(resumed["state"].opt_state)
    for x, y in zip(oa, ob):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stage1_checkpoint_grafts_into_stage2_with_identical_outputs(tiny_base, tmp_path):
    s1 = tiny_config(tiny_base, stage=1, steps=2)
    s1.train.eval_every = 2
    train(s1, str(tmp_path / "stage1"), tiny_data(), progress=False)
    s2 = tiny_config(tiny_base, stage=2, steps=1, init_from=str(tmp_path / "stage1"))
    setup2 = build_setup(s2, log_fn=lambda *a: None)
    setup1 = build_setup(tiny_config(tiny_base, stage=1, init_from=str(tmp_path / "stage1")), log_fn=lambda *a: None)
    lora = {k for k in _flat(setup2.trainable) if "/lora_" in k}
    assert lora and all(not _flat(setup2.trainable)[k].any() for k in lora if k.endswith("lora_b"))
    batch = tiny_data().eval_batches()[0]
    from speechverse_jax.train.step import _token_nll

    def token_nll(setup):  # the per-token loss of the teacher-forced targets
        params = tree_lib.merge(setup.trainable, setup.frozen)
        return np.asarray(_token_nll(setup.model, params, {k: jax.numpy.asarray(v) for k, v in batch.items()}, True)[0])

    np.testing.assert_array_equal(token_nll(setup1), token_nll(setup2))


def test_gradient_accumulation_matches_one_big_batch(tiny_base, tmp_path):
    configs = [tiny_config(tiny_base, steps=2), tiny_config(tiny_base, steps=2, accum_steps=2)]
    for c in configs:
        c.model.t5_dropout_rate = 0.0  # dropout masks differ per micro-batch; compare the math only
    one = train(configs[0], str(tmp_path / "one"), tiny_data(), progress=False)
    two = train(configs[1], str(tmp_path / "two"), tiny_data(), progress=False)
    a, b = _flat(one["state"].params), _flat(two["state"].params)
    for k in a:  # the same token-weighted gradient, summed in another order
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bf16_compute_keeps_float32_trainables(tiny_base, tmp_path):
    config = tiny_config(tiny_base, steps=2)
    config.model.dtype = "bfloat16"
    config.model.frozen_param_dtype = "bfloat16"
    out = train(config, str(tmp_path / "bf16"), tiny_data(), progress=False)
    assert {str(v.dtype) for v in _flat(out["state"].params).values()} == {"float32"}
    assert {str(v.dtype) for v in _flat(out["setup"].frozen).values()} == {"bfloat16"}
    rows = [eval_json(l) for l in open(tmp_path / "bf16" / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 2 and all(np.isfinite(r["loss"]) for r in train_rows)
    assert "target_tokens_per_s" not in train_rows[0]  # step 1 is compilation
    assert train_rows[1]["target_tokens_per_s"] > 0 and train_rows[1]["audio_seconds_per_s"] > 0


def test_the_schedule_follows_max_steps_unless_total_steps_is_set():
    """`optim.total_steps` 0 (the default): the cosine ends at `train.max_steps`, so overriding
    max_steps stretches it (before, a 950-step config run for 2,000 steps trained its last 1,050
    at lr 0). A set total_steps wins: a run can stop early on a longer schedule."""
    from speechverse_jax.train.optimizer import learning_rate_schedule

    config = train_cfg_lib.train_config(max_steps=100, lr=1e-2, warmup_steps=10)
    assert config.optim.total_steps == 0
    for max_steps in (100, 400):
        schedule = learning_rate_schedule(config.optim, max_steps)
        assert float(schedule(10)) == pytest.approx(1e-2)
        assert float(schedule(max_steps // 2)) > 1e-3 and float(schedule(max_steps)) == pytest.approx(0.0, abs=1e-9)
    config.optim.total_steps = 400
    assert float(learning_rate_schedule(config.optim, 100)(100)) > 5e-3  # mid-schedule at the run's end
    config.optim.total_steps = 0
    with pytest.raises(ValueError, match="train.max_steps"):
        learning_rate_schedule(config.optim, 0)
