"""Audio input: any file soundfile or librosa can read -> mono float32 at 16 kHz."""

from __future__ import annotations

from typing import Optional

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file could not be used; the message names the file and the reason."""


def load_audio(path: str, sample_rate: int = SAMPLE_RATE, offset: float = 0.0,
               duration: Optional[float] = None) -> np.ndarray:
    """Read `path` (optionally a segment), downmix to mono, resample to `sample_rate`.

    Returns float32 `[samples]`. Raises AudioError for missing, unreadable, empty or non-finite audio.
    """
    import soundfile as sf

    try:
        info = sf.info(path)
        start = int(round(offset * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        audio, sr = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    except FileNotFoundError:
        raise AudioError(f"{path}: file not found") from None
    except Exception as e:  # formats soundfile cannot read (mp3 on old libsndfile, ...)
        if not _exists(path):
            raise AudioError(f"{path}: file not found") from None
        audio, sr = _load_with_librosa(path, offset, duration, e)
    if audio.size == 0:
        raise AudioError(f"{path}: no samples" + (f" in segment offset={offset} duration={duration}" if offset or duration else ""))
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{path}: contains NaN or inf samples")
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def _load_with_librosa(path, offset, duration, first_error):
    import librosa

    try:
        audio, sr = librosa.load(path, sr=None, mono=True, offset=offset, duration=duration)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({first_error}; librosa: {e})") from None
    return audio.astype(np.float32), sr
