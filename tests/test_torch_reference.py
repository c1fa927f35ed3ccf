"""One training step of ours against the PyTorch reference (bench/torch_reference.py): same loss,
same gradients, same updated trainable params, from the same weights and batch."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import train_step as bench  # noqa: E402

SPEC = dict(wavlm={}, t5={"vocab_size": 128}, layer_combination="weighted", lora=(4, 8.0),  # hf_tiny's TINY_*
            batch=3, seconds=0.5, instruction_len=6, target_len=7)
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # per leaf: max |ours - torch| / max |torch|


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    import torch
    import torch_reference as ref

    torch.manual_seed(0)
    folders = bench.make_backbones(SPEC, str(tmp_path_factory.mktemp("backbones")))
    batch = bench.make_batch(SPEC, seed=3)
    ours = bench.JaxSide(SPEC, folders)
    theirs = ref.TorchSpeechVerse(folders["wavlm"], folders["t5"], ours.cfg)
    ref.load_ours(theirs, ours.trainable_init)
    theirs.train()
    return ours, theirs, batch


def test_frozen_split_matches(sides):
    import torch_reference as ref

    ours, theirs, _ = sides
    mapping = ref.trainable_map(theirs)
    train = {k for k, v in ours.labels.items() if v == "train"}
    assert set(mapping) == train
    assert any("/lora_a" in k for k in train) and "layer_weights/weights" in train
    n_torch = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_torch == sum(v.size for v in ours.trainable_init.values())
    assert not any(p.requires_grad for p in theirs.wavlm.parameters())


def test_two_train_steps_match_torch(sides):
    import jax.numpy as jnp
    from flax import traverse_util

    import torch_reference as ref

    ours, theirs, batch = sides
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    tbatch = ref.torch_batch(batch)
    optim = bench.optim_config()
    opt = ref.make_optimizer(theirs, float(optim.lr), float(optim.b1), float(optim.b2), float(optim.eps),
                             float(optim.weight_decay))

    loss0, grads = ours.grads(jbatch)
    state = ours.init_state()
    step, _, flops, _ = ours.compile_step(state, jbatch)
    assert flops > 0
    losses = []
    for i in range(2):
        state, metrics = step(state, ours.frozen, jbatch)
        t_loss, t_norm = ref.train_step(theirs, opt, tbatch, float(optim.clip_norm), keep_grads=(i == 0))
        losses.append((float(metrics["loss"]), t_loss))
        np.testing.assert_allclose(float(metrics["grad_norm"]), t_norm, rtol=GRAD_RTOL, err_msg=f"step {i}")
        if i == 0:
            np.testing.assert_allclose(loss0, t_loss, rtol=LOSS_RTOL)
            cmp = bench.compare_trees(grads, theirs.last_grads)
            assert cmp["max_rel"] < GRAD_RTOL, cmp
            assert all(np.abs(g).max() > 0 for g in grads.values())  # every trainable gets a gradient
    for ours_loss, torch_loss in losses:
        np.testing.assert_allclose(ours_loss, torch_loss, rtol=LOSS_RTOL)
    assert losses[1][0] < losses[0][0]  # the update did something
    after = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.params, sep="/").items()}
    init = ours.trainable_init
    update = bench.compare_trees({k: after[k] - init[k] for k in init},
                                 {k: v - init[k] for k, v in ref.to_ours(theirs).items()})
    # Two AdamW steps move each value by up to about 2 lr, and a wrong lr, decay, clip or sign moves
    # it by ~lr. Where a gradient is near zero Adam's m / sqrt(v) amplifies float32 rounding (we
    # see ~2e-3 lr), hence 1e-2 lr.
    assert update["max_abs"] < 1e-2 * float(optim.lr), update


def test_the_comparison_can_fail(sides):
    """A classic LoRA bug on the torch side (scaling 1/rank instead of alpha/rank) is caught."""
    import jax.numpy as jnp

    import torch_reference as ref

    ours, theirs, batch = sides
    loss, grads = ours.grads({k: jnp.asarray(v) for k, v in batch.items()})
    ref.load_ours(theirs, ours.trainable_init)  # back to the common init (the test above trained it)
    tbatch = ref.torch_batch(batch)
    lora = [m for m in theirs.t5.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    assert lora
    try:
        for m in lora:
            m.scaling["default"] = 1.0 / ours.cfg.lora.rank
        theirs.zero_grad(set_to_none=True)
        wrong = ref.loss_fn(theirs, tbatch)
        wrong.backward()
        wrong_grads = ref.to_ours(theirs, grads=True)
    finally:
        for m in lora:
            m.scaling["default"] = ours.cfg.lora.scale
        theirs.zero_grad(set_to_none=True)
    assert abs(float(wrong) - loss) / abs(loss) > 10 * LOSS_RTOL
    assert bench.compare_trees(grads, wrong_grads)["max_rel"] > 100 * GRAD_RTOL
    with_right = float(ref.loss_fn(theirs, tbatch))
    np.testing.assert_allclose(with_right, loss, rtol=LOSS_RTOL)
