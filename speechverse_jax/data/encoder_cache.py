"""Frozen-encoder outputs computed once and reused for every step of every stage.

The encoder never trains, so its hidden states (all L+1 of them, since the layer weights may
train) are a pure function of the audio. `build_cache` runs it once over the manifests;
`CachedFeatureData` wraps the manifest pipeline and swaps each batch's audio for the cached
states (`hidden_states [B, L+1, frames, dim]`, `frame_mask [B, frames]`), which the train step
accepts in place of audio.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import jax
import numpy as np

from speechverse_jax.data.audio import load_audio
from speechverse_jax.data.manifest import read_manifests
from speechverse_jax.models.speechverse import SpeechVerse, SpeechVerseConfig
from speechverse_jax.models.wavlm import feature_lengths


class EncoderCache:
    """Example id -> float16 hidden states `[L+1, frames, dim]` of the frozen encoder."""

    def __init__(self, states: Dict[str, np.ndarray]):
        self.states = states

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, key: str) -> bool:
        return key in self.states

    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.states.values()))

    def save(self, path: str) -> None:
        np.savez(path, **{k.replace("/", "|"): v for k, v in self.states.items()})

    @classmethod
    def load(cls, path: str) -> "EncoderCache":
        with np.load(path) as f:
            return cls({k.replace("|", "/"): f[k] for k in f.files})


def build_cache(cfg: SpeechVerseConfig, wavlm_params: Any, manifests: Sequence[str], batch_size: int = 8,
                bucket_seconds: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0), sample_rate: int = 16000,
                progress: bool = True, sharding=None) -> EncoderCache:
    """Run the frozen encoder once over every example of `manifests` (clips grouped by length
    bucket, so it compiles once per bucket). `sharding`: `(mesh, logical-axis rules)` when
    `wavlm_params` live on a mesh, so WavLM's activation constraints take effect."""
    from speechverse_jax.models.layers import with_activation_sharding

    from tqdm import tqdm

    examples = read_manifests(list(manifests), require_target=False)
    model = SpeechVerse(cfg)
    encode = jax.jit(with_activation_sharding(
        lambda p, a, m: model.apply({"params": {"wavlm": p}}, a, m, method=SpeechVerse.encode_audio),
        *(sharding or (None, ()))))
    buckets = [int(s * sample_rate) for s in bucket_seconds]
    clips = {}
    for ex in tqdm(examples, desc="load audio", disable=not progress, dynamic_ncols=True):
        if ex.id in clips:
            raise ValueError(f"{ex.where}: example id {ex.id!r} appears twice; cached states need unique ids")
        clips[ex.id] = load_audio(ex.audio, sample_rate, offset=ex.offset if ex.segment else 0.0,
                                  duration=ex.duration if ex.segment else None)
    by_bucket: Dict[int, List[str]] = {}
    for key, audio in clips.items():
        fit = next((b for b in buckets if b >= audio.size), None)
        if fit is None:
            raise ValueError(f"example {key}: {audio.size / sample_rate:.1f}s is longer than the largest bucket")
        by_bucket.setdefault(fit, []).append(key)
    states = {}
    bar = tqdm(total=len(clips), desc="encode (frozen WavLM)", disable=not progress, dynamic_ncols=True)
    for n, keys in sorted(by_bucket.items()):
        for i in range(0, len(keys), batch_size):
            chunk = keys[i: i + batch_size]
            audio = np.zeros((batch_size, n), np.float32)
            mask = np.zeros_like(audio, bool)
            for r, key in enumerate(chunk):
                audio[r, : clips[key].size], mask[r, : clips[key].size] = clips[key], True
            hidden, frame_mask = encode(wavlm_params, audio, mask)
            hidden = np.stack([np.asarray(h, np.float16) for h in hidden], axis=1)  # [b, L+1, frames, dim]
            frames = np.asarray(frame_mask).sum(-1)
            for r, key in enumerate(chunk):
                states[key] = hidden[r, :, : frames[r]].copy()
            bar.update(len(chunk))
    bar.close()
    return EncoderCache(states)


class _CachedIterator:
    def __init__(self, inner, swap):
        self.inner, self.swap = inner, swap

    def __iter__(self):
        return self

    def __next__(self):
        return self.swap(next(self.inner))

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


class CachedFeatureData:
    """A `TrainData` whose batches carry cached encoder states instead of audio."""

    def __init__(self, data, cache: EncoderCache, wavlm_cfg):
        self.data, self.cache, self.wavlm_cfg = data, cache, wavlm_cfg
        self.task_names = data.task_names

    def swap(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        ids = batch["meta"]["ids"]
        samples = batch["audio"].shape[1]
        frames = int(feature_lengths(self.wavlm_cfg, samples))
        some = next(iter(self.cache.states.values()))
        hidden = np.zeros((len(ids), some.shape[0], frames, some.shape[-1]), np.float16)
        lengths = np.asarray(feature_lengths(self.wavlm_cfg, batch["audio_mask"].sum(-1)))
        for r, key in enumerate(ids):
            if key is None or not batch["example_mask"][r]:
                continue
            if key not in self.cache:
                raise KeyError(f"example {key!r} has no cached encoder states (build the cache over its manifest)")
            st = self.cache.states[key]
            n = min(st.shape[1], frames)
            hidden[r, :, :n] = st[:, :n]
            lengths[r] = n
        out = {k: v for k, v in batch.items() if k not in ("audio", "audio_mask")}
        out["hidden_states"] = hidden
        out["frame_mask"] = np.arange(frames)[None, :] < lengths[:, None]
        return out

    def train_iterator(self):
        return _CachedIterator(self.data.train_iterator(), self.swap)

    def eval_batches(self) -> Iterable[Dict[str, Any]]:
        return (self.swap(b) for b in self.data.eval_batches())

    def stats(self) -> Dict[str, int]:
        return self.data.stats()
