"""`model.scan_layers` (layers under nn.scan, params stacked) and `model.remat`: checkpoints load
into both layouts, runs continue across layouts or fail clearly, LoRA rules find the stacked
adapters, export writes the same HF tensors, and rematerialised gradients equal plain ones."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from speechverse_jax import tree as tree_lib
from speechverse_jax import checkpoints as base_ckpt
from speechverse_jax.convert.export import export_t5, export_wavlm
from speechverse_jax.models import scan_layout
from speechverse_jax.train.loop import build_setup, train
from speechverse_jax.train.step import make_train_step

from test_train import SCHEDULE_STEPS, tiny_config, tiny_data


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _quiet(*a, **k):
    pass


def test_layout_helpers_round_trip_and_reject_gaps():
    flat = {"t5/encoder/block_0/mlp/wo/kernel": np.zeros((2, 3)), "t5/encoder/block_1/mlp/wo/kernel": np.ones((2, 3)),
            "wavlm/encoder/layers_0/attention/rel_attn_embed": np.zeros((4, 2)),
            "wavlm/encoder/layers_1/mlp/output/bias": np.ones(3), "wavlm/encoder/layers_2/mlp/output/bias": np.ones(3) * 2,
            "t5/shared/embedding": np.ones((5, 2))}
    stacked = scan_layout.stack_layers(flat)
    assert stacked["t5/encoder/blocks/mlp/wo/kernel"].shape == (2, 2, 3)
    assert stacked["wavlm/encoder/layers/mlp/output/bias"].shape == (2, 3)
    assert "wavlm/encoder/layers_0/attention/rel_attn_embed" in stacked and scan_layout.is_scanned(stacked)
    back = scan_layout.unstack_layers(stacked)
    assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match="no layer"):
        scan_layout.stack_layers({"t5/encoder/block_0/x": np.ones(1), "t5/encoder/block_2/x": np.ones(1)})


def test_base_checkpoint_loads_into_the_scanned_layout_and_lora_rules_find_stacked_adapters(tiny_base):
    config = tiny_config(tiny_base)
    config.model.scan_layers = True
    setup = build_setup(config, log_fn=_quiet)
    frozen = _flat(setup.frozen)
    assert "t5/encoder/blocks/self_attention/q/kernel" in frozen and "wavlm/encoder/layers/attention/q/kernel" in frozen
    base = scan_layout.stack_layers(_flat(base_ckpt.load_base_params(tiny_base)))
    for k, v in base.items():
        np.testing.assert_array_equal(frozen[k], v, err_msg=k)
    trainable = _flat(setup.trainable)
    lora = sorted(k for k in trainable if "/lora_" in k)
    # one stacked leaf per (attention, q|v, a|b): encoder self 4 + decoder self and cross 8; the
    # regex rules (train.param_rules, lora.target_regex) see the scanned paths
    assert "t5/decoder/blocks/cross_attention/v/lora_b" in lora and len(lora) == 12, lora
    assert trainable["t5/encoder/blocks/self_attention/q/lora_a"].shape[0] == 2  # the layers axis
    unrolled = build_setup(tiny_config(tiny_base), log_fn=_quiet)
    assert tree_lib.count(setup.trainable) == tree_lib.count(unrolled.trainable)


def test_runs_continue_across_layouts_and_resume_fails_clearly(tiny_base, tmp_path):
    run = str(tmp_path / "unrolled")
    out = train(tiny_config(tiny_base, steps=2, schedule_steps=SCHEDULE_STEPS, checkpoint_every=2), run, tiny_data(),
                progress=False)
    trained = _flat(out["state"].params)
    scanned = tiny_config(tiny_base, steps=1, init_from=run)
    scanned.model.scan_layers = True
    setup = build_setup(scanned, log_fn=_quiet)
    got = _flat(setup.trainable)
    for k, v in scan_layout.stack_layers(trained).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    resume = tiny_config(tiny_base, steps=4)
    resume.model.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers=False"):
        train(resume, run, tiny_data(), progress=False)


def test_export_from_the_scanned_layout_writes_the_same_hf_tensors(tiny_base, tmp_path):
    wavlm_cfg, t5_cfg, _ = base_ckpt.load_model_config(tiny_base)
    base = base_ckpt.load_base_params(tiny_base)
    for name, export, cfg in (("t5", export_t5, t5_cfg), ("wavlm", export_wavlm, wavlm_cfg)):
        a = export(cfg, base[name], str(tmp_path / f"{name}_unrolled"))
        b = export(cfg, scan_layout.tree_to_layout(base[name], True), str(tmp_path / f"{name}_scanned"))
        ta = safetensors.numpy.load_file(os.path.join(a, "model.safetensors"))
        tb = safetensors.numpy.load_file(os.path.join(b, "model.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


# Both policies go through one wrapper (models/layers.py `remat`), so each layout checks one of them.
@pytest.mark.parametrize("scan,policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_gradients_equal_plain_gradients(tiny_base, scan, policy):
    """The same train step with remat none and `policy`: same loss and gradients."""
    import optax

    results = {}
    batch = {k: jnp.asarray(v) for k, v in tiny_data().eval_batches()[0].items()}
    for remat in ("none", policy):
        config = tiny_config(tiny_base)
        config.model.scan_layers = scan
        config.model.remat = remat
        config.model.t5_dropout_rate = 0.0
        setup = build_setup(config, log_fn=_quiet)
        sgd = optax.sgd(1.0)  # update = -grad: the new params give the gradients back
        step = make_train_step(setup.model, sgd, lambda s: 1.0)
        from speechverse_jax.train.step import init_state

        state = init_state(setup.trainable, sgd, 0)
        new, metrics = jax.jit(step)(state, setup.frozen, batch)
        grads = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new.params)
        results[remat] = (float(metrics["loss"]), _flat(grads))
    loss, grads = results["none"]
    assert any(np.abs(g).max() > 0 for g in grads.values())
    other_loss, other = results[policy]
    assert abs(other_loss - loss) <= 1e-6 * abs(loss)
    for k in grads:
        np.testing.assert_allclose(other[k], grads[k], rtol=1e-5, atol=1e-7, err_msg=f"{policy} {k}")
