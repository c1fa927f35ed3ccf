"""Manifest reading: formats, path resolution, durations, bad lines counted by reason, strict mode."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.data import audio as audio_lib
from speechverse_jax.data.errors import DataError, DataStats
from speechverse_jax.data.manifest import read_manifest, read_manifests


def _wav(path, seconds=1.0, sr=16000, channels=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = (np.random.default_rng(0).standard_normal((int(seconds * sr), channels)) * 0.1).astype(np.float32)
    sf.write(path, x, sr)
    return path


def _write(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_fields_paths_and_durations(tmp_path):
    _wav(str(tmp_path / "audio" / "a.wav"), 1.25, sr=22050, channels=2)
    absolute = _wav(str(tmp_path / "elsewhere" / "b.wav"), 0.5)
    m = _write(tmp_path / "m.jsonl", [
        {"audio": "audio/a.wav", "task": "ASR", "target": " hello world ", "id": "x1"},
        {"audio": absolute, "task": "kws", "target": "Yes", "keyword": "radio", "duration": 0.5},
        {"audio": "audio/a.wav", "offset": 0.25, "duration": 0.5, "task": "sf",
         "target": [["time", "now"], ["date", "monday"]], "instruction": "Find slots."},
        {"audio": "audio/a.wav", "offset": 1.0, "task": "kwe", "target": ["radio", "news"], "transcript": "t"},
        "",  # blank lines are not examples
    ])
    stats = DataStats()
    exs = read_manifest(m, stats)
    assert stats.as_dict() == {}
    assert [e.task for e in exs] == ["asr", "kws", "sf", "kwe"]
    a, b, c, d = exs
    assert a.audio == str(tmp_path / "audio" / "a.wav") and a.target == "hello world" and a.id == "x1"
    assert a.duration == pytest.approx(1.25, abs=1e-3) and not a.segment  # probed from the header
    assert b.audio == absolute and b.target == "yes" and b.get("keyword") == "radio" and b.id == "m.jsonl:2"
    assert c.segment and c.offset == 0.25 and c.duration == 0.5 and c.target == "time = now; date = monday;"
    assert c.instruction == "Find slots." and (c.manifest, c.line) == (m, 3)
    assert d.segment and d.duration == pytest.approx(0.25, abs=1e-3) and d.target == "radio, news"  # to the end of file
    assert d.get("transcript") == "t"


def test_nemo_manifest_reads_as_asr(tmp_path):
    wav = _wav(str(tmp_path / "n.wav"), 0.75)
    m = _write(tmp_path / "nemo.json", [
        {"audio_filepath": wav, "duration": 0.75, "text": "a nemo line"},
        {"audio_filepath": "n.wav", "duration": 0.75, "offset": 0.5, "text": "segment"},
    ])
    exs = read_manifest(m)
    assert [(e.task, e.target, e.segment) for e in exs] == [("asr", "a nemo line", False), ("asr", "segment", True)]
    assert exs[1].audio == wav


BAD_LINES = [
    ("malformed_json", '{"audio": "ok.wav", "task": "asr", '),
    ("malformed_json", '["not", "an", "object"]'),
    ("missing_field", {"task": "asr", "target": "no audio"}),
    ("missing_field", {"audio": "ok.wav", "task": "asr"}),  # no target
    ("missing_field", {"audio": "ok.wav", "target": "no task"}),
    ("missing_field", {"audio": "ok.wav", "task": "kws", "target": "yes"}),  # kws needs keyword
    ("missing_field", {"audio": "ok.wav", "task": "st", "target": "hallo"}),  # st needs target_language
    ("unknown_task", {"audio": "ok.wav", "task": "dance", "target": "x"}),
    ("unknown_label", {"audio": "ok.wav", "task": "er", "target": "bored"}),
    ("bad_field", {"audio": "ok.wav", "task": "asr", "target": "x", "duration": "long"}),
    ("bad_field", {"audio": "ok.wav", "task": "asr", "target": "x", "offset": -1}),
    ("missing_file", {"audio": "nope.wav", "task": "asr", "target": "x"}),
    ("unreadable_audio", {"audio": "corrupt.wav", "task": "asr", "target": "x"}),
    ("empty_audio", {"audio": "empty.wav", "task": "asr", "target": "x"}),
    ("empty_audio", {"audio": "ok.wav", "task": "asr", "target": "x", "offset": 5.0}),  # past the end
]


def _bad_manifest(tmp_path):
    _wav(str(tmp_path / "ok.wav"), 1.0)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt this is not audio")
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    good = {"audio": "ok.wav", "task": "asr", "target": "fine"}
    lines = [good] + [line for _, line in BAD_LINES] + [good]
    return _write(tmp_path / "bad.jsonl", lines)


def test_bad_lines_counted_by_reason_with_file_and_line(tmp_path):
    m = _bad_manifest(tmp_path)
    stats = DataStats(max_logged=3)
    exs = read_manifest(m, stats)
    assert len(exs) == 2
    expected = {}
    for reason, _ in BAD_LINES:
        expected[f"skipped/{reason}"] = expected.get(f"skipped/{reason}", 0) + 1
    assert stats.as_dict() == expected
    assert stats.bad_input() == len(BAD_LINES)
    assert [w for _, w, _ in stats.first] == [f"{m}:2", f"{m}:3", f"{m}:4"]  # first offenders, 1-based lines
    assert "bad.jsonl:2" in stats.summary()


@pytest.mark.parametrize("k", [0, 7, 12])
def test_strict_names_file_and_line(tmp_path, k):
    m = _bad_manifest(tmp_path)
    lines = open(m).read().splitlines()
    only = _write(tmp_path / "one.jsonl", [lines[0], lines[1 + k]])
    with pytest.raises(DataError) as e:
        read_manifest(only, strict=True)
    assert e.value.reason == BAD_LINES[k][0]
    assert str(e.value).startswith(f"{only}:2: {BAD_LINES[k][0]}")


def test_label_overrides_and_several_manifests(tmp_path):
    _wav(str(tmp_path / "ok.wav"), 0.5)
    m1 = _write(tmp_path / "a.jsonl", [{"audio": "ok.wav", "task": "ic", "target": "book_flight"}])
    m2 = _write(tmp_path / "b.jsonl", [
        {"audio": "ok.wav", "task": "ic", "target": "cancel", "labels": ["book_flight", "cancel"]},
        {"audio": "ok.wav", "task": "ic", "target": "play_radio"},
    ])
    stats = DataStats()
    exs = read_manifests(f"{m1},{m2}", stats)  # registry labels: book_flight unknown
    assert [e.target for e in exs] == ["cancel", "play_radio"] and stats.as_dict() == {"skipped/unknown_label": 1}
    stats = DataStats()
    exs = read_manifests([m1, m2], stats, label_overrides={"ic": ["book_flight", "cancel"]})
    assert [e.target for e in exs] == ["book_flight", "cancel"] and stats.as_dict() == {"skipped/unknown_label": 1}


def test_audio_decoding_and_errors(tmp_path):
    stereo = _wav(str(tmp_path / "s.wav"), 0.5, sr=44100, channels=2)
    x = audio_lib.load_audio(stereo)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(x.size - 8000) <= 1
    seg = audio_lib.load_audio(stereo, offset=0.1, duration=0.2)
    assert abs(seg.size - 3200) <= 1
    assert audio_lib.probe_duration(stereo) == pytest.approx(0.5)
    nan = str(tmp_path / "nan.wav")
    sf.write(nan, np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(audio_lib.AudioError) as e:
        audio_lib.load_audio(nan)
    assert e.value.reason == "nonfinite_audio" and "nan.wav" in str(e.value)
    with pytest.raises(audio_lib.AudioError) as e:
        audio_lib.probe_duration(str(tmp_path / "gone.wav"))
    assert e.value.reason == "missing_file"
