"""data/encoder_cache.py: the frozen encoder's states, computed once and fed to training in place of audio.

The reference is the encoder run on each clip alone (`api.SpeechVerseModel.encode`: one clip, no
padding at all), so a cache that lets padding or a neighbouring clip leak into a clip's states fails.
The cache stores float16, so states are compared at float16 resolution (2e-3 of the layer's scale).
"""

import json
import re

import jax
import numpy as np
import pytest
import soundfile as sf

from speechverse_jax import checkpoints
from speechverse_jax.configs import common as config_common
from speechverse_jax.api import SpeechVerseModel
from speechverse_jax.data.errors import DataError
from speechverse_jax.data.encoder_cache import CachedFeatureData, EncoderCache, build_cache
from speechverse_jax.models.config import model_config
from speechverse_jax.models.speechverse import SpeechVerse
from speechverse_jax.models.wavlm import feature_lengths

SR = 16000
TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]
# Seconds per clip: with buckets (0.5, 1.0) and batch_size 3, the 0.25 s clip shares a 0.5 s batch with the
# 0.45 s one, the 0.6 s clip a 1.0 s batch with the 0.95 s one, and each batch has an empty row.
SECONDS = {"spk1/a": 0.25, "spk1/b": 0.45, "spk2/a": 0.6, "spk2/b": 0.95}
BUCKETS = (0.5, 1.0)
TOL = 2e-3  # float16 rounds to 2^-11 of a value; measured max 4.2e-4 of the layer scale, a leak gives 0.16


def _clips(seconds):
    rng = np.random.default_rng(0)
    return {key: (rng.standard_normal(int(sec * SR)) * 0.1).astype(np.float32) for key, sec in seconds.items()}


CLIPS = _clips(SECONDS)


