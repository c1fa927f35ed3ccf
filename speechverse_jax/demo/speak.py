"""Speaking the demo corpus: espeak-ng speech, synthetic non-speech, and rendering clip specs to WAVs.

A clip spec (made by demo/corpus.py's planning) is plain data: `render(spec)` turns it into
16 kHz float32 audio deterministically (the spec carries its own seed).
"""

from __future__ import annotations

import concurrent.futures
import io
import shutil
import subprocess
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np

from speechverse_jax.data.audio import SAMPLE_RATE


def check_espeak() -> str:
    path = shutil.which("espeak-ng")
    if not path:
        from speechverse_jax.errors import MissingToolError

        raise MissingToolError("espeak-ng is not installed; the demo corpus needs it: "
                               "`apt-get install espeak-ng sox` (`make demo` installs them)")
    return path


def espeak(text: str, voice: str, speed: int, pitch: int, gap: int = 0) -> np.ndarray:
    """espeak-ng -> float32 mono at 16 kHz."""
    import soundfile as sf
    import soxr

    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-g", str(gap), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r} ({voice}): {proc.stderr.decode(errors='replace')}")
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    return soxr.resample(audio[:, 0], sr, SAMPLE_RATE).astype(np.float32)


def trim(audio: np.ndarray, margin: float = 0.08, threshold: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence, keeping `margin` seconds."""
    loud = np.flatnonzero(np.abs(audio) > threshold * (np.abs(audio).max() + 1e-9))
    if loud.size == 0:
        return audio
    pad = int(margin * SAMPLE_RATE)
    return audio[max(0, loud[0] - pad):loud[-1] + pad]


def synth_noise(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Non-speech audio: coloured noise, tones, beeps, chirps, mains hum or near-silence."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kind in ("white", "silence"):
        x = rng.standard_normal(n)
    elif kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        x = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(spec.size), 1)), n)
    elif kind == "brown":
        x = np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(801) / 801, mode="same")  # drop the drift
    elif kind == "tone":
        f = rng.uniform(150, 2000)
        x = np.sin(2 * np.pi * f * t) + rng.uniform(0, 0.5) * np.sin(4 * np.pi * f * t)
        x *= 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0, 6) * t)
    elif kind == "beeps":
        f, rate = rng.uniform(400, 2500), rng.uniform(1.5, 5)
        x = np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * rate * t) > 0)
    elif kind == "chirp":
        f0, f1 = rng.uniform(100, 500), rng.uniform(1000, 6000)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        phase = 2 * np.pi * f0 * seconds / np.log(f1 / f0) * (np.power(f1 / f0, t / seconds) - 1)
        x = np.sin(phase)
    elif kind == "hum":
        base = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
        x += 0.05 * rng.standard_normal(n)
    else:
        raise ValueError(f"unknown noise type {kind!r}")
    x = x / (np.abs(x).max() + 1e-9)
    if kind == "silence":
        x *= rng.uniform(0.002, 0.01)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))
    return (x * fade).astype(np.float32)


def render(spec: Mapping[str, Any]) -> np.ndarray:
    """A clip spec -> float32 mono 16 kHz audio (deterministic)."""
    rng = np.random.default_rng(spec["seed"])
    if "noise" in spec:
        x = synth_noise(spec["noise"], spec["seconds"], rng)
        return (x * (spec["gain"] if spec["noise"] != "silence" else 1.0)).astype(np.float32)
    pieces = []
    for i, part in enumerate(spec["parts"]):
        if i:
            pieces.append(np.zeros(int(spec["pause"] * SAMPLE_RATE), np.float32))
        pieces.append(trim(espeak(part["text"], part["voice"], part["speed"], part["pitch"], part["gap"])))
    x = np.concatenate(pieces)
    x = x / (np.abs(x).max() + 1e-9) * spec["gain"]
    if spec.get("snr_db") is not None:
        noise = rng.standard_normal(x.size)
        x = x + noise * np.sqrt(np.mean(x ** 2) / 10 ** (spec["snr_db"] / 10))
    return np.clip(x, -1, 1).astype(np.float32)


def render_to(job: Tuple[str, Mapping[str, Any]]) -> Tuple[Optional[float], Optional[Tuple[str, str]]]:
    """Render and write one clip -> (seconds, None), or (None, (reason, message)) when the clip
    cannot be made (espeak-ng failed, no samples, NaN/inf): that row is skipped and counted."""
    import soundfile as sf

    path, spec = job
    try:
        audio = render(spec)
    except Exception as e:  # noqa: BLE001 - one failed clip must not stop the corpus
        return None, ("render_failed", f"{path}: {type(e).__name__}: {e}")
    if audio.size == 0:
        return None, ("empty_audio", f"{path}: no samples")
    if not np.all(np.isfinite(audio)):
        return None, ("nonfinite_audio", f"{path}: contains NaN or inf samples")
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return audio.size / SAMPLE_RATE, None


def render_all(jobs: List[Tuple[str, Mapping[str, Any]]], workers: int, progress: bool) -> List[tuple]:
    """Render (path, spec) jobs to 16-bit WAVs on `workers` threads; -> `render_to`'s result per clip."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="espeak-ng clips", unit="clip", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = []
        for seconds in pool.map(render_to, jobs):
            out.append(seconds)
            bar.update(1)
    bar.close()
    return out
