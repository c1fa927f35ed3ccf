"""Grain pipeline: batch contract, determinism, state restore, buckets, mixing, sharding, bad input."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.data.config import default_data_config
from speechverse_jax.data.loader import ManifestData
from speechverse_jax.data.plan import mixture_counts, plan_epoch
from speechverse_jax.data.tokenizer import TextEncoder
from speechverse_jax.data import tasks as T
from speechverse_jax.data.errors import DataError
from speechverse_jax.data.manifest import read_manifest

TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven",
         "play some jazz music please", "the weather is nice today", "call my mother tonight",
         "how far is the moon", "read me the news"]
BUCKETS = dict(audio_buckets_seconds=(0.5, 1.0, 2.0), max_audio_seconds=2.0, instruction_buckets=(32, 64, 128, 256),
               target_buckets=(8, 16, 32, 64), max_target_tokens=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 short clips over 4 tasks (mixed rates and channel counts), a tokenizer, a manifest."""
    import transformers

    from speechverse_jax import hf_tiny

    root = tmp_path_factory.mktemp("corpus")
    tok = str(root / "tok")
    prompts = [p for t in T.TASKS.values() for p in t.prompts]
    hf_tiny.train_spiece(TEXTS * 4 + prompts, tok, vocab_size=200)
    transformers.T5Tokenizer.from_pretrained(tok, extra_ids=0, legacy=False).save_pretrained(tok)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        task = ("asr", "er", "kws", "sc")[i % 4] if i >= 8 else "asr"
        sr, ch = (16000, 22050, 8000, 44100)[i % 4], 1 + i % 2
        seconds = float(rng.uniform(0.15, 1.9))
        path = root / "wav" / f"{i:02d}.{'flac' if i % 3 == 0 else 'wav'}"
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), (rng.standard_normal((int(seconds * sr), ch)) * 0.1).astype(np.float32), sr)
        text = TEXTS[i % len(TEXTS)]
        target = {"asr": text, "er": ("happy", "sad", "angry", "neutral")[i % 4], "kws": ("yes", "no")[i % 2],
                  "sc": ("one", "two")[i % 2]}[task]
        row = {"audio": f"wav/{path.name}", "task": task, "target": target, "id": f"u{i:02d}", "transcript": text}
        if task == "kws":
            row["keyword"] = text.split()[1]
        if i % 5 == 0:
            row["duration"] = round(seconds, 4)
        rows.append(row)
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "manifest": str(manifest), "tokenizer": tok, "rows": rows}


@pytest.fixture(scope="module")
def encoder(corpus):
    return TextEncoder(corpus["tokenizer"])


def _cfg(corpus, **overrides):
    cfg = default_data_config()
    cfg.train_manifests = corpus["manifest"]
    cfg.tokenizer = corpus["tokenizer"]
    cfg.batch_size = 8
    cfg.shard_index, cfg.shard_count = 0, 1
    cfg.read_threads = 0
    cfg.bucket_window = 2
    for k, v in {**BUCKETS, **overrides}.items():
        if k.endswith("_manifests") and isinstance(v, list):
            v = ",".join(v)  # the config field is a comma-separated string
        if k == "mix_weights" and isinstance(v, dict):
            v = ",".join(f"{task}={w}" for task, w in v.items())
        cfg[k] = v
    return cfg


def _data(corpus, encoder, **overrides):
    return ManifestData(_cfg(corpus, **overrides), encoder)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    keys = sorted(k for k in a if k != "meta")
    return keys == sorted(k for k in b if k != "meta") and all(np.array_equal(a[k], b[k]) for k in keys) \
        and list(a["meta"]["ids"]) == list(b["meta"]["ids"])


