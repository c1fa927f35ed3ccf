"""Answer one instruction about many audio files, one bad file never stopping the others.

    results = answer_files(model, ["a.wav", "b.wav"], "What is the speaker's intent?")
    # [{'audio': 'a.wav', 'answer': '...'}, {'audio': 'b.wav', 'error': 'b.wav: contains NaN ...',
    #   'reason': 'nonfinite_audio'}]

A file that is missing, unreadable, empty, NaN/inf or longer than the model's limit gets an
error (reason as in `data.errors`), never a silent truncation; the others are answered.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from speechverse_jax.data.audio import SAMPLE_RATE, AudioError, load_audio


def check_clip(path: str, max_seconds: float) -> np.ndarray:
    """The 16 kHz clip of `path`; AudioError (with `reason`) when it cannot be used."""
    clip = load_audio(path)
    if clip.size > max_seconds * SAMPLE_RATE + 1:
        raise AudioError(f"{path}: {clip.size / SAMPLE_RATE:.2f}s is longer than the model's limit of "
                         f"{max_seconds:g}s; split it into shorter clips (nothing is truncated)", "audio_too_long")
    return clip


def answer_files(model, paths: Sequence[str], instruction: str, num_beams: int = 1, max_new_tokens: int = 64,
                 labels: Optional[Sequence[str]] = None, task: Optional[str] = None,
                 batch_size: int = 8) -> List[Dict[str, Any]]:
    """One result per path, in order: {'audio', 'answer'} or {'audio', 'error', 'reason'}."""
    results: List[Dict[str, Any]] = []
    good: List[int] = []
    clips: List[np.ndarray] = []
    for i, path in enumerate(paths):
        try:
            clips.append(check_clip(path, float(getattr(model, "max_audio_seconds", 30.0))))
            good.append(i)
            results.append({"audio": path})
        except AudioError as e:
            results.append({"audio": path, "error": str(e), "reason": e.reason})
    for start in range(0, len(good), batch_size):
        idx = good[start: start + batch_size]
        answers = model.generate([clips[good.index(i)] for i in idx], [instruction] * len(idx), num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, labels=labels, task=task)
        for i, answer in zip(idx, answers):
            results[i]["answer"] = answer
    return results
