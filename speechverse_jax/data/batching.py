"""Padding variable-length rows into one array with a mask (the one helper every path uses)."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def pad_rows(rows: Sequence[np.ndarray], multiple: int = 1, dtype=None) -> Tuple[np.ndarray, np.ndarray]:
    """Rows `[n_i, ...]` -> (`[b, n, ...]` zero-padded, mask `[b, n]` bool); n = max n_i rounded up
    to a multiple of `multiple` (a bounded set of compiled shapes). Valid items come first."""
    if not len(rows):
        raise ValueError("pad_rows: no rows")
    dtype = dtype or np.asarray(rows[0]).dtype
    n = max(len(r) for r in rows)
    n = -(-max(n, 1) // multiple) * multiple
    out = np.zeros((len(rows), n) + tuple(np.shape(rows[0])[1:]), dtype)
    mask = np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask
