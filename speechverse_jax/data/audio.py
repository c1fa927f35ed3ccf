"""Audio input: any file soundfile or librosa can read -> mono float32 at 16 kHz."""

from __future__ import annotations

from typing import Optional

import numpy as np

from speechverse_jax import fs

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file could not be used; the message names the file and the reason.

    `reason` is one of missing_file, unreadable_audio, empty_audio, nonfinite_audio.
    """

    def __init__(self, message: str, reason: str = "unreadable_audio"):
        super().__init__(message)
        self.reason = reason


def load_audio(path: str, sample_rate: int = SAMPLE_RATE, offset: float = 0.0,
               duration: Optional[float] = None) -> np.ndarray:
    """Read `path` (optionally a segment), downmix to mono, resample to `sample_rate`.

    Returns float32 `[samples]`. Raises AudioError for missing, unreadable, empty or non-finite audio.
    """
    import soundfile as sf

    if fs.is_remote(path):
        return _load_remote(path, sample_rate, offset, duration)
    try:
        info = sf.info(path)
        start = int(round(offset * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        audio, sr = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
        audio = _downmix(audio)
    except FileNotFoundError:
        raise AudioError(f"{path}: file not found", "missing_file") from None
    except Exception as e:  # formats soundfile cannot read (mp3 on old libsndfile, ...)
        if not _exists(path):
            raise AudioError(f"{path}: file not found", "missing_file") from None
        audio, sr = _load_with_librosa(path, offset, duration, e)
    if audio.size == 0:
        segment = f" in segment offset={offset} duration={duration}" if offset or duration else ""
        raise AudioError(f"{path}: no samples{segment}", "empty_audio")
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{path}: contains NaN or inf samples", "nonfinite_audio")
    if sr != sample_rate:
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _downmix(audio: np.ndarray) -> np.ndarray:
    """[samples, channels] -> [samples], the channel mean (column adds: much faster than mean(axis=1))."""
    if audio.shape[1] == 1:
        return audio[:, 0]
    out = audio[:, 0].copy()
    for c in range(1, audio.shape[1]):
        out += audio[:, c]
    return out / np.float32(audio.shape[1])


def _exists(path: str) -> bool:
    if fs.is_remote(path):
        from etils import epath

        return epath.Path(path).exists()
    import os

    return os.path.exists(path)


def _load_with_librosa(path, offset, duration, first_error):
    import warnings

    import librosa

    try:
        with warnings.catch_warnings():  # librosa warns when it falls back to audioread
            warnings.simplefilter("ignore")
            audio, sr = librosa.load(path, sr=None, mono=True, offset=offset, duration=duration)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({first_error}; librosa: {e})") from None
    return audio.astype(np.float32), sr


def probe_duration(path: str) -> float:
    """Duration in seconds from the file header (no decoding where soundfile can read it).

    Raises AudioError (reason missing_file / unreadable_audio / empty_audio).
    """
    import soundfile as sf

    try:
        if fs.is_remote(path):
            with _open_remote(path) as f:
                info = sf.info(f)
        else:
            info = sf.info(path)
        seconds = info.frames / float(info.samplerate)
    except Exception as e:
        if not _exists(path):
            raise AudioError(f"{path}: file not found", "missing_file") from None
        if fs.is_remote(path):
            raise AudioError(f"{path}: unreadable audio header ({e})") from None
        try:  # formats without a soundfile reader: librosa decodes to measure
            import warnings

            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seconds = float(librosa.get_duration(path=path))
        except Exception as e2:
            raise AudioError(f"{path}: unreadable audio ({e}; librosa: {e2})") from None
    if seconds <= 0:
        raise AudioError(f"{path}: no samples", "empty_audio")
    return seconds


def _open_remote(path: str):
    from etils import epath

    return epath.Path(path).open("rb")


def _load_remote(path, sample_rate, offset, duration):
    """`gs://...` and other epath URLs: read the bytes, then decode them like a local file."""
    import tempfile

    try:
        with _open_remote(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise AudioError(f"{path}: file not found", "missing_file") from None
    except Exception as e:
        raise AudioError(f"{path}: cannot read ({e})") from None
    suffix = "." + path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_audio(tmp.name, sample_rate, offset, duration)
        except AudioError as e:
            raise AudioError(str(e).replace(tmp.name, path), e.reason) from None
