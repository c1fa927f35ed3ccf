"""Deterministic random batches in the train step's batch format (tests, benchmarks, compile checks)."""

from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np


def random_batch(seed: int, batch_size: int, samples: int, instruction_len: int, target_len: int,
                 vocab_size: int, num_tasks: int = 1, min_fraction: float = 0.5) -> Dict[str, np.ndarray]:
    """Audio `[B, samples]` and token ids with random valid lengths (at least `min_fraction` of each)."""
    rng = np.random.default_rng(seed)

    def lengths(n):
        return rng.integers(max(1, int(n * min_fraction)), n + 1, batch_size)

    a_len, i_len, t_len = lengths(samples), lengths(instruction_len), lengths(target_len)
    audio_mask = np.arange(samples)[None] < a_len[:, None]
    instruction_mask = np.arange(instruction_len)[None] < i_len[:, None]
    target_mask = np.arange(target_len)[None] < t_len[:, None]
    return {
        "audio": (rng.standard_normal((batch_size, samples)).astype(np.float32) * 0.1) * audio_mask,
        "audio_mask": audio_mask,
        "instruction_ids": (rng.integers(3, vocab_size, (batch_size, instruction_len)) * instruction_mask).astype(np.int32),
        "instruction_mask": instruction_mask,
        "target_ids": (rng.integers(3, vocab_size, (batch_size, target_len)) * target_mask).astype(np.int32),
        "target_mask": target_mask,
        "task_id": rng.integers(0, num_tasks, batch_size).astype(np.int32),
        "example_mask": np.ones(batch_size, bool),
    }


class SyntheticIterator:
    """Batch `i` is `random_batch(seed + i, ...)`; state is the index, so resume is exact."""

    def __init__(self, seed: int = 0, **shape):
        self.seed, self.shape, self.index = seed, shape, 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = random_batch(self.seed + self.index, **self.shape)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


class SyntheticData:
    """A `TrainData` of random batches: an endless train stream and a fixed eval set."""

    def __init__(self, batch_size=8, samples=8000, instruction_len=8, target_len=8, vocab_size=64,
                 task_names: List[str] = ("asr",), seed: int = 0, eval_batches: int = 1):
        self.task_names = list(task_names)
        self.seed, self._eval_n = seed, eval_batches
        self.shape = dict(batch_size=batch_size, samples=samples, instruction_len=instruction_len,
                          target_len=target_len, vocab_size=vocab_size, num_tasks=len(self.task_names))

    def train_iterator(self) -> Iterator[Dict[str, np.ndarray]]:
        return SyntheticIterator(self.seed, **self.shape)

    def eval_batches(self):
        return [random_batch(10_000_000 + self.seed + i, **self.shape) for i in range(self._eval_n)]

    def stats(self) -> Dict[str, int]:
        return {}