def test_batch_contract(corpus, encoder):
    data = _data(corpus, encoder)
    assert data.task_names == list(T.TASK_NAMES)
    assert data.train.batches_per_epoch == 5
    eos = encoder.eos_id
    for batch in _take(data.train_iterator(), 5):
        B = 8
        S, Ni, Tn = batch["meta"]["shape"]
        assert batch["audio"].shape == (B, S) and batch["audio"].dtype == np.float32
        assert batch["audio_mask"].shape == (B, S) and batch["audio_mask"].dtype == bool
        assert batch["instruction_ids"].shape == (B, Ni) and batch["instruction_ids"].dtype == np.int32
        assert batch["target_ids"].shape == (B, Tn) and batch["target_ids"].dtype == np.int32
        assert batch["instruction_mask"].dtype == bool and batch["target_mask"].dtype == bool
        assert batch["task_id"].shape == (B,) and batch["task_id"].dtype == np.int32
        assert batch["example_mask"].shape == (B,) and batch["example_mask"].all()  # 40 = 5 x 8, all valid
        assert S in (8000, 16000, 32000) and Ni in (32, 64, 128, 256) and Tn in (8, 16, 32, 64)
        for r in range(B):
            n_t = batch["target_mask"][r].sum()
            assert batch["target_mask"][r, :n_t].all() and batch["target_ids"][r, n_t - 1] == eos
            assert (batch["target_ids"][r, n_t:] == 0).all()
            n_a = batch["audio_mask"][r].sum()
            assert batch["audio_mask"][r, :n_a].all() and (batch["audio"][r, n_a:] == 0).all()
            assert np.isfinite(batch["audio"][r]).all() and np.abs(batch["audio"][r, :n_a]).max() > 0
            task = batch["meta"]["tasks"][r]
            assert batch["task_id"][r] == T.TASK_NAMES.index(task)
            ids = encoder.encode([batch["meta"]["instructions"][r]])[0]
            assert list(batch["instruction_ids"][r, :len(ids)]) == ids
            assert batch["instruction_mask"][r].sum() == len(ids)
        assert set(batch) == {"audio", "audio_mask", "instruction_ids", "instruction_mask", "target_ids",
                              "target_mask", "task_id", "example_mask", "meta"}


def test_decoded_audio_length_matches_the_file(corpus, encoder):
    """Stereo is downmixed and other rates resampled to 16 kHz: the valid length is duration x 16000."""
    data = _data(corpus, encoder)
    batch = next(data.train_iterator())
    by_id = {e.id: e for e in read_manifest(corpus["manifest"])}
    for r, uid in enumerate(batch["meta"]["ids"]):
        assert abs(batch["audio_mask"][r].sum() - by_id[uid].duration * 16000) <= 2


def test_epoch_covers_every_example_once_and_deterministic(corpus, encoder):
    a = _take(_data(corpus, encoder).train_iterator(), 10)
    b = _take(_data(corpus, encoder).train_iterator(), 10)
    assert all(_same(x, y) for x, y in zip(a, b))
    for epoch in (a[:5], a[5:]):
        ids = [i for batch in epoch for i in batch["meta"]["ids"]]
        assert sorted(ids) == sorted(r["id"] for r in corpus["rows"])
    assert [i for x in a[:5] for i in x["meta"]["ids"]] != [i for x in a[5:] for i in x["meta"]["ids"]]
    c = _take(_data(corpus, encoder, seed=1).train_iterator(), 5)
    assert [i for x in a[:5] for i in x["meta"]["ids"]] != [i for x in c for i in x["meta"]["ids"]]
    ordered = _take(_data(corpus, encoder, shuffle=False, bucket_window=1).train_iterator(), 5)
    by_task = sorted(corpus["rows"], key=lambda r: r["task"])  # tasks in name order, each in manifest order
    assert [i for x in ordered for i in x["meta"]["ids"]] == [r["id"] for r in by_task]


def test_state_restore_gives_identical_following_batches(corpus, encoder):
    data = _data(corpus, encoder, joint_share=0.5, descriptions_share=0.5, read_threads=2, prefetch=3)
    it = data.train_iterator()
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _take(it, 6)  # crosses the epoch boundary (5 batches per epoch)
    fresh = _data(corpus, encoder, joint_share=0.5, descriptions_share=0.5).train_iterator()
    fresh.set_state(state)
    got = _take(fresh, 6)
    assert all(_same(x, y) for x, y in zip(expected, got))
    assert [x["meta"]["instructions"] for x in expected] == [x["meta"]["instructions"] for x in got]
    assert fresh.get_state() == it.get_state()


def test_bucket_shapes_bounded_and_padding_small(corpus, encoder):
    data = _data(corpus, encoder, bucket_window=5)
    shapes = {b["meta"]["shape"] for b in _take(data.train_iterator(), 15)}
    assert len(shapes) <= data.train.shape_bound() == 3 * 4 * 4
    assert all(s[0] in (8000, 16000, 32000) for s in shapes)
    # sorting a window by duration: the audio padding is less than without sorting
    def waste(window):
        batches = _take(_data(corpus, encoder, bucket_window=window).train_iterator(), 5)
        return sum(b["audio_mask"].size - b["audio_mask"].sum() for b in batches)
    assert waste(5) < waste(1)


def test_partial_last_batch_is_padded_and_masked(corpus, encoder):
    data = _data(corpus, encoder, batch_size=16)  # 40 = 16 + 16 + 8
    assert data.train.batches_per_epoch == 3
    batches = _take(data.train_iterator(), 3)
    assert [int(b["example_mask"].sum()) for b in batches] == [16, 16, 8]
    last = batches[-1]
    assert not last["example_mask"][8:].any() and last["meta"]["ids"][8:] == [None] * 8
    assert (last["target_mask"][8:].sum(1) == 1).all() and (last["audio"][8:] == 0).all()


def test_mixing_weights(corpus, encoder):
    counts = mixture_counts([10, 30, 5], [0.5, 0.3, 0.2], 1000)
    assert list(counts) == [500, 300, 200]
    plan = plan_epoch([np.ones(10), np.ones(30), np.ones(5)], [0.5, 0.3, 0.2], 0, 0, 50, 4, True, 1000)
    first = np.concatenate(plan.batches[:4])  # 200 positions in 4 batches: proportions hold locally too
    assert abs(np.mean(plan.source[first] == 0) - 0.5) < 0.12
    assert sum(len(b) for b in plan.batches) == 1000
    # a source smaller than its share wraps around: whole passes, each example equally often
    assert list(np.bincount(plan.index[plan.source == 2])) == [40] * 5
    assert list(np.bincount(plan.index[plan.source == 0])) == [50] * 10
    weights = {"asr": 0.4, "er": 0.2, "kws": 0.2, "sc": 0.2}
    data = _data(corpus, encoder, mix_weights=weights, epoch_examples=40)
    tasks = [t for b in _take(data.train_iterator(), 20) for t in b["meta"]["tasks"]]
    for task, w in weights.items():
        assert tasks.count(task) == int(w * 160)  # exact per epoch (largest remainder)
    only_asr = _data(corpus, encoder, mix_weights={"asr": 1.0})
    assert only_asr.stats() == {"filtered/task_not_in_mix": 24}
    assert {t for b in _take(only_asr.train_iterator(), 2) for t in b["meta"]["tasks"]} == {"asr"}


def test_training_and_inference_prompts_are_the_same(corpus, encoder):
    """The loader's instruction for a row == build_instruction on the same example and choice."""
    data = _data(corpus, encoder, joint_share=0.5, descriptions_share=0.5, label_overrides={"sc": ["one", "two"]})
    by_id = {e.id: e for e in read_manifest(corpus["manifest"])}  # what an inference script reads
    seen_joint = 0
    for batch in _take(data.train_iterator(), 5):
        m = batch["meta"]
        for r, uid in enumerate(m["ids"]):
            ex = by_id[uid]
            text = T.build_instruction(ex.task, ex, m["choices"][r], split="seen",
                                       with_descriptions=m["descriptions"][r], joint=m["joint"][r],
                                       label_overrides={"sc": ["one", "two"]})
            assert text == m["instructions"][r]
            ids = encoder.encode([text])[0]
            assert list(batch["instruction_ids"][r, :len(ids)]) == ids
            if m["joint"][r]:
                seen_joint += 1
                assert ex.task in T.JOINT_TASKS_DEFAULT
                out = T.parse_joint_output(m["targets"][r], ex.task)
                assert out.transcript == ex.get("transcript") and out.answer == ex.target
    assert seen_joint > 0


