"""`model.loss_chunk`: the training loss's LM head and softmax run a few target positions at a time
(nn.scan + nn.remat), in both layouts. Same loss and gradients as the whole-logits loss, and the
compiled step needs less temporary memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from speechverse_jax import hf_tiny, tree
from speechverse_jax.models.decoder_lm import DecoderLMConfig
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax.models.speechverse import SpeechVerse, SpeechVerseConfig, init_params
from speechverse_jax.models.speechverse_decoder import SpeechVerseDecoder, SpeechVerseDecoderConfig
from speechverse_jax.models.speechverse_decoder import init_params as init_decoder_params
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig
from speechverse_jax.train.step import _loss_sums

WAVLM = WavLMConfig.from_hf(dict(hf_tiny.TINY_WAVLM, feat_extract_norm="group", do_stable_layer_norm=False,
                                 conv_bias=False, hidden_act="gelu", feat_extract_activation="gelu",
                                 layer_norm_eps=1e-5))


def _t5_cfg(vocab=96, tied=False):
    return SpeechVerseConfig(
        wavlm=WAVLM, lora=LoRAConfig(rank=2, alpha=4.0),
        t5=T5Config.from_hf(dict(hf_tiny.TINY_T5, vocab_size=vocab, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=tied, layer_norm_epsilon=1e-6, is_encoder_decoder=True)))


def _decoder_cfg(family, vocab=96):
    llm = DecoderLMConfig.from_hf(dict(hf_tiny.TINY_DECODER_LMS[family], model_type=family, vocab_size=vocab))
    return SpeechVerseDecoderConfig(wavlm=WAVLM, llm=llm, lora=LoRAConfig(rank=2, alpha=4.0))


def _batch(cfg, rows=3, target_len=7, vocab=96, seed=0, frames=24):
    """Cached frozen-encoder states (no WavLM to compile) and random right-padded text parts."""
    rng = np.random.default_rng(seed)
    lens = [target_len, target_len - 3, 2][:rows]
    targets = np.stack([np.where(np.arange(target_len) < n, rng.integers(2, vocab, target_len), 0) for n in lens])
    batch = dict(hidden_states=rng.standard_normal((rows, WAVLM.num_hidden_layers + 1, frames, WAVLM.hidden_size)),
                 frame_mask=np.arange(frames)[None] < np.array([frames, 17, 9][:rows])[:, None],
                 target_ids=targets.astype(np.int32), target_mask=np.arange(target_len)[None] < np.array(lens)[:, None],
                 instruction_ids=rng.integers(2, vocab, (rows, 5)).astype(np.int32),
                 instruction_mask=np.arange(5)[None] < np.array([5, 3, 4][:rows])[:, None])
    batch["hidden_states"] = batch["hidden_states"].astype(np.float32)
    if isinstance(cfg, SpeechVerseDecoderConfig):
        batch.update(prefix_ids=rng.integers(2, vocab, (rows, 3)).astype(np.int32),
                     prefix_mask=np.arange(3)[None] < np.array([3, 2, 3][:rows])[:, None])
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _params(cfg):
    init = init_decoder_params if isinstance(cfg, SpeechVerseDecoderConfig) else init_params
    params = nn.unbox(init(cfg, jax.random.PRNGKey(0)))
    # LoRA b != 0, so the adapters' gradients reach lora_a too
    return jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)


def _loss_and_grads(cfg, params, batch):
    model = (SpeechVerseDecoder if isinstance(cfg, SpeechVerseDecoderConfig) else SpeechVerse)(cfg)
    flat = {k: v for k, v in tree.flatten(params).items() if not k.startswith("wavlm/")}  # cached states instead
    trainable = tree.unflatten({k: v for k, v in flat.items() if "lora_" in k or k.startswith("downsampler/")})
    frozen = tree.unflatten({k: v for k, v in flat.items() if not ("lora_" in k or k.startswith("downsampler/"))})

    def loss(p):
        nll, tokens, _, _ = _loss_sums(model, tree.merge(p, frozen), batch, True, None, 1)
        return nll / tokens

    fn = jax.jit(jax.value_and_grad(loss))
    value, grads = fn(trainable)
    return float(value), tree.flatten(grads), fn.lower(trainable).compile().memory_analysis()


@pytest.mark.parametrize("name,make", [
    ("t5 untied", lambda: _t5_cfg()), ("t5 tied", lambda: _t5_cfg(tied=True)),
    ("llama", lambda: _decoder_cfg("llama")), ("gemma2 soft-capped, tied", lambda: _decoder_cfg("gemma2")),
])
def test_chunked_loss_and_gradients_equal_the_whole_logits_loss(name, make):
    cfg = make()
    params, batch = _params(cfg), _batch(cfg)
    whole, grads, _ = _loss_and_grads(cfg, params, batch)
    assert np.isfinite(whole) and whole > 0
    for chunk in (3, 7):  # 3: 7 positions padded to 9; 7: one chunk
        got, got_grads, _ = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=chunk), params, batch)
        np.testing.assert_allclose(got, whole, rtol=2e-6, err_msg=f"{name}, chunk {chunk}")
        assert set(got_grads) == set(grads) and any("lora_a" in k for k in grads)
        for k in grads:
            np.testing.assert_allclose(got_grads[k], grads[k], rtol=2e-5, atol=1e-7, err_msg=f"{name}, chunk {chunk}: {k}")


@pytest.mark.parametrize("layout", ["t5", "decoder"])
def test_a_chunked_loss_compiles_to_less_temporary_memory(layout):
    """A large vocabulary against few positions: the whole-logits step holds `[b, t, vocab]` in
    float32 (and its gradient); chunks of 4 positions hold a quarter of a 16-position target."""
    vocab = 8192
    cfg = _t5_cfg(vocab) if layout == "t5" else _decoder_cfg("llama", vocab)
    params, batch = _params(cfg), _batch(cfg, target_len=16, vocab=vocab)
    whole, _, mem_whole = _loss_and_grads(cfg, params, batch)
    chunked, _, mem_chunked = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=4), params, batch)
    np.testing.assert_allclose(chunked, whole, rtol=2e-6)
    logits_bytes = 3 * 16 * vocab * 4
    print(f"{layout}: temporaries {mem_whole.temp_size_in_bytes / 1e6:.2f} MB whole, "
          f"{mem_chunked.temp_size_in_bytes / 1e6:.2f} MB in chunks of 4 (logits {logits_bytes / 1e6:.2f} MB)")
    assert mem_chunked.temp_size_in_bytes < mem_whole.temp_size_in_bytes - logits_bytes


def test_a_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="model.loss_chunk"):
        dataclasses.replace(_t5_cfg(), loss_chunk=-1)
    with pytest.raises(ValueError, match="model.loss_chunk"):
        dataclasses.replace(_decoder_cfg("llama"), loss_chunk=-2)


@pytest.mark.parametrize("family,scan", [("llama", False), ("gemma2", True)])
def test_chunked_attention_gives_the_same_logits_gradients_and_generations(family, scan):
    """`model.attention_chunk`: queries 4 at a time (11 positions padded to 12), left padding on one
    row; gemma2 adds the sliding window and the attention soft-cap, scanned layers under remat."""
    from speechverse_jax.decode.generate import GenerateConfig
    from speechverse_jax.decode.generate_decoder import generate_lm
    from speechverse_jax.models.decoder_lm import DecoderLM

    cfg = DecoderLMConfig.from_hf(dict(hf_tiny.TINY_DECODER_LMS[family], model_type=family, vocab_size=96,
                                       **({"sliding_window": 5} if family == "gemma2" else {})))
    lora = LoRAConfig(rank=2, alpha=4.0)
    kw = dict(lora=lora, scan_layers=scan, remat="full" if scan else "none")
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, cfg.vocab_size)
    mask = jnp.ones((2, 11), bool).at[0, :3].set(False)
    params = nn.unbox(DecoderLM(cfg, **kw).init(jax.random.PRNGKey(0), input_ids=ids)["params"])
    params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 11, cfg.vocab_size))

    def run(chunk):
        model = DecoderLM(cfg, attention_chunk=chunk, **kw)

        def loss(p):
            logits = model.apply({"params": p}, input_ids=ids, attention_mask=mask).logits
            return jnp.sum(jnp.where(mask[..., None], logits * weights, 0.0)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        prompt = model.apply({"params": params}, ids, method=DecoderLM.embed)
        out = generate_lm(DecoderLM(cfg, lora=lora, scan_layers=scan, attention_chunk=chunk), params, prompt, mask,
                          GenerateConfig(max_new_tokens=5), eos_token_id=-1)
        return np.asarray(logits), tree.flatten(grads), np.asarray(out.tokens)

    logits, grads, tokens = run(0)
    got_logits, got_grads, got_tokens = run(4)
    real = np.asarray(mask)
    np.testing.assert_allclose(got_logits[real], logits[real], rtol=1e-5, atol=1e-5)
    for k in grads:  # sums over the chunks in another order: compared at the scale of each array
        np.testing.assert_allclose(got_grads[k], grads[k], rtol=0, atol=1e-5 * np.abs(grads[k]).max() + 1e-9,
                                   err_msg=k)
    np.testing.assert_array_equal(got_tokens, tokens)


def test_chunked_attention_compiles_to_less_temporary_memory():
    """The decoder-only step at a 160-position packed sequence: whole attention holds float32 scores
    `[b, heads, T, T]` (and their gradient); chunks of 32 queries hold a fifth of them."""
    cfg = _decoder_cfg("llama")
    params = _params(cfg)
    batch = _batch(cfg, target_len=8, frames=600)  # 600 frames -> 150 audio tokens
    whole, _, mem_whole = _loss_and_grads(cfg, params, batch)
    chunked, _, mem_chunked = _loss_and_grads(dataclasses.replace(cfg, attention_chunk=32), params, batch)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    t = 3 + 150 + 5 + 8
    scores = 3 * cfg.llm.num_attention_heads * t * t * 4
    print(f"temporaries {mem_whole.temp_size_in_bytes / 1e6:.2f} MB whole attention, "
          f"{mem_chunked.temp_size_in_bytes / 1e6:.2f} MB in chunks of 32 (one layer's scores {scores / 1e6:.2f} MB)")
    assert mem_chunked.temp_size_in_bytes < mem_whole.temp_size_in_bytes - scores