def _write_corpus(root, clips, extra_rows=()):
    """WAV files and an ASR manifest (`train.jsonl`, ids = the clip keys) under `root`."""
    rows = []
    for i, (key, clip) in enumerate(clips.items()):
        name = key.replace("/", "_") + ".wav"
        sf.write(str(root / name), clip, SR, subtype="FLOAT")  # float wav: the clip reads back bit-exact
        rows.append({"audio": name, "task": "asr", "target": TEXTS[i % len(TEXTS)], "id": key})
    path = root / "train.jsonl"
    with open(path, "w") as f:
        for row in rows + list(extra_rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_base):
    """The converted tiny base (float32) with the demo's stage-1 model layout (weighted layers)."""
    return SpeechVerseModel.from_base(tiny_base, model=model_config(layer_combination="weighted", lora_rank=0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("cache_corpus"), CLIPS)


@pytest.fixture(scope="module")
def cache(model, corpus):
    return build_cache(model.cfg, model.params["wavlm"], [corpus], batch_size=3, bucket_seconds=BUCKETS,
                       progress=False)


def _rel_diff(got, ref):
    """Largest |got - ref| over each layer's largest |ref|, per layer -> max over layers."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    scale = np.abs(ref).max(axis=(1, 2), keepdims=True)
    return float((np.abs(got - ref) / scale).max())


def test_cached_states_equal_the_encoder_on_each_clip_alone(model, cache, tmp_path):
    clips = CLIPS
    path = str(tmp_path / "cache.npz")
    cache.save(path)
    written = EncoderCache.load(path)  # what a later run reads back
    assert set(written.states) == set(SECONDS) and len(written) == len(SECONDS)
    layers = model.cfg.wavlm.num_hidden_layers + 1
    for key, clip in clips.items():
        ref = model.encode([clip])[0]  # [L+1, frames, dim], float32, nothing padded
        got = written.states[key]
        assert got.dtype == np.float16
        assert got.shape == (layers, int(feature_lengths(model.cfg.wavlm, clip.size)), model.cfg.wavlm.hidden_size)
        assert ref.shape == got.shape
        assert _rel_diff(got, ref) < TOL, key
        np.testing.assert_array_equal(got, cache.states[key])  # save / load is exact
    assert written.nbytes() == cache.nbytes() == sum(s.nbytes for s in cache.states.values())


def test_padding_and_batch_neighbours_do_not_leak(model, cache, tmp_path):
    """The same clip cached alone and cached next to a longer clip (padded to the bucket) gives the same
    states; and the tolerance is tight enough to see a leak: treating the padding as audio is caught."""
    clips = CLIPS
    short = "spk2/a"  # 0.6 s, batched with the 0.95 s clip in the 1.0 s bucket
    manifest = _write_corpus(tmp_path, {short: clips[short]})
    alone = build_cache(model.cfg, model.params["wavlm"], [manifest], batch_size=1, bucket_seconds=(0.6,),
                        progress=False)  # a batch of one, padded by nothing
    assert alone.states[short].shape == cache.states[short].shape
    assert _rel_diff(cache.states[short], alone.states[short]) < TOL

    # control: the 1.0 s padded batch with the mask switched on over the padding (a leak) differs
    encode = jax.jit(lambda p, a, m: SpeechVerse(model.cfg).apply({"params": {"wavlm": p}}, a, m,
                                                                  method=SpeechVerse.encode_audio))
    audio = np.zeros((1, int(BUCKETS[-1] * SR)), np.float32)
    audio[0, : clips[short].size] = clips[short]
    hidden, _ = encode(model.params["wavlm"], audio, np.ones_like(audio, bool))
    frames = alone.states[short].shape[1]
    leaky = np.stack([np.asarray(h)[0, :frames] for h in hidden])
    assert _rel_diff(leaky, alone.states[short]) > 10 * TOL


def test_save_load_round_trip_keeps_ids_with_slashes(tmp_path):
    rng = np.random.default_rng(1)
    states = {"a/b/c": rng.standard_normal((3, 5, 4)).astype(np.float16), "plain": np.zeros((3, 0, 4), np.float16)}
    cache = EncoderCache(states)
    assert "a/b/c" in cache and "a|b|c" not in cache
    cache.save(str(tmp_path / "c.npz"))
    back = EncoderCache.load(str(tmp_path / "c.npz"))
    assert set(back.states) == set(states)
    for k, v in states.items():
        assert back.states[k].dtype == v.dtype and back.states[k].shape == v.shape
        np.testing.assert_array_equal(back.states[k], v)


def test_reuse_only_while_the_audio_and_the_encoder_are_the_same(tmp_path, monkeypatch):
    """The demo reuses `encoder_cache.npz` only when its fingerprint (manifests + base checkpoint)
    matches; a changed manifest or encoder makes it compute the states again."""
    from speechverse_jax import checkpoints
    from speechverse_jax.data import encoder_cache as cache_lib
    from speechverse_jax.demo import run as demo_run

    base, corpus = tmp_path / "base", tmp_path / "corpus"
    base.mkdir()
    corpus.mkdir()
    (base / "model_config.json").write_text('{"a": 1}')
    for split in ("train", "dev", "test"):
        (corpus / f"{split}.jsonl").write_text(f'{{"id": "{split}"}}\n')
    manifests = [str(corpus / f"{s}.jsonl") for s in ("train", "dev", "test")]
    path = str(tmp_path / "encoder_cache.npz")
    fp = cache_lib.source_fingerprint(str(base), manifests)
    assert fp == cache_lib.source_fingerprint(str(base), manifests)
    EncoderCache({"spk1/a": np.ones((3, 2, 4), np.float16)}).save(path, fp)

    built = []
    monkeypatch.setattr(checkpoints, "model_config_for", lambda model, base_dir: None)
    monkeypatch.setattr(checkpoints, "load_base_params", lambda d: {"wavlm": None})
    monkeypatch.setattr(cache_lib, "build_cache", lambda *a, **k: built.append(1) or
                        EncoderCache({"new": np.zeros((3, 1, 4), np.float16)}))

    class Config:
        class stage1:
            class data:
                audio_buckets_seconds = (1.0,)
            model = None

    reused = demo_run.encoder_cache(Config, str(base), str(corpus), path, progress=False)
    assert not built and set(reused.states) == {"spk1/a"}
    (corpus / "dev.jsonl").write_text('{"id": "dev2"}\n')  # other audio: computed again
    assert set(demo_run.encoder_cache(Config, str(base), str(corpus), path, progress=False).states) == {"new"}
    assert built == [1]
    assert set(demo_run.encoder_cache(Config, str(base), str(corpus), path, progress=False).states) == {"new"}
    (base / "model_config.json").write_text('{"a": 2}')  # another encoder: computed again
    demo_run.encoder_cache(Config, str(base), str(corpus), path, progress=False)
    assert built == [1, 1]


def test_unusable_lines_and_bad_clips_are_skipped_and_counted(model, tmp_path):
    wavlm = model.params["wavlm"]
    skipped_rows = ['{"audio": "a.wav", "task": "asr"',  # malformed JSON
                    {"audio": "gone.wav", "task": "asr", "target": "x", "id": "gone"},  # missing file
                    {"audio": "spk1_a.wav", "task": "nope", "target": "x", "id": "badtask"}]  # unknown task
    one = {"spk1/a": CLIPS["spk1/a"]}
    manifest = _write_corpus(tmp_path, one, extra_rows=skipped_rows)
    cache = build_cache(model.cfg, wavlm, [manifest], batch_size=2, bucket_seconds=BUCKETS, progress=False)
    assert set(cache.states) == {"spk1/a"}  # read_manifests skips (and counts) the unusable lines

    dup = tmp_path / "dup"
    dup.mkdir()
    manifest = _write_corpus(dup, one, extra_rows=[
        {"audio": "spk1_a.wav", "task": "asr", "target": "again", "id": "spk1/a"}])
    with pytest.raises(ValueError, match=r"train\.jsonl.*2.*'spk1/a' appears twice"):
        build_cache(model.cfg, wavlm, [manifest], bucket_seconds=BUCKETS, progress=False)

    # clips that cannot be encoded are skipped and counted (named by manifest line), or raise when strict
    long = tmp_path / "long"
    long.mkdir()
    manifest = _write_corpus(long, {"spk9/long": np.zeros(int(1.2 * SR), np.float32), **one})
    cache = build_cache(model.cfg, wavlm, [manifest], bucket_seconds=BUCKETS, progress=False)
    assert set(cache.states) == {"spk1/a"}
    reason, where = cache.skipped["spk9/long"]
    assert reason == "audio_too_long" and "train.jsonl:1" in where and "longer than the largest bucket" in where
    with pytest.raises(DataError, match=r"train\.jsonl:1"):
        build_cache(model.cfg, wavlm, [manifest], bucket_seconds=BUCKETS, progress=False, strict=True)

    nan = tmp_path / "nan"
    nan.mkdir()
    sf.write(str(nan / "nan.wav"), np.full(4000, np.nan, np.float32), SR, subtype="FLOAT")
    (nan / "m.jsonl").write_text(json.dumps({"audio": "nan.wav", "task": "asr", "target": "x", "id": "n"}) + "\n")
    cache = build_cache(model.cfg, wavlm, [str(nan / "m.jsonl")], bucket_seconds=BUCKETS, progress=False)
    assert not cache.states and cache.skipped["n"][0] == "nonfinite_audio" and "nan.wav" in cache.skipped["n"][1]
    with pytest.raises(DataError, match=r"m\.jsonl:1.*contains NaN"):
        build_cache(model.cfg, wavlm, [str(nan / "m.jsonl")], bucket_seconds=BUCKETS, progress=False, strict=True)


def test_cached_feature_data_swaps_loader_audio_for_cached_states(model, corpus, cache, tiny_base):
    """Real loader batches (the demo's path): audio goes, the cached states and their frame mask come in,
    matching the encoder on that batch's own audio; everything else passes through untouched."""
    from speechverse_jax.train.curriculum import make_data

    manifest, clips = corpus, CLIPS
    config = config_common.stage_config("stage1", batch_size=4)
    config.base_checkpoint = tiny_base
    config.data.train_manifests = config.data.eval_manifests = manifest
    config.data.update(audio_buckets_seconds=BUCKETS, max_audio_seconds=1.0, instruction_buckets=(64, 128, 256),
                       target_buckets=(32,), max_target_tokens=32, read_threads=0)
    wavlm_cfg = checkpoints.load_model_config(tiny_base)[0]
    data = CachedFeatureData(make_data(config), cache, wavlm_cfg)
    assert data.task_names == data.data.task_names
    encode = jax.jit(lambda p, a, m: SpeechVerse(model.cfg).apply({"params": {"wavlm": p}}, a, m,
                                                                  method=SpeechVerse.encode_audio))
    it = data.train_iterator()
    raw_it = data.data.train_iterator()
    seen = set()
    for _ in range(3):
        raw, got = next(raw_it), next(it)
        assert "audio" not in got and "audio_mask" not in got
        for k in ("instruction_ids", "target_ids", "target_mask", "task_id", "example_mask"):
            np.testing.assert_array_equal(got[k], raw[k], err_msg=k)
        assert got["meta"]["ids"] == raw["meta"]["ids"]
        hidden, frame_mask = encode(model.params["wavlm"], raw["audio"], raw["audio_mask"])
        ref = np.stack([np.asarray(h) for h in hidden], axis=1)  # [b, L+1, frames, dim]
        assert got["hidden_states"].dtype == np.float16 and got["hidden_states"].shape == ref.shape
        live = raw["example_mask"]
        np.testing.assert_array_equal(got["frame_mask"][live], np.asarray(frame_mask)[live])
        for r in np.flatnonzero(live):
            n = int(got["frame_mask"][r].sum())
            assert n == int(feature_lengths(wavlm_cfg, clips[raw["meta"]["ids"][r]].size))
            assert _rel_diff(got["hidden_states"][r, :, :n], ref[r, :, :n]) < TOL
            assert not got["hidden_states"][r, :, n:].any()  # frames past the clip stay zero
            seen.add(raw["meta"]["ids"][r])
    assert len(seen) >= 3
    assert it.get_state() == raw_it.get_state()  # resume state is the loader's own

    batch = next(data.data.train_iterator())
    first = next(i for i in batch["meta"]["ids"] if i)
    stale = CachedFeatureData(data.data, EncoderCache({k: v for k, v in cache.states.items() if k != first}),
                              wavlm_cfg)
    with pytest.raises(KeyError, match=re.escape(repr(first)) + " has no cached encoder states"):
        stale.swap(batch)


def test_ids_with_a_bar_survive_save_and_load(tmp_path):
    EncoderCache({"spk|1": np.zeros((3, 1, 4), np.float16)}).save(str(tmp_path / "c.npz"))
    assert set(EncoderCache.load(str(tmp_path / "c.npz")).states) == {"spk|1"}
