"""`model.scan_layers` on the decoder-only layout: the LLM's layers under nn.scan (params stacked on a
leading `layers` axis) give the unrolled model's logits, gradients (with and without remat), train
losses and generations; converted bases, LoRA rules and `train.init_from` work across the layouts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speechverse_jax import checkpoints, hf_tiny, tree  # noqa: E402
from speechverse_jax.decode.generate import GenerateConfig  # noqa: E402
from speechverse_jax.decode.generate_decoder import generate_lm  # noqa: E402
from speechverse_jax.models import scan_layout  # noqa: E402
from speechverse_jax.models.decoder_lm import DecoderLM, DecoderLMConfig  # noqa: E402
from speechverse_jax.models.layers import LoRAConfig  # noqa: E402
from speechverse_jax.train import curriculum  # noqa: E402
from speechverse_jax.train.checkpoint import load_trainable_params  # noqa: E402
from speechverse_jax.train.loop import build_setup, train  # noqa: E402

import test_decoder_train  # noqa: E402
from test_decoder_train import stage_config  # noqa: E402

# the converted tiny bases ('llama' with a chat template, 'qwen2') and manifests of that module
bases, manifests = test_decoder_train.bases, test_decoder_train.manifests


def _flat(t):
    return {k: np.asarray(v) for k, v in tree.flatten(t).items()}


def _quiet(*a, **k):
    pass


def test_layout_helpers_stack_the_llm_layers_only():
    flat = {"llm/layers_0/self_attention/q/kernel": np.zeros((2, 3)), "llm/layers_1/self_attention/q/kernel": np.ones((2, 3)),
            "llm/embed_tokens/embedding": np.ones((5, 2)), "wavlm/encoder/layers_0/x": np.ones(1),
            "wavlm/encoder/layers_1/x": np.ones(1), "wavlm/encoder/layers_2/x": np.ones(1) * 2}
    stacked = scan_layout.stack_layers(flat)
    assert stacked["llm/layers/self_attention/q/kernel"].shape == (2, 2, 3) and scan_layout.is_scanned(stacked)
    assert stacked["wavlm/encoder/layers/x"].shape == (2, 1) and "wavlm/encoder/layers_0/x" in stacked
    back = scan_layout.unstack_layers(stacked)
    assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
    # the DecoderLM params alone (no 'llm/' prefix)
    alone = scan_layout.stack_layers({"layers_0/mlp/up/kernel": np.zeros(2), "layers_1/mlp/up/kernel": np.ones(2)})
    assert list(alone) == ["layers/mlp/up/kernel"] and alone["layers/mlp/up/kernel"].shape == (2, 2)


def _lm(family, base=None):
    """(config, unrolled params) of a converted tiny base, or of a random tiny model (gemma3)."""
    if base is not None:
        _, _, llm_cfg, _ = checkpoints.load_base_config(base)
        return llm_cfg, checkpoints.load_base_params(base)["llm"]
    cfg = DecoderLMConfig.from_hf(dict(hf_tiny.TINY_DECODER_LMS[family], model_type="gemma3_text", vocab_size=64))
    params = nn.unbox(DecoderLM(cfg).init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 2), jnp.int32))["params"])
    rng = jax.random.PRNGKey(3)  # Gemma's norm scales init to 0: perturb everything
    return cfg, jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(rng, a.shape, a.dtype), params)


@pytest.mark.parametrize("family,remat", [("llama", "full"), ("qwen2", "none"), ("gemma3", "dots_saveable")])
def test_scanned_lm_gives_the_unrolled_logits_and_gradients(bases, family, remat):
    """Logits and parameter gradients (LoRA on q, v), scanned (with or without remat) vs unrolled;
    Gemma 3's alternating sliding-window layers and local/global RoPE come in as scanned inputs."""
    cfg, params = _lm(family, bases.get(family))
    lora = LoRAConfig(rank=2)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    mask = jnp.ones((2, 9), bool).at[0, :3].set(False)  # left padding on one row
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 9, cfg.vocab_size))
    plain = DecoderLM(cfg, lora=lora)
    adapters = nn.unbox(plain.init(jax.random.PRNGKey(0), input_ids=ids)["params"])
    # the converted base, plus LoRA adapters with b != 0 so their gradients reach a too
    full = tree.unflatten({**tree.flatten(adapters), **tree.flatten(params)})
    flat = tree.flatten(full)
    for k in flat:
        if k.endswith("lora_b"):
            flat[k] = 0.1 * jax.random.normal(jax.random.PRNGKey(4), flat[k].shape)
    full = tree.unflatten(flat)

    def loss_fn(model):
        def f(p):
            logits = model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits
            return jnp.sum(jnp.where(mask[..., None], logits * weights, 0.0)), logits
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, want_logits), want_grads = loss_fn(plain)(full)
    stacked = scan_layout.tree_to_layout(full, True)
    assert "layers" in stacked and "layers_0" not in stacked
    assert stacked["layers"]["self_attention"]["q"]["lora_a"].shape[0] == cfg.num_hidden_layers
    want_grads = _flat(scan_layout.tree_to_layout(want_grads, True))
    (_, logits), grads = loss_fn(DecoderLM(cfg, lora=lora, scan_layers=True, remat=remat))(stacked)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=2e-5)
    grads = _flat(grads)
    assert set(grads) == set(want_grads)
    for k in grads:  # float32 sums over a differently fused graph: within 1e-3 of each gradient's scale
        scale = max(float(np.abs(want_grads[k]).max()), 1e-6)
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-3, atol=1e-3 * scale, err_msg=k)
    assert all(np.abs(grads[k]).max() > 0 for k in grads if "/lora_" in k)  # the adapters are trained