def test_joint_share(corpus, encoder):
    data = _data(corpus, encoder, joint_share=1.0, joint_tasks=("er",))
    rows = [(t, j) for b in _take(data.train_iterator(), 5) for t, j in zip(b["meta"]["tasks"], b["meta"]["joint"])]
    assert all(j == (t == "er") for t, j in rows)
    assert sum(j for _, j in rows) == 8


def test_sharding_splits_rows_and_keeps_shapes(corpus, encoder):
    full = _take(_data(corpus, encoder).train_iterator(), 5)
    halves = [_take(_data(corpus, encoder, shard_index=k, shard_count=2).train_iterator(), 5) for k in (0, 1)]
    for f, h0, h1 in zip(full, *halves):
        assert h0["audio"].shape == h1["audio"].shape == (4, f["audio"].shape[1])
        assert h0["target_ids"].shape == h1["target_ids"].shape == (4, f["target_ids"].shape[1])
        assert h0["meta"]["ids"] + h1["meta"]["ids"] == f["meta"]["ids"]
        assert np.array_equal(np.concatenate([h0["audio"], h1["audio"]]), f["audio"])
    import grain

    opts = ManifestData(_cfg(corpus), encoder, shard_options=grain.sharding.ShardOptions(1, 2))
    assert _same(next(opts.train_iterator()), halves[1][0])
    with pytest.raises(ValueError, match="divide"):
        _data(corpus, encoder, batch_size=6, shard_index=0, shard_count=4)


def test_eval_batches_one_ordered_pass(corpus, encoder):
    data = _data(corpus, encoder, eval_manifests=[corpus["manifest"]], mix_weights={"asr": 1.0}, joint_share=1.0)
    a = list(data.eval_batches())
    b = list(data.eval_batches())
    assert len(a) == 5 and all(_same(x, y) for x, y in zip(a, b))
    ids = [i for x in a for i in x["meta"]["ids"]]
    assert sorted(ids) == sorted(r["id"] for r in corpus["rows"])  # every task, no mixing filter
    assert not any(j for x in a for j in x["meta"]["joint"])


def _bad_corpus(corpus, tmp_path):
    """Good rows plus every load-time failure and two manifest-level ones."""
    wav = corpus["root"] / "wav"
    sf.write(str(tmp_path / "nan.wav"), np.full(4000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "long.wav"), np.zeros(40000, np.float32), 16000)  # 2.5 s
    sf.write(str(tmp_path / "gone.wav"), np.zeros(4000, np.float32), 16000)
    sf.write(str(tmp_path / "liar.wav"), np.zeros(24000, np.float32), 16000)  # 1.5 s, manifest says 0.3 s
    sf.write(str(tmp_path / "rot.wav"), np.zeros(4000, np.float32), 16000)  # corrupted after reading
    good = [dict(r, audio=str(wav / os.path.basename(r["audio"]))) for r in corpus["rows"][:7]]
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"audio": "nan.wav", "task": "asr", "target": "nan audio", "id": "nan"}),
        json.dumps({"audio": "long.wav", "task": "asr", "target": "too long", "id": "long"}),
        json.dumps({"audio": "gone.wav", "task": "asr", "target": "deleted later", "id": "gone"}),
        json.dumps({"audio": "liar.wav", "task": "asr", "target": "wrong duration", "id": "liar", "duration": 0.3}),
        json.dumps({"audio": "rot.wav", "task": "asr", "target": "corrupt later", "id": "rot"}),
        json.dumps({"audio": "nan.wav", "task": "asr", "target": " ".join(["word"] * 80), "id": "wordy"}),
        '{"audio": broken',
        json.dumps({"audio": "nan.wav", "task": "mystery", "target": "x"}),
    ]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


