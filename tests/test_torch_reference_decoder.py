"""The decoder-only layout's training step against the PyTorch reference (bench/torch_reference.py:
HF Llama / Qwen2 causal LM + peft LoRA on q_proj, v_proj, the audio placed in the prompt as ours):
same loss, same gradients, same updated trainable params, from the same weights and batch."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import train_step as bench  # noqa: E402

# hf_tiny's TINY_WAVLM and TINY_DECODER_LMS[family]; 0.5 s of audio = 100 audio tokens in the prompt
SPEC = dict(wavlm={}, llm={"vocab_size": 128}, layer_combination="weighted", lora=(4, 8.0),
            batch=3, seconds=0.5, prefix_len=3, instruction_len=6, target_len=7)
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # per leaf: max |ours - torch| / max |torch|


def _sides(tmp_path_factory, family):
    import torch
    import torch_reference as ref

    torch.manual_seed(0)
    spec = dict(SPEC, family=family)
    folders = bench.make_backbones(spec, str(tmp_path_factory.mktemp(f"dec_{family}")))
    batch = bench.make_batch(spec, seed=3)
    ours = bench.JaxSide(spec, folders)
    theirs = ref.TorchSpeechVerseDecoder(folders["wavlm"], folders["llm"], ours.cfg)
    ref.load_ours(theirs, ours.trainable_init)
    theirs.train()
    return ours, theirs, batch


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    return _sides(tmp_path_factory, "llama")


def test_spec_and_batch():
    spec = bench.size_spec("tiny", "decoder", "qwen2")
    assert spec["family"] == "qwen2" and spec["wavlm"] == bench.size_spec("tiny")["wavlm"]
    batch = bench.make_batch(dict(SPEC, family="llama"))
    assert batch["prefix_ids"].shape == (3, 3) and batch["prefix_mask"][:, 0].all()
    assert (batch["prefix_ids"][~batch["prefix_mask"]] == 0).all()


def test_pack_parts_matches_ours():
    import jax.numpy as jnp
    import torch
    import torch_reference as ref

    from speechverse_jax.models.speechverse_decoder import pack_segments

    rng = np.random.default_rng(0)
    parts = []
    for n in (3, 5, 2):
        e = rng.standard_normal((2, n, 4)).astype(np.float32)
        m = np.arange(n)[None] < rng.integers(0, n + 1, 2)[:, None]
        parts.append((e, m))
    ours = pack_segments([(jnp.asarray(e), jnp.zeros(m.shape, jnp.int32), jnp.asarray(m)) for e, m in parts])
    emb, mask = ref.pack_parts([(torch.from_numpy(e), torch.from_numpy(m)) for e, m in parts])
    np.testing.assert_array_equal(np.asarray(ours.mask), mask.numpy())
    np.testing.assert_array_equal(np.asarray(ours.embeddings), emb.numpy())


def test_frozen_split_matches(sides):
    import torch_reference as ref

    ours, theirs, _ = sides
    mapping = ref.trainable_map(theirs)
    train = {k for k, v in ours.labels.items() if v == "train"}
    assert set(mapping) == train
    assert "llm/layers_0/self_attention/q/lora_a" in train and "layer_weights/weights" in train
    n_torch = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_torch == sum(v.size for v in ours.trainable_init.values())
    assert not any(p.requires_grad for p in theirs.wavlm.parameters())


def _two_steps(ours, theirs, batch):
    import jax.numpy as jnp
    from flax import traverse_util

    import torch_reference as ref

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
    theirs_after = ref.to_ours(theirs)
    update = bench.compare_trees({k: after[k] - init[k] for k in init}, {k: theirs_after[k] - init[k] for k in init})
    # Two AdamW steps move each value by up to about 2 lr; m / sqrt(v) makes the update of a value
    # whose gradient is within float32 rounding of zero (here |g| down to 2e-7 where the gradients
    # differ by up to 7e-7) anything up to ~lr apart. Everywhere: 0.1 lr (we see 2e-2 lr, in the
    # first conv's kernel); where the first gradient is well above rounding: 1e-3 lr.
    lr = float(optim.lr)
    assert update["max_abs"] < 0.1 * lr, update
    g1 = np.concatenate([np.abs(grads[k]).ravel() for k in sorted(init)])
    d = np.concatenate([np.abs((after[k] - init[k]) - (theirs_after[k] - init[k])).ravel() for k in sorted(init)])
    clear = g1 > 1e-3 * g1.max()
    assert clear.mean() > 0.9 and d[clear].max() < 1e-3 * lr, (clear.mean(), d[clear].max() / lr)


def test_two_train_steps_match_torch(sides):
    _two_steps(*sides)


def test_qwen2_loss_and_grads_match_torch(tmp_path_factory):
    """Qwen2 (q/k/v biases, tied embeddings, its RoPE): loss and gradients (the step is the Llama test's)."""
    import jax.numpy as jnp
    import torch_reference as ref

    ours, theirs, batch = _sides(tmp_path_factory, "qwen2")
    loss, grads = ours.grads({k: jnp.asarray(v) for k, v in batch.items()})
    theirs.zero_grad(set_to_none=True)
    t_loss = ref.loss_fn(theirs, ref.torch_batch(batch))
    t_loss.backward()
    np.testing.assert_allclose(loss, float(t_loss.detach()), rtol=LOSS_RTOL)
    cmp = bench.compare_trees(grads, ref.to_ours(theirs, grads=True))
    assert cmp["max_rel"] < GRAD_RTOL, cmp


def test_the_comparison_can_fail(sides):
    """Audio placed one position late on the torch side (an off-by-one in the packing) is caught."""
    import jax.numpy as jnp
    import torch
    import torch_reference as ref

    ours, theirs, batch = sides
    loss, grads = ours.grads({k: jnp.asarray(v) for k, v in batch.items()})
    ref.load_ours(theirs, ours.trainable_init)  # back to the common init (the test above trained it)
    tbatch = ref.torch_batch(batch)
    wrong = dict(tbatch)
    # one more prefix token (a pad id) before the audio: everything after it shifts by one
    wrong["prefix_mask"] = torch.cat([tbatch["prefix_mask"], torch.ones_like(tbatch["prefix_mask"][:, :1])], 1)
    wrong["prefix_ids"] = torch.cat([tbatch["prefix_ids"], torch.zeros_like(tbatch["prefix_ids"][:, :1])], 1)
    for b, n in enumerate(tbatch["prefix_mask"].sum(-1).tolist()):  # keep each row's valid items first
        wrong["prefix_mask"][b] = torch.arange(wrong["prefix_mask"].shape[1]) < n + 1
    theirs.zero_grad(set_to_none=True)
    bad = ref.loss_fn(theirs, wrong)
    bad.backward()
    bad_grads = ref.to_ours(theirs, grads=True)
    theirs.zero_grad(set_to_none=True)
    assert abs(float(bad) - loss) / abs(loss) > 10 * LOSS_RTOL
    assert bench.compare_trees(grads, bad_grads)["max_rel"] > 100 * GRAD_RTOL
    np.testing.assert_allclose(float(ref.loss_fn(theirs, tbatch)), loss, rtol=LOSS_RTOL)
