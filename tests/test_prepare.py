"""Preparation recipes on tiny fake trees with the real layouts and file formats."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.data import tasks as T
from speechverse_jax.data.errors import DataStats
from speechverse_jax.data.manifest import read_manifest
from speechverse_jax.data.prepare import RECIPES, common, run_prepare


def _audio(path, seconds=0.5, sr=16000, channels=1, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = int(seconds * sr)
    x = (np.random.default_rng(len(str(path))).standard_normal((n, channels)) * 0.1).astype(np.float32)
    sf.write(str(path), x, sr, **kw)
    return str(path)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _readable(summary):
    """Every manifest a recipe writes reads back with nothing skipped."""
    for path in summary["manifests"].values():
        stats = DataStats()
        exs = read_manifest(path, stats, probe=False)
        assert stats.as_dict() == {} and len(exs) == len(_rows(path)), path


def test_registry_of_recipes():
    assert set(RECIPES) == {"librispeech", "commonvoice", "voxpopuli", "slurp", "covost2", "msppodcast", "fisher"}
    with pytest.raises(ValueError, match="unknown dataset"):
        run_prepare("timit", "/x", "/y")
    with pytest.raises(ValueError, match="unknown options"):
        run_prepare("librispeech", "/x", "/y", colour="blue")


def test_librispeech(tmp_path):
    src = tmp_path / "src" / "LibriSpeech"
    utts = {
        "dev-clean/84/121123": {
            "84-121123-0000": "GO DO YOU HEAR",
            "84-121123-0001": "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED",
            "84-121123-0002": "AT THIS MOMENT THE WHOLE SOUL OF THE OLD MAN SEEMED CENTRED IN HIS EYES"},
        "train-clean-100/19/198": {
            "19-198-0000": "NORTHANGER ABBEY",
            "19-198-0001": "THIS LITTLE WORK WAS FINISHED IN THE YEAR"},
    }
    for folder, lines in utts.items():
        d = src / folder
        d.mkdir(parents=True)
        spk, chap = folder.split("/")[1:]
        (d / f"{spk}-{chap}.trans.txt").write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
        for uid in lines:
            if uid != "84-121123-0001":  # listed in the transcript, flac missing
                _audio(d / f"{uid}.flac", 0.4, format="FLAC")
    out = tmp_path / "out"
    summary = run_prepare("librispeech", str(tmp_path / "src"), str(out), seed=3)
    assert summary["rows"] == {"dev-clean": {"asr": 2, "kwe": 2, "kws": 2},
                               "train-clean-100": {"asr": 2, "kwe": 2, "kws": 2}}
    assert summary["skipped"] == {"missing_file": 1}
    rows = _rows(out / "dev-clean.jsonl")
    asr = [r for r in rows if r["task"] == "asr"]
    assert asr[0] == {"audio": str(src / "dev-clean/84/121123/84-121123-0000.flac"), "duration": 0.4,
                      "id": "84-121123-0000", "task": "asr", "target": "go do you hear"}
    for r in rows:
        if r["task"] == "kws":
            assert (r["keyword"] in r["transcript"].split()) == (r["target"] == "yes")
        if r["task"] == "kwe":
            assert r["target"] and set(r["target"]) <= set(common.content_words(r["transcript"]))
    again = run_prepare("librispeech", str(tmp_path / "src"), str(tmp_path / "again"), seed=3)
    assert _rows(again["manifests"]["dev-clean"]) == rows  # seeded: same rows
    _readable(summary)
    # KWE labels from a file; only the asked-for tasks and splits
    kw = tmp_path / "kw.tsv"
    kw.write_text("19-198-0000\tnorthanger, abbey\n")
    s2 = run_prepare("librispeech", str(tmp_path / "src"), str(tmp_path / "o2"), tasks="kwe",
                     splits="train-clean-100", keywords_file=str(kw))
    assert s2["rows"] == {"train-clean-100": {"kwe": 1}} and s2["skipped"] == {"kwe_no_label": 1}
    assert _rows(s2["manifests"]["train-clean-100"])[0]["target"] == ["northanger", "abbey"]


def test_kws_share_and_keyword_extractor():
    texts = [f"the quick brown fox number {i} jumps over lazy dogs near river bank" for i in range(2000)]
    vocab = ["apple", "banana", "cherry", "quick", "river"]
    labels = [common.kws_example(t, vocab, common.rng_for(0, str(i)))[1] for i, t in enumerate(texts)]
    assert abs(labels.count("yes") / len(labels) - 0.7) < 0.03
    for i, t in enumerate(texts[:200]):
        kw, label = common.kws_example(t, vocab, common.rng_for(0, str(i)))
        assert (kw in t.split()) == (label == "yes")
    ex = common.KeywordExtractor(["the radio is on", "turn on the radio", "paris is the capital of france"])
    assert ex.extract("paris is the capital of france") == ["paris"]
    assert ex.extract("the the the") == []


def test_commonvoice(tmp_path):
    root = tmp_path / "cv-corpus-5.1-2020-06-22" / "en"
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent\n"
    rows = {"train": [("c1", "common_voice_en_1.mp3", "Turn on the radio.", "us"),
                      ("c2", "common_voice_en_2.mp3", "What time is it in Paris?", "england"),
                      ("c3", "common_voice_en_3.mp3", "Play some jazz.", ""),
                      ("c4", "common_voice_en_4.mp3", "Good morning.", "scotland")],
            "dev": [("c5", "common_voice_en_5.mp3", "Read the news.", "indian")],
            "test": [("c6", "common_voice_en_6.mp3", "Call my mother.", "canada")]}
    for split, items in rows.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.tsv").write_text(header + "".join(
            f"{c}\t{p}\t{s}\t2\t0\tthirties\tmale\t{a}\n" for c, p, s, a in items))
        for _, p, _, _ in items:
            _audio(root / "clips" / p, 0.6, sr=48000, format="MP3")
    out = tmp_path / "out"
    summary = run_prepare("commonvoice", str(root.parent), str(out), tasks="asr,ac")
    assert summary["rows"] == {"train": {"ac": 2, "asr": 4}, "dev": {"ac": 1, "asr": 1}, "test": {"ac": 1, "asr": 1}}
    assert summary["skipped"] == {"accent_not_in_label_set": 2}
    train = _rows(out / "train.jsonl")
    ac = [(r["id"], r["target"]) for r in train if r["task"] == "ac"]
    assert ac == [("common_voice_en_1/ac", "american"), ("common_voice_en_2/ac", "british")]
    assert train[0]["target"] == "Turn on the radio." and train[0]["duration"] == pytest.approx(0.6, abs=0.05)
    _readable(summary)
    s2 = run_prepare("cv", str(root), str(tmp_path / "o2"), tasks=["kws", "kwe"], splits=["dev"])
    assert s2["rows"] == {"dev": {"kwe": 1, "kws": 1}}


def test_voxpopuli(tmp_path):
    root = tmp_path / "transcribed_data" / "en"
    ids = ["20180604-0900-PLENARY-12-en_20180604-18:07:15_1", "20190115-0900-PLENARY-3-en_20190115-09:10:05_4"]
    header = "id\traw_text\tnormalized_text\tspeaker_id\tsplit\tgender\tis_gold_transcript\taccent\n"
    root.mkdir(parents=True)
    train = [f"{ids[0]}\tMr President, thank you.\tmr president thank you\t1\ttrain\tmale\tTrue\tNone\n",
             f"{ids[1]}\tWe agree.\twe agree\t2\ttrain\tfemale\tTrue\tNone\n"]
    (root / "asr_train.tsv").write_text(header + "".join(train))
    dev = "20200101-0900-PLENARY-1-en_x_1\tMissing.\tmissing\t3\tdev\tmale\tTrue\tNone\n"
    (root / "asr_dev.tsv").write_text(header + dev)
    for uid in ids:
        _audio(root / uid[:4] / f"{uid}.ogg", 0.5, format="OGG", subtype="VORBIS")
    summary = run_prepare("voxpopuli", str(tmp_path), str(tmp_path / "out"), splits="train,dev")
    assert summary["rows"] == {"train": {"asr": 2}} and summary["skipped"] == {"missing_file": 1}
    rows = _rows(summary["manifests"]["train"])
    assert [r["target"] for r in rows] == ["mr president thank you", "we agree"] and rows[0]["id"] == ids[0]
    _readable(summary)


def _slurp_record(i, intent, annotation, files):
    sentence = annotation
    import re
    sentence = re.sub(r"\[\s*[^:\]]+?\s*:\s*([^\]]*?)\s*\]", r"\1", annotation)
    return {"slurp_id": i, "sentence": sentence, "sentence_annotation": annotation, "intent": intent,
            "action": intent.split("_", 1)[1], "scenario": intent.split("_")[0],
            "recordings": [{"file": f, "wer": 0.0, "ent_wer": 0.0, "status": "correct"} for f in files]}


def test_slurp_subsets(tmp_path):
    src = tmp_path / "slurp"
    d = src / "dataset" / "slurp"
    d.mkdir(parents=True)
    intents = [f"scen{k}_act" for k in range(12)]
    train = []
    n = 0
    for k, intent in enumerate(intents):  # intent k appears 12 - k times: top10 = scen0..scen9
        for j in range(12 - k):
            n += 1
            ann = "wake me at [time : five am] on [date : monday] in [place_name : paris] [food_type : pasta]" \
                if j == 0 else f"just a request number {j}"
            files = [f"audio-{n}.flac"] + ([f"audio-{n}-headset.flac"] if j == 0 and k == 0 else [])
            train.append(_slurp_record(n, intent, ann, files))
    test = [_slurp_record(1000, "scen11_act", "tell [person : anna] hi", ["audio-1000.flac"]),
            _slurp_record(1001, "scen0_act", "call [person : bob] at [time : noon]", ["audio-1001.flac", "gone.flac"])]
    for name, recs in (("train", train), ("devel", []), ("test", test)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for recs in (train, test):
        for r in recs:
            for rec in r["recordings"]:
                if rec["file"] != "gone.flac":
                    _audio(src / "audio" / "slurp_real" / rec["file"], 0.3, format="FLAC")
    summary = run_prepare("slurp", str(src), str(tmp_path / "out"))
    assert summary["intents"] == [f"scen{k}_act" for k in range(10)]
    assert summary["unseen_intents"] == ["scen10_act", "scen11_act"]
    assert summary["slots"] == ["date", "place_name", "person", "time"]
    n_train_recs = sum(len(r["recordings"]) for r in train)  # 79
    assert summary["rows"]["train"] == {"asr": n_train_recs, "ic": n_train_recs - 3, "sf": 13}
    assert summary["rows"]["train_unseen"] == {"ic": 3}
    assert summary["rows"]["test"] == {"asr": 2, "ic": 1, "sf": 2} and summary["rows"]["test_unseen"] == {"ic": 1}
    assert summary["skipped"] == {"missing_file": 1, "sf_no_slot_in_subset": n_train_recs - 13}
    sf_rows = [r for r in _rows(summary["manifests"]["train"]) if r["task"] == "sf"]
    assert sf_rows[0]["target"] == "time = five am; date = monday; place_name = paris;"  # food_type not in subset
    assert set(sf_rows[0]["labels"]) == {"date", "place_name", "person", "time"}
    ic = next(r for r in _rows(summary["manifests"]["train"]) if r["task"] == "ic")
    assert list(ic["labels"]) == summary["intents"]
    assert "scen0_act" in T.build_instruction("ic", ic, 0) and "scen11_act" not in T.build_instruction("ic", ic, 0)
    unseen = _rows(summary["manifests"]["test_unseen"])[0]
    assert unseen["target"] == "scen11_act" and list(unseen["labels"]) == ["scen10_act", "scen11_act"]
    _readable(summary)
    full = run_prepare("slurp", str(src), str(tmp_path / "all"), intents="all", slots="all", recordings="first",
                       tasks=("ic", "sf"))
    assert "train_unseen" not in full["rows"] and full["rows"]["train"]["ic"] == len(train)
    assert full["slots"] == ["date", "food_type", "place_name", "time"]  # chosen on train


def test_covost2(tmp_path):
    src = tmp_path / "covost"
    (src / "clips").mkdir(parents=True)
    rows = [("common_voice_en_1.mp3", "Turn on the radio.", "Schalte das Radio ein.", "train"),
            ("common_voice_en_2.mp3", "Good morning.", "Guten Morgen.", "train"),
            ("common_voice_en_3.mp3", "How are you?", "Wie geht es dir?", "dev"),
            ("common_voice_en_4.mp3", "Thank you.", "Danke.", "test"),
            ("common_voice_en_5.mp3", "No audio.", "Kein Audio.", "test")]
    (src / "covost_v2.en_de.tsv").write_text("path\tsentence\ttranslation\tclient_id\tsplit\n" + "".join(
        f"{p}\t{s}\t{t}\tc\t{sp}\n" for p, s, t, sp in rows))
    for p, *_ in rows[:4]:
        _audio(src / "clips" / p, 0.4, sr=48000, format="MP3")
    summary = run_prepare("covost2", str(src), str(tmp_path / "out"), tasks="st,asr")
    assert summary["rows"] == {"dev": {"asr": 1, "st": 1}, "test": {"asr": 1, "st": 1}, "train": {"asr": 2, "st": 2}}
    assert summary["skipped"] == {"missing_file": 1}
    st = next(r for r in _rows(summary["manifests"]["train"]) if r["task"] == "st")
    assert st["target"] == "Schalte das Radio ein." and st["target_language"] == "de"
    assert st["transcript"] == "Turn on the radio."
    assert "German" in T.build_instruction("st", st, 4)
    _readable(summary)


def test_msppodcast(tmp_path):
    src = tmp_path / "MSP-PODCAST"
    (src / "Labels").mkdir(parents=True)
    items = [("MSP-PODCAST_0001_0001.wav", "N", 4.0, "Train"), ("MSP-PODCAST_0001_0002.wav", "H", 6.2, "Train"),
             ("MSP-PODCAST_0002_0001.wav", "U", 2.0, "Development"), ("MSP-PODCAST_0003_0001.wav", "A", 3.0, "Test1"),
             ("MSP-PODCAST_0004_0001.wav", "S", 5.0, "Test2")]
    with open(src / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"])
        for name, emo, val, split in items:
            w.writerow([name, emo, 3.5, val, 4.0, 12, "Female", split])
    for name, *_ in items:
        _audio(src / "Audios" / name, 0.5)
    (src / "Transcripts").mkdir()
    (src / "Transcripts" / "MSP-PODCAST_0001_0002.txt").write_text("i love this show\n")
    summary = run_prepare("msppodcast", str(src), str(tmp_path / "out"), valence_bounds="3,5")
    assert summary["rows"] == {"dev": {"asc": 1}, "test1": {"asc": 1, "er": 1}, "test2": {"asc": 1, "er": 1},
                               "train": {"asc": 2, "er": 2}}
    assert summary["skipped"] == {"emotion_not_in_4_classes": 1}
    train = _rows(summary["manifests"]["train"])
    assert [(r["task"], r["target"]) for r in train] == [("er", "neutral"), ("asc", "neutral"), ("er", "happy"),
                                                        ("asc", "positive")]
    assert train[2]["transcript"] == "i love this show"
    asc = {r["id"]: r["target"] for p in summary["manifests"].values() for r in _rows(p) if r["task"] == "asc"}
    assert asc["MSP-PODCAST_0002_0001/asc"] == "negative" and asc["MSP-PODCAST_0003_0001/asc"] == "neutral"
    assert asc["MSP-PODCAST_0004_0001/asc"] == "neutral"  # exactly 5 is not above 5
    _readable(summary)


def test_fisher_speaker_count(tmp_path):
    src = tmp_path / "fisher"
    trans = src / "fe_03_p1_tran" / "data" / "trans" / "000"
    trans.mkdir(parents=True)
    (trans / "fe_03_00001.txt").write_text(
        "# fe_03_00001.sph\n\n"
        "0.50 3.00 A: hello there\n"
        "3.20 6.00 B: hi how are you\n"
        "6.50 7.20 A: fine\n"
        "8.00 10.00 B: what about you\n"
        "9.50 11.00 A: good thanks\n")
    (trans / "fe_03_00002.txt").write_text("0.0 2.0 A: no audio for this one\n")
    _audio(src / "fe_03_p1_sph1" / "audio" / "000" / "fe_03_00001.sph", 12.0, sr=8000, channels=2,
           format="NIST", subtype="PCM_16")
    summary = run_prepare("fisher", str(src), str(tmp_path / "out"), dev_share="0", test_share="0.0")  # CLI strings
    assert summary["skipped"] == {"missing_file": 1}
    rows = _rows(summary["manifests"]["train"])
    got = [(r["offset"], r["duration"], r["target"]) for r in rows]
    assert got == [(0.5, 2.5, "one"), (0.5, 5.5, "two"), (3.2, 2.8, "one"), (3.2, 4.0, "two"), (6.5, 3.5, "two"),
                   (8.0, 3.0, "two")]
    assert rows[1]["transcript"] == "hello there hi how are you"
    _readable(summary)
    exs = read_manifest(summary["manifests"]["train"], probe=False)
    assert all(e.segment for e in exs)
    from speechverse_jax.data.audio import load_audio

    seg = load_audio(exs[0].audio, offset=exs[0].offset, duration=exs[0].duration)
    assert seg.size == 40000  # 2.5 s of an 8 kHz stereo file -> 16 kHz mono
