"""Sources: the usable examples of each task, after the config's filters (each exclusion counted)."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from speechverse_jax.data.config import mix_weights
from speechverse_jax.data.errors import DataStats
from speechverse_jax.data.manifest import Example
from speechverse_jax.data.tokenizer import TextEncoder

# samples of resampling slack between a manifest duration and the decoded length
SLACK_SAMPLES = 16


@dataclasses.dataclass
class Source:
    """The usable examples of one task; `samples[i]` is the planned audio length of example i."""

    task: str
    examples: List[Example]
    samples: np.ndarray  # int64 [n]
    has_transcript: np.ndarray  # bool [n]


def chunk_example(ex: Example, max_seconds: float) -> List[Example]:
    """Cut a clip into ceil(duration / max_seconds) equal windows (segments) that all fit."""
    n = int(math.ceil(ex.duration / max_seconds - 1e-9))
    length = ex.duration / n
    return [dataclasses.replace(ex, offset=ex.offset + i * length, duration=length, segment=True,
                                id=f"{ex.id}#{i}", fields=dict(ex.fields)) for i in range(n)]


def build_sources(examples: Sequence[Example], cfg, encoder: Optional[TextEncoder], stats: DataStats,
                  use_weights: bool = True) -> Dict[str, Source]:
    """Group by task and apply the config's filters (each exclusion counted in `stats`)."""
    sr = int(cfg.sample_rate)
    max_s = float(cfg.max_audio_seconds)
    weights = mix_weights(cfg) if use_weights else {}
    chunk_tasks = set(cfg.chunk_tasks) if cfg.long_audio == "chunk" else set()
    if cfg.long_audio not in ("drop", "chunk"):
        raise ValueError(f"data.long_audio must be 'drop' or 'chunk', got {cfg.long_audio!r}")
    kept: List[Example] = []
    for ex in examples:
        if weights and weights.get(ex.task, 0.0) <= 0:
            stats.record("task_not_in_mix", ex.where, ex.task)
            continue
        if ex.duration > max_s + 1e-9:
            if ex.task in chunk_tasks:
                windows = chunk_example(ex, max_s)
                stats.record("chunked_windows", ex.where, n=len(windows))
                kept.extend(windows)
                continue
            stats.record("audio_too_long", ex.where, f"{ex.duration:.2f}s > {max_s}s")
            continue
        kept.append(ex)
    # Targets: a T5 piece covers >= 1 character, so only long strings need tokenising.
    max_t = int(cfg.max_target_tokens)
    long_ix = [i for i, ex in enumerate(kept) if len(ex.target) + 2 > max_t]
    drop = set()
    if long_ix:
        if encoder is None:
            raise ValueError("a tokenizer is needed to apply max_target_tokens")
        lengths = [len(x) for x in encoder.encode([kept[i].target for i in long_ix])]
        for i, n in zip(long_ix, lengths):
            if n > max_t:
                drop.add(i)
                stats.record("target_too_long", kept[i].where, f"{n} tokens > {max_t}")
    by_task: Dict[str, List[Example]] = {}
    for i, ex in enumerate(kept):
        if i not in drop:
            by_task.setdefault(ex.task, []).append(ex)
    out = {}
    for task in sorted(by_task):
        exs = by_task[task]
        samples = np.array([int(math.ceil(ex.duration * sr)) + SLACK_SAMPLES for ex in exs], np.int64)
        has_tr = np.array([bool(ex.fields.get("transcript")) for ex in exs], bool)
        out[task] = Source(task, exs, samples, has_tr)
    return out


