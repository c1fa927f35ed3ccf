"""Task registry: prompts, label sets, target formats and parsers, joint decoding."""

import numpy as np
import pytest

from speechverse_jax.data import tasks as T

PAPER_TASKS = ["asr", "st", "ic", "sf", "kwe", "kws", "er", "asc", "sc", "ac", "sns"]
EXAMPLE = {"keyword": "radio", "target_language": "de", "transcript": "turn on the radio now"}


def test_registry_covers_the_paper():
    assert list(T.TASK_NAMES) == PAPER_TASKS + ["open"]
    metrics = {n: T.metric_name(n) for n in T.TASK_NAMES}
    assert metrics == {"asr": "wer", "st": "bleu", "ic": "accuracy", "sf": "slu_f1", "kwe": "macro_f1",
                       "kws": "accuracy", "er": "uar", "asc": "uar", "sc": "uar", "ac": "uar", "sns": "uar",
                       "open": "exact_match"}
    for name, task in T.TASKS.items():
        assert len(set(task.prompts)) >= 15, name
        assert len(set(task.unseen_prompts)) >= 3, name
        assert not set(task.prompts) & set(task.unseen_prompts), name
        assert T.task_id(name) == T.TASK_NAMES.index(name)
    assert set(T.TASKS["er"].labels) == {"neutral", "happy", "sad", "angry"}
    assert set(T.TASKS["ac"].labels) == {"american", "british", "indian", "australian", "canadian"}
    assert set(T.TASKS["sf"].labels) == {"date", "place_name", "person", "time"}
    assert set(T.TASKS["sc"].labels) == {"one", "two"}


def test_every_prompt_renders_for_every_task():
    for name in T.TASK_NAMES:
        for split in ("seen", "unseen"):
            for i in range(T.prompt_count(name, split)):
                text = T.build_instruction(name, EXAMPLE, i, split=split)
                assert "{" not in text and text.strip()
    st = T.build_instruction("st", EXAMPLE, 0)
    assert "German" in st and "{target_language}" not in st
    assert " radio " in T.build_instruction("kws", EXAMPLE, 3)


def test_kws_keyword_tokenizes_as_in_the_transcript(tmp_path):
    """Every KWS prompt holds the keyword as a bare word, so its tokens are the transcript's own
    (quoted, sentencepiece cut "'radio'" without the word-start marker: other ids)."""
    transformers = pytest.importorskip("transformers")
    from speechverse_jax import hf_tiny

    texts = [EXAMPLE["transcript"], "the radio is on", "turn it off"] * 20
    texts += [T.build_instruction("kws", EXAMPLE, i, split=sp) for sp in ("seen", "unseen")
              for i in range(T.prompt_count("kws", sp))]
    hf_tiny.train_spiece(texts, str(tmp_path), vocab_size=120)
    tok = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0, legacy=False)
    word = tok("radio", add_special_tokens=False)["input_ids"]  # as a word starts: '\u2581radio'

    def holds(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return any(ids[j: j + len(word)] == word for j in range(len(ids)))

    assert holds("turn on the radio now") and not holds("turn on the 'radio' now")
    for sp in ("seen", "unseen"):
        for i in range(T.prompt_count("kws", sp)):
            assert holds(T.build_instruction("kws", EXAMPLE, i, split=sp)), (sp, i)


def test_same_choice_same_text_and_rng_choice():
    a = T.build_instruction("ic", EXAMPLE, 12345, with_descriptions=True)
    b = T.build_instruction("ic", dict(EXAMPLE), 12345, with_descriptions=True)
    assert a == b
    r1 = T.build_instruction("er", EXAMPLE, np.random.default_rng(7))
    r2 = T.build_instruction("er", EXAMPLE, np.random.default_rng(7))
    assert r1 == r2
    texts = {T.build_instruction("asr", EXAMPLE, i) for i in range(100)}
    assert texts == set(T.TASKS["asr"].prompts)  # every seen prompt reachable, nothing else
    unseen = {T.build_instruction("asr", EXAMPLE, i, split="unseen") for i in range(30)}
    assert unseen == set(T.TASKS["asr"].unseen_prompts)
    with pytest.raises(ValueError):
        T.build_instruction("asr", EXAMPLE, 0, split="other")


def test_labels_listed_described_and_overridden():
    plain = T.build_instruction("er", EXAMPLE, 0)
    assert all(label in plain for label in ("neutral", "happy", "sad", "angry"))
    assert "happiness" not in plain  # no descriptions
    described = T.build_instruction("er", EXAMPLE, 0, with_descriptions=True)
    assert "happy: happiness or joy" in described
    bare = T.build_instruction("er", EXAMPLE, 0, with_labels=False)
    assert bare == T.TASKS["er"].prompts[0]
    # unseen label set: per example (list or dict) beats config override beats registry
    ex = dict(EXAMPLE, labels={"book_flight": "reserve a plane ticket", "cancel": ""})
    text = T.build_instruction("ic", ex, 0, with_descriptions=True, label_overrides={"ic": ["x_y"]})
    assert "book_flight: reserve a plane ticket" in text and "cancel" in text and "play_radio" not in text
    text = T.build_instruction("ic", EXAMPLE, 0, label_overrides={"ic": ["x_y", "z_w"]})
    assert "x_y, z_w" in text and "play_radio" not in text
    assert T.resolve_labels("ic", {"labels": ["a", "b"]}) == {"a": "", "b": ""}
    own = dict(EXAMPLE, instruction="Do something custom.")
    assert T.build_instruction("open", own, 3) == "Do something custom."


def test_slot_format_roundtrip():
    pairs = [("time", "now"), ("place_name", "new york")]
    text = T.format_slots(pairs)
    assert text == "time = now; place_name = new york;"
    assert T.parse_slots(text) == pairs
    assert T.format_slots({}) == "none" and T.parse_slots("none") == []
    assert T.parse_slots("time = now; garbage; date =;") == [("time", "now")]
    assert T.format_target("sf", {"date": "monday"}) == "date = monday;"
    assert T.parse_output("sf", "date = monday;") == [("date", "monday")]


def test_classification_targets_and_parsers():
    assert T.format_target("er", "Happy") == "happy"
    assert T.format_target("ac", "American") == "american"
    assert T.format_target("kwe", ["radio", "paris "]) == "radio, paris"
    assert T.parse_output("kwe", "radio, paris") == ["radio", "paris"]
    with pytest.raises(ValueError):
        T.format_target("er", "bored")
    assert T.parse_output("sns", "Non speech") == "non-speech"
    assert T.parse_output("ic", "play radio") == "play_radio"
    assert T.parse_output("er", "confused") is None
    assert T.format_target("er", "calm", {"calm": "", "tense": ""}) == "calm"


def test_joint_prompt_target_and_parser():
    text = T.build_instruction("kwe", EXAMPLE, 11, joint=True)
    lines = text.split("\n")
    assert lines[1] == "=== Task: ASR ===" and lines[3] == "=== Task: KWE ==="
    assert lines[2] in T.TASKS["asr"].prompts and lines[4] in T.TASKS["kwe"].prompts
    assert "ASR: <transcript> | KWE: <answer> |" in lines[5]
    assert T.build_instruction("kwe", EXAMPLE, 11, joint=True) == text
    target = T.format_joint_target("kwe", "paris is the capital of france", "paris, france")
    assert target == "ASR: paris is the capital of france | KWE: paris, france |"
    out = T.parse_joint_output(target, "kwe")
    assert out.transcript == "paris is the capital of france" and out.answer == "paris, france"
    emo = T.parse_joint_output("ASR: can you shut up for a while | Emotion: angry", "er")  # no final '|'
    assert emo.transcript == "can you shut up for a while" and emo.answer == "angry"
    assert T.parse_output("er", "ASR: hello there | Emotion: Angry |") == "angry"
    assert T.parse_output("sf", T.format_joint_target("sf", "at 5:30 pm", "time = 5:30 pm;")) == [("time", "5:30 pm")]
    assert T.parse_joint_output("garbage").transcript == ""