def test_bad_input_skipped_counted_and_summarised(corpus, encoder, tmp_path):
    manifest = _bad_corpus(corpus, tmp_path)
    cfg = dict(train_manifests=[manifest], audio_buckets_seconds=(0.5, 1.0, 2.0), batch_size=4, shuffle=False,
               bucket_window=1)
    data = _data(corpus, encoder, **cfg)
    os.remove(tmp_path / "gone.wav")  # present when the manifest was read, gone at load time
    (tmp_path / "rot.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    build = {"skipped/malformed_json": 1, "skipped/unknown_task": 1, "filtered/audio_too_long": 1,
             "filtered/target_too_long": 1}
    assert data.stats() == build
    it = data.train_iterator()
    epoch = _take(it, data.train.batches_per_epoch)  # 7 good + nan + gone + liar + rot = 11 -> 3 batches
    assert len(epoch) == 3
    load = {"skipped/nonfinite_audio": 1, "skipped/missing_file": 1, "skipped/duration_mismatch": 1,
            "skipped/unreadable_audio": 1}
    assert it.epoch_summaries == {0: {**build, **load}}
    assert sum(int(b["example_mask"].sum()) for b in epoch) == 7
    _take(it, 3)
    assert it.epoch_summaries[1] == {**build, **load}
    assert data.stats() == {**build, **{k: 2 * v for k, v in load.items()}}
    wheres = [w for _, w, _ in it.stats.first]
    assert f"{manifest}:8" in wheres and f"{manifest}:10" in wheres and f"{manifest}:11" in wheres


def test_strict_raises_with_file_and_line(corpus, encoder, tmp_path):
    manifest = _bad_corpus(corpus, tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl:14: malformed_json"):
        _data(corpus, encoder, train_manifests=[manifest], strict=True)
    lines = open(manifest).read().splitlines()
    only_nan = tmp_path / "nan_only.jsonl"
    only_nan.write_text("\n".join(lines[:8]) + "\n")
    data = _data(corpus, encoder, train_manifests=[str(only_nan)], strict=True, shuffle=False, bucket_window=1)
    it = data.train_iterator()
    with pytest.raises(DataError, match=r"nan_only\.jsonl:8: nonfinite_audio"):
        _take(it, 2)


def test_long_audio_chunked_for_chunk_tasks(corpus, encoder, tmp_path):
    sf.write(str(tmp_path / "long.wav"), np.ones(int(4.5 * 16000), np.float32) * 0.1, 16000)
    m = tmp_path / "sns.jsonl"
    m.write_text(json.dumps({"audio": "long.wav", "task": "sns", "target": "speech", "id": "L"}) + "\n"
                 + json.dumps({"audio": "long.wav", "task": "asr", "target": "long speech", "id": "A"}) + "\n")
    data = _data(corpus, encoder, train_manifests=[str(m)], long_audio="chunk", chunk_tasks=("sns",), batch_size=4)
    assert data.stats() == {"filtered/audio_too_long": 1, "info/chunked_windows": 3}
    batch = next(data.train_iterator())
    assert sorted(i for i in batch["meta"]["ids"] if i) == ["L#0", "L#1", "L#2"]
    assert batch["audio"].shape[1] == 32000 and batch["audio_mask"][batch["example_mask"]].sum() == 72000
    with pytest.raises(ValueError, match="largest audio bucket"):
        _data(corpus, encoder, max_audio_seconds=5.0)


def test_worker_processes_give_the_same_batches(corpus, encoder):
    serial = _take(_data(corpus, encoder).train_iterator(), 4)
    it = _data(corpus, encoder, worker_count=1, worker_buffer=1).train_iterator()
    pooled = _take(it, 4)
    it.close()
    assert all(_same(x, y) for x, y in zip(serial, pooled))



def test_bucket_lengths_bound_padding_and_shapes():
    from speechverse_jax.data.batching import bucket_length, pad_rows

    sizes = [bucket_length(n, 8) for n in range(1, 2001)]
    assert all(n <= s < max(1.5 * n, 8) + 8 for n, s in zip(range(1, 2001), sizes))  # at most 50% padding
    assert all(s % 8 == 0 for s in sizes) and len(set(sizes)) == 16  # 8, 16, 24, 32, 48, ..., 2048
    x, mask = pad_rows([np.ones(100), np.ones(7)], 8, np.float32, bucket=True)
    assert x.shape == (2, 128) and mask.sum() == 107 and x[0, 100:].sum() == 0