def test_generation_from_scanned_params_equals_unrolled(bases):
    """Greedy and beam search through the scanned prefill / decode_step (stacked KV cache)."""
    cfg, params = _lm("llama", bases["llama"])
    stacked = scan_layout.tree_to_layout(params, True)
    emb = jax.random.normal(jax.random.PRNGKey(5), (2, 7, cfg.hidden_size))
    mask = jnp.ones((2, 7), bool).at[1, :2].set(False)
    for beams in (1, 2):
        gen = GenerateConfig(max_new_tokens=5, num_beams=beams)
        want = generate_lm(DecoderLM(cfg), params, emb, mask, gen, eos_token_id=0)
        got = generate_lm(DecoderLM(cfg, scan_layers=True), stacked, emb, mask, gen, eos_token_id=0)
        np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=f"beams {beams}")
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_train_steps_init_from_and_infer_across_layouts(bases, manifests, tmp_path):
    """Stage 2 (LoRA on the LLM's q, v) on the converted llama base: the scanned run (remat full)
    loads the unrolled base into stacked params, trains with the unrolled run's losses, continues
    an unrolled run through train.init_from, and generates through the API as the unrolled model."""
    from speechverse_jax.api import SpeechVerseModel

    base = bases["llama"]
    base_params = scan_layout.stack_layers(_flat(checkpoints.load_base_params(base)))
    # a common start: LoRA's `a` is initialised per layout (nn.scan splits the init RNG), so both
    # runs continue one unrolled run (train.init_from converts it into the stacked layout)
    start = stage_config(base, "stage2_warmup", manifests["asr4"], 1, checkpoint_every=1, eval_every=1000)
    train(start, str(tmp_path / "start"), curriculum.make_data(start), progress=False)
    losses = {}
    for scan in (False, True):
        config = stage_config(base, "stage2_warmup", manifests["asr4"], 3, checkpoint_every=3, eval_every=1000,
                              init_from=str(tmp_path / "start"))
        config.model.scan_layers = scan
        config.model.remat = "full" if scan else "none"
        run = str(tmp_path / f"scan{int(scan)}")
        if scan:  # init_from into the scanned layout: the unrolled run's trainables, stacked
            got = _flat(build_setup(config, log_fn=_quiet).trainable)
            trained = scan_layout.stack_layers(load_trainable_params(str(tmp_path / "start")))
            assert "llm/layers/self_attention/v/lora_b" in trained and set(trained) == set(got)
            for k in trained:
                np.testing.assert_array_equal(got[k], np.asarray(trained[k]), err_msg=k)
        out = train(config, run, curriculum.make_data(config), progress=False)
        rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
        losses[scan] = [r["loss"] for r in rows if r["kind"] == "train"]
        if scan:
            frozen, trainable = _flat(out["setup"].frozen), _flat(out["state"].params)
            assert "llm/layers/mlp/up/kernel" in frozen and "wavlm/encoder/layers/attention/q/kernel" in frozen
            for k, v in base_params.items():  # the unrolled base, stacked, bit for bit
                np.testing.assert_array_equal(frozen[k], v, err_msg=k)
            lora = sorted(k for k in trainable if "/lora_" in k)
            assert lora == [f"llm/layers/self_attention/{p}/lora_{ab}" for p in "qv" for ab in "ab"], lora
            assert trainable["llm/layers/self_attention/q/lora_a"].shape[0] == 2  # the layers axis
            assert not any("/lora_" in k for k in frozen)
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)

    # infer from the scanned run: the same answers as its params unrolled in an unrolled model
    scanned = SpeechVerseModel.from_run(str(tmp_path / "scan1"), "latest")
    assert scanned.cfg.scan_layers and "layers" in scanned.params["llm"]
    unrolled = SpeechVerseModel(dataclasses.replace(scanned.cfg, scan_layers=False),
                                scan_layout.tree_to_layout(scanned.params, False), scanned.tokenizer)
    unrolled.max_audio_seconds = scanned.max_audio_seconds
    audio = [np.asarray(jax.random.normal(jax.random.PRNGKey(6), (12000,)) * 0.1)]
    want = unrolled.generate(audio, ["Transcribe the audio."], max_new_tokens=6)
    assert scanned.generate(audio, ["Transcribe the audio."], max_new_tokens=6) == want

    # resuming the scanned run unrolled: refused, naming the field, and the run folder left as it was
    resume = stage_config(base, "stage2_warmup", manifests["asr4"], 4, checkpoint_every=3, eval_every=1000)
    config_json = (tmp_path / "scan1" / "config.json").read_text()
    with pytest.raises(ValueError, match="scan_layers=True"):
        train(resume, str(tmp_path / "scan1"), curriculum.make_data(resume), progress=False)
    assert (tmp_path / "scan1" / "config.json").read_text() == config_json
