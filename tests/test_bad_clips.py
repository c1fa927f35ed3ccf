"""prepare, the encoder cache and the demo corpus skip and count bad clips instead of dying."""

import csv
import json
import os

import numpy as np
import soundfile as sf

from speechverse_jax.data.manifest import write_manifest
from speechverse_jax.data.prepare import run_prepare


def _wav(path, seconds, nan=False):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    x = (np.random.default_rng(len(str(path))).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    if nan:
        x[10:20] = np.nan
    sf.write(str(path), x, 16000, subtype="FLOAT")
    return str(path)


def test_prepare_check_audio_drops_and_counts_bad_clips(tmp_path):
    src = tmp_path / "MSP-PODCAST"
    (src / "Labels").mkdir(parents=True)
    items = [("a.wav", "N", "Train"), ("b.wav", "H", "Train"), ("c.wav", "A", "Train")]
    with open(src / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"])
        for name, emo, split in items:
            w.writerow([name, emo, 3.5, 4.0, 4.0, 12, "Female", split])
    _wav(src / "Audios" / "a.wav", 0.5)
    _wav(src / "Audios" / "b.wav", 0.5, nan=True)  # a readable header, NaN samples
    (src / "Audios" / "c.wav").write_bytes(b"junk")  # no header at all: caught by every recipe
    plain = run_prepare("msppodcast", str(src), str(tmp_path / "plain"))
    assert plain["skipped"] == {"unreadable_audio": 1} and plain["rows"]["train"] == {"asc": 2, "er": 2}
    checked = run_prepare("msppodcast", str(src), str(tmp_path / "checked"), check_audio="true")
    assert checked["skipped"] == {"nonfinite_audio": 2, "unreadable_audio": 1}  # b.wav's er and asc rows
    assert checked["rows"]["train"] == {"asc": 1, "er": 1} and checked["audio_checked"]
    manifest = checked["manifests"]["train"]
    assert any(e.startswith(f"{manifest}:3: nonfinite_audio: ") for e in checked["skip_examples"])
    assert all("b.wav" not in json.dumps(r) for r in map(json.loads, open(manifest)))


def test_encoder_cache_skips_and_counts_bad_clips(tiny_base, tmp_path):
    from speechverse_jax.api import SpeechVerseModel
    from speechverse_jax.data.encoder_cache import EncoderCache, build_cache

    rows = [{"audio": _wav(tmp_path / f"g{i}.wav", 0.4), "task": "asr", "target": "hello", "id": f"g{i}"}
            for i in range(3)]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\0\0\0\0WAVEjunk" * 8)
    rows += [{"audio": _wav(tmp_path / "nan.wav", 0.4, nan=True), "task": "asr", "target": "x", "id": "nan"},
             {"audio": str(tmp_path / "corrupt.wav"), "duration": 0.4, "task": "asr", "target": "x", "id": "bad"},
             {"audio": _wav(tmp_path / "long.wav", 1.5), "task": "asr", "target": "x", "id": "long"},
             {"audio": str(tmp_path / "gone.wav"), "task": "asr", "target": "x", "id": "gone"}]
    write_manifest(str(tmp_path / "m.jsonl"), rows)
    model = SpeechVerseModel.from_base(tiny_base)
    cache = build_cache(model.cfg, model.params["wavlm"], [str(tmp_path / "m.jsonl")], batch_size=2,
                        bucket_seconds=(1.0,), progress=False)
    assert sorted(cache.states) == ["g0", "g1", "g2"]
    assert {k: v[0] for k, v in cache.skipped.items()} == {"nan": "nonfinite_audio", "bad": "unreadable_audio",
                                                           "long": "audio_too_long"}
    assert cache.skipped["nan"][1].startswith(f"{tmp_path / 'm.jsonl'}:4: ")
    assert cache.stats.as_dict() == {"filtered/audio_too_long": 1, "skipped/missing_file": 1,
                                     "skipped/nonfinite_audio": 1, "skipped/unreadable_audio": 1}
    cache.save(str(tmp_path / "cache.npz"))
    again = EncoderCache.load(str(tmp_path / "cache.npz"))
    assert again.skipped == cache.skipped and sorted(again.states) == ["g0", "g1", "g2"]
    assert dict(again.stats.counts) == dict(cache.stats.counts)


def test_demo_corpus_skips_clips_that_cannot_be_made(tmp_path, monkeypatch):
    from speechverse_jax.configs.demo import CORPUS_SIZES
    from speechverse_jax.demo import corpus, speak

    monkeypatch.setattr(speak, "check_espeak", lambda: "espeak-ng")
    calls = {"n": 0}

    def render(spec):  # no espeak needed: noise clips, one failure and one NaN clip
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("espeak-ng failed on 'x'")
        x = np.random.default_rng(calls["n"]).standard_normal(4000).astype(np.float32) * 0.1
        if calls["n"] == 9:
            x[0] = np.nan
        return x

    monkeypatch.setattr(speak, "render", render)
    summary = corpus.make_corpus(str(tmp_path), CORPUS_SIZES["quick"], workers=1, progress=False)
    assert summary["skipped"] == {"nonfinite_audio": 1, "render_failed": 1}
    assert len(summary["skip_examples"]) == 2 and "espeak-ng failed" in " ".join(summary["skip_examples"])
    planned = sum(len(v) for v in corpus.plan_corpus(CORPUS_SIZES["quick"]).values())
    assert sum(summary["total"].values()) == planned - 2
    rows = [json.loads(l) for sp in ("train", "dev", "test") for l in open(tmp_path / f"{sp}.jsonl")]
    assert len(rows) == planned - 2 and all(os.path.exists(tmp_path / r["audio"]) for r in rows)
