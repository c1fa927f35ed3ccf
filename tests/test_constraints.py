"""Constrained decoding: label tries and the slot automaton, inside jitted greedy and beam search."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from speechverse_jax import hf_tiny
from speechverse_jax.data import tasks
from speechverse_jax.decode import constraints as C
from speechverse_jax.decode.generate import GenerateConfig, Generated, generate, texts
from speechverse_jax.models.t5 import T5, T5Config

EOS, PAD, VOCAB = 1, 0, hf_tiny.TINY_T5["vocab_size"]
MAX_NEW = 12

# A made-up tokenization: labels share prefixes, and "play" is a prefix of "play_radio".
LABEL_IDS = {"alarm_query": [10, 11, 12], "alarm_set": [10, 11, 13], "play_radio": [14, 11, 15],
             "weather_query": [16, 11, 12], "play": [14]}
# Slot vocabulary: pieces by id; 16 and 17 close a value, 18 and 19 hold ';' inside and are banned.
PIECES = [f"▁w{i}" for i in range(VOCAB)]
PIECES[:3] = ["<pad>", "</s>", "<unk>"]
PIECES[10:21] = ["▁date", "▁time", "▁place", "_", "name", "▁=", ";", "▁pm;", ";x", "a;b", "▁none"]
SLOT_IDS = {"date": [10], "time": [11], "place_name": [12, 13, 14], "=": [15], "none": [20]}
SLOTS = ["date", "time", "place_name"]


def slot_ids(text):  # sentencepiece-like: a word spells the same alone and after a space
    return SLOT_IDS[text.strip()]


def label_of(ids):
    return next((name for name, v in LABEL_IDS.items() if v == ids), None)


def slot_text(ids):
    return "".join(PIECES[i] for i in ids).replace("▁", " ").strip()


@pytest.fixture(scope="module")
def model():
    cfg = T5Config(**{k: v for k, v in hf_tiny.TINY_T5.items()}, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    t5 = T5(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(t5.init(jax.random.PRNGKey(3), input_ids=ids, decoder_input_ids=ids))["params"]
    # Make EOS and the ';' tokens likely enough that the free-running model emits them sometimes.
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = kernel.at[:, jnp.array([EOS, 16, 17])].multiply(3.0)
    return t5, params


@pytest.fixture(scope="module")
def encoded(model):
    t5, params = model
    rng = np.random.default_rng(0)
    lengths = np.array([9, 4, 12, 12, 7, 2])
    mask = np.arange(12)[None] < lengths[:, None]
    embeds = jnp.asarray(rng.standard_normal((len(lengths), 12, t5.cfg.d_model)).astype(np.float32))
    return t5.apply({"params": params}, embeds, jnp.asarray(mask), method=T5.encode), jnp.asarray(mask)


def run(model, encoded, cfg, constraint=None):
    t5, params = model
    out = generate(t5, params, *encoded, cfg, constraint=constraint)
    return [list(map(int, r[:n])) for r, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]


def walk(c, ids):
    """Host walk through the automaton (next(s, v) as the module docstring defines it, in numpy;
    the jitted `next_states` is checked against it in test_label_trie_accepts_exactly_the_labels):
    the final state, or -1 when a token is not allowed."""
    default, edge_tokens, edge_next = (np.asarray(a) for a in c)
    state = C.START
    for tok in ids:
        hit = np.flatnonzero(edge_tokens[state] == tok)
        state = int(edge_next[state, hit[0]] if hit.size else default[state])
        if state < 0:
            return -1
    return state


def test_label_trie_accepts_exactly_the_labels():
    c = C.label_constraint(list(LABEL_IDS), LABEL_IDS.__getitem__, EOS)
    start = np.asarray(C.next_states(c, jnp.array([C.START]), VOCAB))[0]
    assert set(np.flatnonzero(start >= 0)) == {10, 14, 16}
    assert [walk(c, [v]) for v in range(VOCAB)] == start.tolist()  # the host walk is next_states
    for ids in LABEL_IDS.values():
        assert walk(c, ids + [EOS]) == C.DONE
        assert walk(c, ids + [EOS, EOS]) == -1  # nothing after EOS
    assert walk(c, [10, 11, EOS]) == -1  # an unfinished label cannot end
    assert walk(c, [14, 11, 12]) == -1  # not a label
    assert walk(c, [14, EOS]) == C.DONE and walk(c, [14, 11, 15, EOS]) == C.DONE  # prefix label
    assert c.default_next.shape[0] & (c.default_next.shape[0] - 1) == 0  # padded to a power of two
    with pytest.raises(ValueError):
        C.label_constraint([], LABEL_IDS.__getitem__, EOS)
    with pytest.raises(ValueError):
        C.label_constraint(["x"], lambda s: [], EOS)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_constrained_outputs_are_labels(num_beams, model, encoded):
    cfg = GenerateConfig(MAX_NEW, num_beams=num_beams)
    free = run(model, encoded, cfg)
    assert not all(label_of(s[:-1]) for s in free)  # unconstrained, the model writes other things
    c = C.label_constraint(list(LABEL_IDS), LABEL_IDS.__getitem__, EOS)
    out = run(model, encoded, cfg, c)
    assert all(s[-1] == EOS and label_of(s[:-1]) for s in out), (num_beams, out)
    assert len({tuple(s) for s in out}) >= 2  # the input decides which label
    single = C.label_constraint(["weather_query"], LABEL_IDS.__getitem__, EOS)
    assert run(model, encoded, cfg, single) == [LABEL_IDS["weather_query"] + [EOS]] * len(out)


def test_constrained_beam_finds_the_best_label(model, encoded):
    """With as many beams as labels, beam search is exhaustive: it returns the label with the best
    length-normalised log-prob under teacher forcing."""
    t5, params = model
    enc, mask = encoded
    labels = ["alarm_query", "alarm_set", "play_radio", "weather_query"]
    lp = 0.7
    c = C.label_constraint(labels, LABEL_IDS.__getitem__, EOS)
    out = run(model, encoded, GenerateConfig(MAX_NEW, num_beams=len(labels), length_penalty=lp), c)
    scores = []
    for label in labels:
        target = np.array(LABEL_IDS[label] + [EOS])
        dec_in = jnp.asarray(np.tile(np.concatenate([[PAD], target[:-1]]), (enc.shape[0], 1)))
        logp = jax.nn.log_softmax(t5.apply({"params": params}, dec_in, enc, mask, method=T5.decode), -1)
        total = np.asarray(logp)[:, np.arange(len(target)), target].sum(-1)
        scores.append(total / len(target) ** lp)
    best = np.argmax(np.stack(scores, 1), 1)
    assert [label_of(s[:-1]) for s in out] == [labels[i] for i in best]


SLOT_ANSWER = re.compile(r"^(none|(\w+ = [^;]+;\s*)+)$")


@pytest.mark.parametrize("num_beams", [1, 4])
def test_slot_constraint_keeps_the_format(num_beams, model, encoded):
    cfg = GenerateConfig(MAX_NEW, num_beams=num_beams)
    c = C.slot_constraint(SLOTS, slot_ids, PIECES, EOS, PAD)
    out = run(model, encoded, cfg, c)
    texts = [slot_text(s[:-1] if s[-1] == EOS else s) for s in out]
    free = [slot_text(s[:-1]) for s in run(model, encoded, cfg)]
    assert not all(SLOT_ANSWER.match(t) for t in free)
    for s, text in zip(out, texts):
        assert walk(C.slot_constraint(SLOTS, slot_ids, PIECES, EOS, PAD), s) >= 0
        if s[-1] == EOS:  # a finished answer has the full format; others were cut by the cap
            assert SLOT_ANSWER.match(text), text
            pairs = tasks.parse_slots(text)
            assert text == "none" or (pairs and all(k in SLOTS for k, _ in pairs))
        else:
            assert len(s) == cfg.max_new_tokens
        assert not {18, 19, PAD} & set(s)
    assert any(s[-1] == EOS for s in out) and sum(t.count(";") for t in texts) >= 3  # values do close


def test_slot_automaton_transitions():
    c = C.slot_constraint(SLOTS, slot_ids, PIECES, EOS, PAD)
    ok = [[20, EOS], [10, 15, 30, 16, EOS], [12, 13, 14, 15, 30, 31, 17, 11, 15, 40, 16, EOS]]
    bad = [[10, EOS], [10, 15, 16], [10, 15, 30, EOS], [10, 15, 30, 18], [30], [10, 15, 30, 16, 20],
           [12, 14], [20, 16]]
    assert all(walk(c, s) == C.DONE for s in ok)
    assert all(walk(c, s) != C.DONE for s in bad)
    assert walk(c, [10, 15, 16]) == -1 and walk(c, [10, 15, 30, EOS]) == -1 and walk(c, [10, 15, 30, 19]) == -1
    # one token that is the whole value and its ";" ("▁pm;", as BPE merges "▁peter;"): closes it
    assert walk(c, [10, 15, 17, EOS]) == C.DONE and walk(c, [10, 15, 17, 11, 15, 30, 16, EOS]) == C.DONE
    assert walk(c, [10, 15, 18]) == -1 and walk(c, [10, 15, 19]) == -1  # ';' elsewhere in a piece


def _byte_level_bpe(texts):
    """A Llama-3 / Qwen-style tokenizer: byte-level BPE, `\u0120` marks a space, punctuation apart."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("kind", ["demo_lm", "byte_level"])
