"""Padding variable-length rows into one array with a mask (the one helper every path uses)."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def bucket_length(n: int, multiple: int = 1) -> int:
    """The smallest of `multiple` x (1, 2, 3, 4, 6, 8, 12, 16, ...) (powers of two and 1.5 times them)
    that holds `n`: at most 50% padding, and a handful of shapes (each is a compilation) over any
    range of lengths."""
    units = -(-max(int(n), 1) // multiple)
    size = 1
    while size < units:
        if size >= 2 and size * 3 // 2 >= units:
            return size * 3 // 2 * multiple
        size *= 2
    return size * multiple


def pad_rows(rows: Sequence[np.ndarray], multiple: int = 1, dtype=None,
             bucket: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Rows `[n_i, ...]` -> (`[b, n, ...]` zero-padded, mask `[b, n]` bool); n = max n_i rounded up
    to a multiple of `multiple`, or with `bucket` to `bucket_length(max n_i, multiple)` (a bounded
    set of compiled shapes). Valid items come first."""
    if not len(rows):
        raise ValueError("pad_rows: no rows")
    dtype = dtype or np.asarray(rows[0]).dtype
    n = max(len(r) for r in rows)
    n = bucket_length(n, multiple) if bucket else -(-max(n, 1) // multiple) * multiple
    out = np.zeros((len(rows), n) + tuple(np.shape(rows[0])[1:]), dtype)
    mask = np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask
