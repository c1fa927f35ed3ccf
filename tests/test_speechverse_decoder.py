"""SpeechVerse on a decoder-only LLM: chat-template prompt split at the audio placeholder,
packing with left/right padding, answer-only loss against HF's own loss, LoRA paths, generation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speechverse_jax import hf_tiny  # noqa: E402
from speechverse_jax.convert.decoder_lm import convert_decoder_lm  # noqa: E402
from speechverse_jax.convert.hf_io import HFCheckpoint  # noqa: E402
from speechverse_jax.convert.wavlm import convert_wavlm  # noqa: E402
from speechverse_jax.decode.generate import GenerateConfig  # noqa: E402
from speechverse_jax.models.decoder_lm import positions_from_mask  # noqa: E402
from speechverse_jax.models.downsampler import Downsampler  # noqa: E402
from speechverse_jax.models.layers import LoRAConfig  # noqa: E402
from speechverse_jax.decode.generate_decoder import _prompt, generate_from_audio as generate  # noqa: E402
from speechverse_jax.models.speechverse_decoder import (  # noqa: E402
    ANSWER, SpeechVerseDecoder, SpeechVerseDecoderConfig, answer_ids, answer_loss, pack_segments, prompt_parts)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["USER", "ASSISTANT", ":", "transcribe", "the", "audio", "what", "is", "intent", "turn", "on", "lights",
         "play", "music", "set", "an", "alarm"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE if chat else None
    return fast


def test_prompt_parts_chat_template_and_plain():
    chat = _tokenizer(True)
    ids = {t: chat.convert_tokens_to_ids(t) for t in SPECIALS + WORDS}
    prefix, suffix = prompt_parts(chat, "transcribe the audio")
    assert prefix == [ids["<bos>"], ids["<|user|>"]]
    assert suffix == [ids["transcribe"], ids["the"], ids["audio"], ids["<|end|>"], ids["<|assistant|>"]]
    plain = _tokenizer(False)
    prefix, suffix = prompt_parts(plain, "what is the intent")
    assert prefix == [ids["<bos>"], ids["USER"], ids[":"]]
    assert suffix == [ids[w] for w in ("what", "is", "the", "intent", "ASSISTANT", ":")]
    assert answer_ids(plain, "play music") == [ids["play"], ids["music"], ids["<eos>"]]
    with pytest.raises(ValueError, match="chat_template"):
        prompt_parts(plain, "x", use_chat_template=True)


def test_pack_segments_left_and_right():
    e = lambda v, n: jnp.full((2, n, 1), v, jnp.float32)  # noqa: E731
    a = (e(1, 3), jnp.array([[5, 6, 7], [5, 0, 0]]), jnp.array([[1, 1, 1], [1, 0, 0]], bool))
    b = (e(2, 2), jnp.array([[8, 9], [8, 9]]), jnp.array([[1, 0], [1, 1]], bool))
    right = pack_segments([a, b])
    assert right.ids.tolist() == [[5, 6, 7, 8, -1], [5, 8, 9, -1, -1]]
    assert right.segments.tolist() == [[0, 0, 0, 1, -1], [0, 1, 1, -1, -1]]
    left = pack_segments([a, b], left_pad=True)
    assert left.ids.tolist() == [[-1, 5, 6, 7, 8], [-1, -1, 5, 8, 9]]
    assert left.embeddings[1, :, 0].tolist() == [0, 0, 1, 2, 2]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd")
    wcfg, wparams = convert_wavlm(HFCheckpoint(hf_tiny.save_wavlm(str(root / "wavlm"), family="large")), dtype=np.float32)
    lm_dir = hf_tiny.save_decoder_lm(str(root / "lm"), "gemma2")
    lcfg, lparams = convert_decoder_lm(HFCheckpoint(lm_dir), dtype=np.float32)
    cfg = SpeechVerseDecoderConfig(wavlm=wcfg, llm=lcfg)
    tok = _tokenizer(True)
    rng = np.random.default_rng(0)
    lengths = [1600, 960]
    audio = np.zeros((2, max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        audio[i, :n] = rng.standard_normal(n) * 0.1
    audio_mask = np.arange(audio.shape[1])[None] < np.array(lengths)[:, None]

    def batch(rows):
        width = max(len(r) for r in rows)
        ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
        return jnp.asarray(ids), jnp.asarray(np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], bool))

    parts = [prompt_parts(tok, "transcribe the audio"), prompt_parts(tok, "what is the intent")]
    prefix = batch([p for p, _ in parts])
    suffix = batch([s for _, s in parts])
    answer = batch([answer_ids(tok, "turn on the lights"), answer_ids(tok, "play music")])
    args = (jnp.asarray(audio), jnp.asarray(audio_mask), *prefix, *suffix, *answer)
    # the trainable adaptor gets a random init; layer_combination 'last' has no params
    down = Downsampler(features=lcfg.hidden_size, strides=cfg.downsample_strides, kernel_size=cfg.downsample_kernel)
    frames = jnp.zeros((1, 8, wcfg.hidden_size))
    dparams = nn.unbox(down.init(jax.random.PRNGKey(0), frames, jnp.ones((1, 8), bool))["params"])
    params = dict(wavlm=wparams, downsampler=dparams, llm=lparams)
    return dict(cfg=cfg, params=params, args=args, lm_dir=lm_dir, answer=answer)


def test_answer_only_loss_matches_hf_and_padding_side(composed):
    cfg, params, args = composed["cfg"], composed["params"], composed["args"]
    model = SpeechVerseDecoder(cfg)

    hidden, frames = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m, method=SpeechVerseDecoder.encode_audio))(
        params, args[0], args[1])

    @functools.partial(jax.jit, static_argnums=1)
    def run(params, left):
        def fn(m, *a):
            logits, targets, mask = m.from_hidden_states(hidden, frames, *a, left_pad=left)
            packed = m.pack(m.adapt(hidden, frames), *a, left_pad=left)
            return logits, targets, mask, packed
        return model.apply({"params": params}, *args[2:], method=fn)

    out = {}
    for left in (False, True):
        logits, targets, mask, packed = run(params, left)
        loss, per_example = answer_loss(logits, targets, mask)
        out[left] = per_example
        answer_mask = composed["answer"][1]
        assert int(mask.sum()) == int(answer_mask.sum())  # answer tokens and EOS only
        # HF: the same embeddings with labels = -100 everywhere but the answer tokens
        labels = np.where(np.asarray(packed.segments) == ANSWER, np.asarray(packed.ids), -100)
        hf = transformers.AutoModelForCausalLM.from_pretrained(composed["lm_dir"], attn_implementation="eager").eval()
        with torch.no_grad():
            ref = hf(inputs_embeds=torch.from_numpy(np.array(packed.embeddings)),
                     attention_mask=torch.from_numpy(np.asarray(packed.mask).astype(np.int64)),
                     position_ids=torch.from_numpy(np.asarray(positions_from_mask(packed.mask)).astype(np.int64)),
                     labels=torch.from_numpy(labels.astype(np.int64)))
        assert float(loss) == pytest.approx(float(ref.loss), rel=1e-5)
    np.testing.assert_allclose(np.asarray(out[True]), np.asarray(out[False]), rtol=1e-5)


def test_lora_on_the_llm_through_the_same_regex(composed):
    cfg = SpeechVerseDecoderConfig(wavlm=composed["cfg"].wavlm, llm=composed["cfg"].llm, lora=LoRAConfig(rank=2))
    shapes = jax.eval_shape(lambda r: SpeechVerseDecoder(cfg).init(r, *composed["args"]), jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(nn.unbox(shapes)["params"], sep="/")
    adapted = sorted(k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_a"))
    assert adapted == [f"llm/layers_{i}/self_attention/{p}" for i in range(cfg.llm.num_hidden_layers) for p in "qv"]


def test_generation_from_audio_matches_hf_generate(composed):
    cfg, params, args = composed["cfg"], composed["params"], composed["args"]
    out = generate(cfg, params, *args[:6], GenerateConfig(max_new_tokens=6), eos_token_id=2, pad_token_id=0)
    packed = _prompt(cfg, params, *args[:6])  # the jitted prompt builder `generate` used
    hf = transformers.AutoModelForCausalLM.from_pretrained(composed["lm_dir"], attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=torch.from_numpy(np.array(packed.embeddings)),
                          attention_mask=torch.from_numpy(np.asarray(packed.mask).astype(np.int64)),
                          max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2).numpy()
    for row, n, r in zip(np.asarray(out.tokens), np.asarray(out.lengths), ref.tolist()):
        assert row[:n].tolist() == r[:n]


def test_convert_cli_llm_verify_writes_a_loadable_base(composed, tmp_path):
    from speechverse_jax import checkpoints
    from speechverse_jax.cli import main
    from speechverse_jax.convert.pipeline_decoder import load_decoder_model_config

    wavlm_dir = str(tmp_path / "wavlm")
    hf_tiny.save_wavlm(wavlm_dir, family="large")
    out = str(tmp_path / "base")
    assert main(["convert", "--wavlm", wavlm_dir, "--llm", composed["lm_dir"], "--out", out, "--verify"]) == 0
    wcfg, lcfg, raw = load_decoder_model_config(out)
    assert lcfg == composed["cfg"].llm and wcfg == composed["cfg"].wavlm and raw["llm_type"] == "decoder"
    params = checkpoints.load_base_params(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["llm"], composed["params"]["llm"])
    with open(f"{out}/verify_report.json") as f:
        report = __import__("json").load(f)
    names = [r["tensor"] for r in report["verify"]["results"]]
    assert report["verify"]["passed"] and "llm.logits" in names
    assert sum(n.startswith("llm.hidden_states") for n in names) == lcfg.num_hidden_layers + 1
    assert main(["convert", "--wavlm", wavlm_dir, "--out", str(tmp_path / "x")]) == 2  # neither --t5 nor --llm
