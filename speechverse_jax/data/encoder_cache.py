"""Frozen-encoder outputs computed once and reused for every step of every stage.

The encoder never trains, so its hidden states (all L+1 of them, since the layer weights may
train) are a pure function of the audio. `build_cache` runs it once over the manifests;
`CachedFeatureData` wraps the manifest pipeline and swaps each batch's audio for the cached
states (`hidden_states [B, L+1, frames, dim]`, `frame_mask [B, frames]`), which the train step
accepts in place of audio.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import numpy as np

from speechverse_jax.data.audio import AudioError, load_audio
from speechverse_jax.data.errors import DataError, DataStats
from speechverse_jax.data.manifest import read_manifests
from speechverse_jax.models.wavlm import feature_lengths

log = logging.getLogger(__name__)


class EncoderCache:
    """Example id -> float16 hidden states `[L+1, frames, dim]` of the frozen encoder.

    `skipped`: id -> (reason, 'manifest:line: message') of the clips that could not be encoded
    (unreadable, empty, NaN/inf, longer than the largest bucket); `stats` counts them by reason.
    """

    def __init__(self, states: Dict[str, np.ndarray], skipped: Optional[Dict[str, Tuple[str, str]]] = None,
                 stats: Optional[DataStats] = None):
        self.states = states
        self.skipped = dict(skipped or {})
        self.stats = stats if stats is not None else DataStats()
        self.fingerprint = ""  # what the states were computed from (`source_fingerprint`); "" = unknown

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, key: str) -> bool:
        return key in self.states

    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.states.values()))

    def save(self, path: str, fingerprint: str = "") -> None:
        """One .npz: arrays under positional keys, the example ids (any characters), the skipped
        clips and `fingerprint` (what the states were computed from: `source_fingerprint`) as JSON."""
        ids = list(self.states)
        info = {"ids": ids, "skipped": self.skipped, "counts": dict(self.stats.counts), "fingerprint": fingerprint}
        np.savez(path, **{f"s{i}": self.states[k] for i, k in enumerate(ids)},
                 **{_INFO: np.frombuffer(json.dumps(info).encode(), np.uint8)})

    @classmethod
    def load(cls, path: str) -> "EncoderCache":
        with np.load(path) as f:
            if _INFO in f.files:
                info = json.loads(f[_INFO].tobytes().decode())
                states = {k: f[f"s{i}"] for i, k in enumerate(info["ids"])}
            else:  # written before the ids were stored: keys were ids with '/' spelled '|'
                info = json.loads(f[_SKIPPED].tobytes().decode()) if _SKIPPED in f.files else {}
                states = {k.replace("|", "/"): f[k] for k in f.files if k != _SKIPPED}
        skipped = {k: tuple(v) for k, v in info.get("skipped", {}).items()}
        cache = cls(states, skipped, DataStats.from_counts(info.get("counts", {})))
        cache.fingerprint = info.get("fingerprint", "")
        return cache


def source_fingerprint(base_dir: str, manifests: Sequence[str]) -> str:
    """SHA-256 over what cached states depend on: the manifests' bytes and the base checkpoint's
    files (names, sizes, and the bytes of its small JSON files). A cache whose fingerprint differs
    was computed from other audio or another encoder."""
    import hashlib
    import os

    h = hashlib.sha256()
    for path in manifests:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    for folder, _, files in sorted(os.walk(base_dir)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, base_dir).encode() + str(os.path.getsize(path)).encode())
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


_INFO = "__svj_cache__"
_SKIPPED = "__svj_skipped__"


def build_cache(cfg, wavlm_params: Any, manifests: Sequence[str], batch_size: int = 8,
                bucket_seconds: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0), sample_rate: int = 16000,
                progress: bool = True, strict: bool = False, sharding=None) -> EncoderCache:
    """Run the frozen encoder once over every example of `manifests` (clips grouped by length
    bucket, so it compiles once per bucket). Bad lines and clips (unreadable, empty, NaN/inf,
    longer than the largest bucket) are skipped and counted (`cache.stats`, `cache.skipped`);
    `strict` raises `DataError` (manifest:line) at the first instead. `sharding`: `(mesh,
    logical-axis rules)` when `wavlm_params` live on a mesh, so WavLM's activation constraints
    take effect. `cfg`: the composed model config of either layout (`SpeechVerseConfig` or
    `SpeechVerseDecoderConfig`)."""
    from tqdm import tqdm

    from speechverse_jax.models.layers import with_activation_sharding

    stats = DataStats(strict=strict)
    examples = read_manifests(list(manifests), stats, require_target=False)
    from speechverse_jax.models import composed

    model = composed.module_for(cfg)  # either layout: both run the same frozen WavLM
    encode = jax.jit(with_activation_sharding(
        lambda p, a, m: model.apply({"params": {"wavlm": p}}, a, m, method=type(model).encode_audio),
        *(sharding or (None, ()))))
    buckets = [int(s * sample_rate) for s in bucket_seconds]
    clips, skipped, seen = {}, {}, set()
    for ex in tqdm(examples, desc="load audio", disable=not progress, dynamic_ncols=True):
        if ex.id in seen:
            raise ValueError(f"{ex.where}: example id {ex.id!r} appears twice; cached states need unique ids")
        seen.add(ex.id)
        try:
            audio = load_audio(ex.audio, sample_rate, offset=ex.offset if ex.segment else 0.0,
                               duration=ex.duration if ex.segment else None)
            if audio.size > buckets[-1]:
                raise AudioError(f"{ex.audio}: {audio.size / sample_rate:.1f}s is longer than the largest bucket "
                                 f"({bucket_seconds[-1]}s)", "audio_too_long")
        except AudioError as e:
            if strict and e.reason == "audio_too_long":  # a filter for DataStats; still an error when strict
                raise DataError(e.reason, ex.where, str(e)) from None
            stats.record(e.reason, ex.where, str(e))  # raises DataError when strict
            skipped[ex.id] = (e.reason, f"{ex.where}: {e}")
            continue
        clips[ex.id] = audio
    if stats.counts:
        log.warning(stats.summary("encoder cache: clips skipped"))
    by_bucket: Dict[int, List[str]] = {}
    for key, audio in clips.items():
        by_bucket.setdefault(next(b for b in buckets if b >= audio.size), []).append(key)
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
    return EncoderCache(states, skipped, stats)


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