def test_slot_constraint_accepts_every_sf_target(kind):
    """Every SF target of the demo corpus, tokenized as the decoder layout tokenizes answers, walks
    the automaton to DONE.
    - demo_lm: its BPE merges a value with its ';' (`\u2581daniel;`). Such a piece used to be banned
      right after `=`, so constrained SF on the decoder layout wandered off (`person = Intent: peter;
      ...`; SLU-F1 76 free vs 34 constrained).
    - byte_level: a label alone is `da te` but `\u0120date` after `; `, and `=` is `\u0120=` in a
      target; the automaton used to allow only the spellings alone."""
    transformers = pytest.importorskip("transformers")
    from speechverse_jax.demo import corpus, shipped

    targets = sorted({tasks.format_slots(s.slots) for s in corpus.command_sentences()})
    if kind == "demo_lm":
        tok = transformers.AutoTokenizer.from_pretrained(os.path.join(shipped.PRETRAINED_DIR, "lm"))
    else:
        tok = _byte_level_bpe(targets * 3)
    encode, pieces = C.tokenizer_fns(tok)
    c = C.constraint_for_task("sf", tok)

    # the premise: what the old automaton did not allow is in these targets
    if kind == "demo_lm":
        assert any(pieces[i].endswith(";") and len(pieces[i]) > 2 for t in targets for i in encode(t))
    else:
        assert encode("date") != encode(" date") and encode("=") != encode(" =")
    assert walk(c, encode("date = friday;")) >= 0 and walk(c, encode("date = ;")) == -1
    assert walk(c, encode("weekday = friday;")) == -1
    for text in targets + ["none"]:
        assert walk(c, list(encode(text)) + [tok.eos_token_id]) == C.DONE, (text, [pieces[i] for i in encode(text)])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    texts = ["date = tomorrow; time = five pm;", "place_name = paris; person = john;", "none",
             "neutral happy sad angry", "set an alarm for seven", "what is the time in paris"] * 10
    folder = tmp_path_factory.mktemp("spm")
    hf_tiny.train_spiece(texts, str(folder), vocab_size=96)
    return transformers.T5Tokenizer.from_pretrained(str(folder), extra_ids=0, legacy=False)


