"""The spoken demo corpus (quick profile): manifests read back, held-out sentences, labels true."""

import collections
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.configs.demo import CORPUS_SIZES, ROBUST_SIZES

from speechverse_jax.data.errors import DataStats
from speechverse_jax.data.manifest import read_manifest
from speechverse_jax.data.prepare.common import words
from speechverse_jax.demo import corpus

QUICK = CORPUS_SIZES["quick"]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = corpus.make_corpus(str(out), sizes=QUICK, seed=3, progress=False, robust_sizes=ROBUST_SIZES["quick"])
    return out, summary


def _rows(out, split):
    with open(os.path.join(out, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_manifests_read_back_with_every_task(quick):
    out, summary = quick
    for split in corpus.SPLITS:
        stats = DataStats()
        examples = read_manifest(os.path.join(out, f"{split}.jsonl"), stats)
        assert stats.as_dict() == {} and len(examples) == summary["total"][split]
        assert {e.task for e in examples} == set(corpus.DEMO_TASKS)
        for task in corpus.DEMO_TASKS:
            stats = DataStats()
            by_task = read_manifest(os.path.join(out, "by_task", f"{split}.{task}.jsonl"), stats)
            assert stats.as_dict() == {} and by_task and {e.task for e in by_task} == {task}
    with open(os.path.join(out, "corpus.json")) as f:
        stored = json.load(f)
    assert stored["counts"] == summary["counts"] and set(stored["baselines"]) == set(corpus.DEMO_TASKS)
    assert stored["baselines"]["asr"]["empty_output_wer"] == 1.0
    assert stored["baselines"]["kws"]["chance"] == 0.5


def test_held_out_sentences(quick):
    out, _ = quick
    train = {r["transcript"] for r in _rows(out, "train") if r.get("transcript")}
    for split in ("dev", "test"):
        for r in _rows(out, split):
            if r["task"] in ("asr", "ic", "sf", "open"):
                assert r["transcript"] not in train, (split, r)


def test_labels_true_by_construction(quick):
    out, _ = quick
    rows = [r for split in corpus.SPLITS for r in _rows(out, split)]
    kws = [r for r in rows if r["task"] == "kws"]
    for r in kws:
        assert (r["keyword"] in words(r["transcript"])) == (r["target"] == "yes"), r
    share = np.mean([r["target"] == "yes" for r in kws])
    assert 0.6 <= share <= 0.8
    for r in rows:
        if r["task"] == "asr":
            assert r["target"] == r["transcript"]
        if r["task"] == "kwe":
            assert all(k in words(r["transcript"]) for k in r["target"].split(", "))
        if r["task"] == "sf" and r["target"] != "none":
            for pair in r["target"].rstrip(";").split(";"):
                slot, value = (x.strip() for x in pair.split("="))
                assert slot in corpus.SF_SLOT_NAMES and value in r["transcript"]
        if r["task"] == "sns":
            assert ("transcript" in r) == (r["target"] == "speech")
        if r["task"] == "ac":
            assert r["voice"].startswith(corpus.AC_VOICES[r["target"]] + "+")
    sc = collections.defaultdict(list)
    for r in rows:
        if r["task"] == "sc":
            sc[r["target"]].append(r["duration"])
            assert len(set(v.split()[0] for v in r["voice"].split(" | "))) == (2 if r["target"] == "two" else 1)
    assert np.mean(sc["two"]) > np.mean(sc["one"])


def test_audio_is_16k_mono_and_short(quick):
    out, _ = quick
    for r in _rows(out, "test"):
        info = sf.info(os.path.join(out, r["audio"]))
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(info.frames / 16000 - r["duration"]) < 1e-3
        assert 0.5 < r["duration"] < 7.0


def test_deterministic(quick, tmp_path):
    out, _ = quick
    corpus.make_corpus(str(tmp_path), sizes=QUICK, seed=3, progress=False)
    for split in corpus.SPLITS:
        assert _rows(tmp_path, split) == _rows(out, split)
    with open(os.path.join(out, "audio/test/asr_00000.wav"), "rb") as a, \
            open(os.path.join(tmp_path, "audio/test/asr_00000.wav"), "rb") as b:
        assert a.read() == b.read()


def test_corpus_texts(quick):
    out, _ = quick
    texts = corpus.corpus_texts(str(out))
    joined = "\n".join(texts)
    train = _rows(out, "train")
    assert all(r["target"] in joined for r in train)
    assert "Transcribe the preceding audio." in texts
    test_only = {r["transcript"] for r in _rows(out, "test") if r["task"] == "asr"}
    assert not test_only & set(texts)


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng sox"):
        corpus.make_corpus(str(tmp_path), sizes=QUICK, progress=False)


def _voice_parts(row):
    """[(variant, speed, pitch)] of a row's voice field ('en-us+m3 s150 p40 | ...')."""
    out = []
    for part in row["voice"].split(" | "):
        name, speed, pitch = part.split()
        out.append((name.split("+")[1], int(speed[1:]), int(pitch[1:])))
    return out


def test_robustness_splits_are_rendered_beyond_the_corpus(quick):
    """robust_voices: test sentences, voices outside every corpus range; robust_order: test
    sentences' words in new orders, corpus voices. None of it skipped."""
    out, summary = quick
    assert summary["skipped"] == {}
    assert summary["robust"] == {sp: dict(n) for sp, n in ROBUST_SIZES["quick"].items()}
    train_voices = [v for r in _rows(out, "train") if "voice" in r for v in _voice_parts(r)]
    corpus_variants = {v for v, _, _ in train_voices}
    assert min(s for _, s, _ in train_voices) >= 120 and max(p for _, _, p in train_voices) <= 75
    for row in [r for r in _rows(out, "robust_voices") if "voice" in r]:
        for variant, speed, pitch in _voice_parts(row):
            assert variant not in corpus_variants and variant in corpus.WIDE_MALE + corpus.WIDE_FEMALE
            assert not 115 <= speed <= 200 and not 22 <= pitch <= 78, row
    test_texts = {r["transcript"] for r in _rows(out, "test") if "transcript" in r}
    held_out = corpus.held_out_sentences(3)
    for row in _rows(out, "robust_order"):
        words_ = row["transcript"].split()
        assert row["transcript"] not in held_out and row["transcript"] not in test_texts
        assert any(sorted(words_) == sorted(s.split()) for s in held_out), row  # the words of a test sentence
        if row["task"] == "asr":
            assert row["target"] == row["transcript"]
        if row["task"] == "kws" and row["target"] == "yes":
            assert row["keyword"] in words_


def test_shuffled_sentences_keep_keywords_in_order_of_appearance():
    s = corpus.Sentence("it was very hot in berlin last saturday", "t", keywords=("hot", "berlin", "saturday"))
    avoid = ["it was very hot in berlin last saturday"]
    (shuffled,) = corpus.shuffled_sentences([s, corpus.Sentence("hi there", "t")], seed=0, avoid=avoid)
    assert shuffled.text != s.text and sorted(shuffled.text.split()) == sorted(s.text.split())
    ws = shuffled.text.split()
    assert list(shuffled.keywords) == sorted(s.keywords, key=ws.index)
    with pytest.raises(ValueError, match=r"robust_order: no such task\(s\) \['ic'\]"):
        corpus.plan_robust({"robust_order": {"ic": 2}})
