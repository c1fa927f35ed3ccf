"""Jitted greedy / beam search: token-for-token parity with HF `generate` on converted tiny T5s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechverse_jax import hf_tiny
from speechverse_jax.convert.hf_io import HFCheckpoint
from speechverse_jax.convert.t5 import convert_t5
from speechverse_jax.decode.generate import GenerateConfig, batch_bucket, generate
from speechverse_jax.models.t5 import T5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = hf_tiny.TINY_T5["eos_token_id"]
PAD = hf_tiny.TINY_T5["pad_token_id"]
MAX_NEW = 14
ENC_LENGTHS = (20, 7, 13, 20, 3, 16)  # 6 rows: padded to a bucket of 8 inside `generate`


def _save_varied(folder, flan, seed, eos_scale, embed_scale=1.0):
    """A tiny HF T5 whose outputs vary: EOS output row scaled so EOS comes mid-sequence in some rows
    only; tied (v1) models also get a smaller embedding, else they repeat their input token."""
    hf_tiny.save_t5(folder, flan=flan, seed=seed)
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        model.shared.weight *= embed_scale
        model.lm_head.weight[EOS] *= eos_scale  # tied models: this is the shared embedding row
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, flan, seed, eos_scale, embed_scale in (("flan", True, 0, 3.0, 1.0), ("v1", False, 1, 2.0, 0.05)):
        folder = _save_varied(str(root / name), flan, seed, eos_scale, embed_scale)
        cfg, params = convert_t5(HFCheckpoint(folder))
        hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
        out[name] = (T5(cfg), params, hf)
    return out


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    b, s = len(ENC_LENGTHS), max(ENC_LENGTHS)
    mask = np.arange(s)[None] < np.array(ENC_LENGTHS)[:, None]
    embeds = rng.standard_normal((b, s, hf_tiny.TINY_T5["d_model"])).astype(np.float32)
    embeds[~mask] = 5.0  # garbage in the padding must not leak
    return embeds, mask


def _until_eos(row):
    row = [int(x) for x in row]
    return row[: row.index(EOS) + 1] if EOS in row else row


def _hf_generate(hf, inputs, **kw):
    embeds, mask = (torch.from_numpy(x) for x in (inputs[0], inputs[1].astype(np.int64)))
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                          return_dict_in_generate=True, output_scores=True, **kw)
    seqs = [_until_eos(r[1:]) for r in out.sequences.numpy()]  # drop the decoder start token
    return seqs, (None if out.get("sequences_scores") is None else out.sequences_scores.numpy())


def _ours(model, params, inputs, cfg, **kw):
    embeds, mask = inputs
    enc = model.apply({"params": params}, jnp.asarray(embeds), jnp.asarray(mask), method=T5.encode)
    out = generate(model, params, enc, jnp.asarray(mask), cfg, **kw)
    tokens, lengths, scores = (np.asarray(x) for x in out)
    assert tokens.shape == (len(ENC_LENGTHS), cfg.max_new_tokens)
    for row, n in zip(tokens, lengths):  # pad after EOS, lengths count EOS
        assert (row[n:] == PAD).all() and (n == cfg.max_new_tokens or row[n - 1] == EOS)
    return [list(map(int, r[:n])) for r, n in zip(tokens, lengths)], scores, enc


def _teacher_forced_logprob(model, params, enc, mask, seqs):
    """Sum of log-probs of each sequence under teacher forcing."""
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t + 1), PAD, np.int32)
    for i, s in enumerate(seqs):
        ids[i, 1 : len(s) + 1] = s
    logits = model.apply({"params": params}, jnp.asarray(ids[:, :-1]), enc, jnp.asarray(mask), method=T5.decode)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    return np.array([sum(logp[i, j, tok] for j, tok in enumerate(s)) for i, s in enumerate(seqs)])


@pytest.mark.parametrize("style", ["flan", "v1"])
def test_greedy_matches_hf(style, models, inputs):
    model, params, hf = models[style]
    for min_new in (0, 4):
        ref, _ = _hf_generate(hf, inputs, num_beams=1, min_new_tokens=min_new)
        ours, scores, enc = _ours(model, params, inputs, GenerateConfig(MAX_NEW, min_new_tokens=min_new))
        print(style, min_new, ours)
        assert ours == ref
        lengths = [len(s) for s in ours]
        assert min(lengths) >= max(min_new, 1)
        if min_new == 0:  # the test is meaningful: some rows stop early, others run to the cap
            assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW and ours[0] != ours[1]
            np.testing.assert_allclose(scores, _teacher_forced_logprob(model, params, enc, inputs[1], ours),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style,length_penalty,min_new", [("flan", 1.2, 0), ("v1", 0.6, 0), ("v1", 2.0, 3)])
def test_beam_search_matches_hf(style, length_penalty, min_new, models, inputs):
    model, params, hf = models[style]
    ref, ref_scores = _hf_generate(hf, inputs, num_beams=4, length_penalty=length_penalty, early_stopping=False,
                                   min_new_tokens=min_new)
    cfg = GenerateConfig(MAX_NEW, num_beams=4, length_penalty=length_penalty, min_new_tokens=min_new)
    ours, scores, enc = _ours(model, params, inputs, cfg)
    print(style, ours)
    assert ours == ref
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-5)
    lengths = np.array([len(s) for s in ours])
    np.testing.assert_allclose(scores, _teacher_forced_logprob(model, params, enc, inputs[1], ours)
                               / lengths ** length_penalty, rtol=1e-4, atol=1e-5)
    assert lengths.min() < MAX_NEW and lengths.max() == MAX_NEW  # EOS mid-way in some rows only
    greedy, _, _ = _ours(model, params, inputs, GenerateConfig(MAX_NEW))
    assert ours != greedy  # beam search is doing something


def test_bucketing_does_not_change_results(models, inputs):
    model, params, _ = models["flan"]
    embeds, mask = inputs
    enc = model.apply({"params": params}, jnp.asarray(embeds), jnp.asarray(mask), method=T5.encode)
    cfg = GenerateConfig(MAX_NEW)
    a = generate(model, params, enc, jnp.asarray(mask), cfg)
    b = generate(model, params, enc, jnp.asarray(mask), cfg, bucket=False)
    one = generate(model, params, enc[2:3], jnp.asarray(mask[2:3]), cfg)  # alone in its batch
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens[2:3], one.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert [batch_bucket(n) for n in (1, 2, 3, 6, 8, 9)] == [1, 2, 4, 8, 8, 16]