def test_real_tokenizer_targets_are_accepted(tokenizer):
    """Labels tokenized on their own match their tokenization inside real targets."""
    vocab = len(tokenizer)

    def accepts(c, text):
        state = C.START
        for tok in tokenizer(text)["input_ids"]:  # with the EOS the tokenizer appends
            state = int(np.asarray(C.next_states(c, jnp.array([state]), vocab))[0, tok])
            if state < 0:
                return False
        return state == C.DONE

    sf = C.constraint_for_task("sf", tokenizer)
    for slots in ([("date", "tomorrow"), ("time", "five pm")], [("place_name", "paris"), ("person", "john")], []):
        assert accepts(sf, tasks.format_slots(slots))
    assert not accepts(sf, "weekday = monday;") and not accepts(sf, "date = ;") and not accepts(sf, "date = x")
    er = C.constraint_for_task("er", tokenizer)
    assert all(accepts(er, label) for label in tasks.TASKS["er"].labels)
    assert not accepts(er, "happy sad") and not accepts(er, "surprised")
    custom = C.constraint_for_task("open", tokenizer, labels=["yes", "no"])
    assert accepts(custom, "no") and not accepts(custom, "maybe")
    assert C.constraint_for_task("asr", tokenizer) is None
    ids = [tokenizer(t)["input_ids"] for t in ("happy", "date = five pm;")]
    tokens = np.zeros((2, 16), np.int32)
    for row, seq in zip(tokens, ids):
        row[: len(seq)] = seq
    out = Generated(tokens, np.array([len(i) for i in ids]), np.zeros(2))
    assert texts(tokenizer, out) == ["happy", "date = five pm;"]


def test_load_labels(tmp_path):
    assert C.load_labels("a, b,c") == ["a", "b", "c"]
    path = tmp_path / "labels.txt"
    path.write_text("alarm_set\n\nplay_radio\n")
    assert C.load_labels(str(path)) == ["alarm_set", "play_radio"]
    assert C.load_labels(task="er") == list(tasks.TASKS["er"].labels)
    with pytest.raises(ValueError):
        C.load_labels(task="asr")
    with pytest.raises(ValueError):
        C.load_labels()


def test_a_label_the_tokenizer_cannot_write_is_refused_by_name(tmp_path):
    """A rare character left out of the sentencepiece vocabulary becomes <unk>: 'non-speech' would
    decode as 'nonspeech' and never match its reference (the demo's SNS scored 46% that way)."""
    transformers = pytest.importorskip("transformers")
    texts = ["is there speech in the audio answer with one of speech or nonspeech"] * 200 + ["speech non-speech"]
    for coverage, folder in ((0.9995, "rare_dropped"), (1.0, "all_chars")):
        hf_tiny.train_spiece(texts, str(tmp_path / folder), vocab_size=40, character_coverage=coverage)
    dropped = transformers.T5Tokenizer.from_pretrained(str(tmp_path / "rare_dropped"), extra_ids=0, legacy=False)
    covered = transformers.T5Tokenizer.from_pretrained(str(tmp_path / "all_chars"), extra_ids=0, legacy=False)
    assert dropped.unk_token_id in dropped("non-speech")["input_ids"]  # the premise
    with pytest.raises(ValueError, match=r"cannot write label\(s\) 'non-speech' -> 'nonspeech'"):
        C.constraint_for_task("open", dropped, labels=["speech", "non-speech"])
    c = C.constraint_for_task("open", covered, labels=["speech", "non-speech"])
    assert c is not None
