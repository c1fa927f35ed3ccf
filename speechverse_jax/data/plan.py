"""The epoch plan: which example sits at each stream position and how positions form batches.

This is the determinism contract of the data pipeline: a pure numpy function of the source sizes,
the mixing weights, the epoch, the seed and the batch settings, identical on every process.

 - Epoch `e` is `epoch_examples` stream positions (default: all examples once). Each task gets
   a share equal to its normalised `mix_weights` (largest-remainder rounding; no weights =
   proportional to size). A task's examples are walked in a seeded permutation that is redrawn
   each time the task wraps around; the tasks' slots are interleaved in a seeded order.
 - Bucketing: consecutive windows of `bucket_window` global batches are sorted by duration and
   cut into batches of `batch_size`; the full batches of the epoch are shuffled (seeded). At most
   one batch per epoch is partial: it comes last.
 - Per-position draws (prompt index, joint decoding, label descriptions) come from seeded
   generators, so the same batch index always gives the same batch.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

def mixture_counts(sizes: Sequence[int], weights: Optional[Sequence[float]], total: int) -> np.ndarray:
    """Examples per source in an epoch of `total`: proportional to `weights` (default: sizes),
    rounded by largest remainder so they sum to `total`."""
    sizes = np.asarray(sizes, np.float64)
    w = sizes if weights is None else np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {list(w)}")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = int(total - counts.sum())
    if rest:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


@dataclasses.dataclass
class EpochPlan:
    """Stream positions of one epoch and how they are batched.

    source/index [E]: which example sits at each position; choice/joint_u/desc_u [E]: the
    per-position draws; batches: position arrays, all of length batch_size except maybe the last.
    """

    source: np.ndarray
    index: np.ndarray
    choice: np.ndarray
    joint_u: np.ndarray
    desc_u: np.ndarray
    batches: List[np.ndarray]


def _source_positions(n: int, start: int, count: int, seed: int, source: int, shuffle: bool) -> np.ndarray:
    """Elements [start, start+count) of a source's endless walk: a new permutation per pass."""
    k = np.arange(start, start + count, dtype=np.int64)
    if not shuffle:
        return k % n
    out = np.empty(count, np.int64)
    cycles = k // n
    for c in np.unique(cycles):
        perm = np.random.default_rng([seed, 1, source, int(c)]).permutation(n)
        sel = cycles == c
        out[sel] = perm[k[sel] % n]
    return out


def plan_epoch(samples: Sequence[np.ndarray], weights: Optional[Sequence[float]], epoch: int, seed: int,
               batch_size: int, window: int, shuffle: bool, total: int,
               keys: Optional[Sequence[int]] = None) -> EpochPlan:
    """The epoch's stream (mixed sources) and its bucketed batches; see the module docstring.

    samples: per source, the planned audio length of each example; keys: a stable id per source
    (the task id) so a source's order does not change when other sources are added.
    """
    sizes = [len(s) for s in samples]
    keys = list(range(len(sizes))) if keys is None else list(keys)
    counts = mixture_counts(sizes, weights, total)
    src = np.repeat(np.arange(len(sizes), dtype=np.int32), counts)
    idx = np.concatenate([_source_positions(n, epoch * c, c, seed, keys[s], shuffle)
                          for s, (n, c) in enumerate(zip(sizes, counts))]) if total else np.zeros(0, np.int64)
    if shuffle:
        order = np.random.default_rng([seed, 2, epoch]).permutation(total)
        src, idx = src[order], idx[order]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    lengths = np.concatenate([np.asarray(s, np.int64) for s in samples])[offsets[src] + idx] if total \
        else np.zeros(0, np.int64)
    batches: List[np.ndarray] = []
    span = max(int(window), 1) * batch_size
    for start in range(0, total, span):
        pos = np.arange(start, min(start + span, total))
        if window > 1:
            pos = pos[np.argsort(-lengths[pos], kind="stable")]
        batches.extend(pos[i:i + batch_size] for i in range(0, len(pos), batch_size))
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    if shuffle and full:
        full = [full[i] for i in np.random.default_rng([seed, 3, epoch]).permutation(len(full))]
    rng = np.random.default_rng([seed, 4, epoch])
    return EpochPlan(src, idx, rng.integers(0, 2**31 - 1, total), rng.random(total), rng.random(total),
                     full + partial)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (ValueError if none)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"length {n} is larger than every bucket {sorted(buckets)}")
