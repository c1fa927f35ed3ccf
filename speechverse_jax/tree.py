"""Params trees as nested dicts <-> flat `{'a/b/c': leaf}` dicts, the one form every rule sees.

Paths are '/'-joined module names (`t5/encoder/block_0/self_attention/q/kernel`): the same
strings the regex rules (`speechverse_jax.rules`) match.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import jax
import numpy as np
from flax import traverse_util


def flatten(tree: Any) -> Dict[str, Any]:
    """Nested dict -> {'a/b': leaf}; an empty tree gives {}."""
    return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def unflatten(flat: Dict[str, Any]) -> dict:
    """{'a/b': leaf} -> nested dict; {} gives {}."""
    return traverse_util.unflatten_dict(dict(flat), sep="/") if flat else {}


def merge(*trees: Any, disjoint: bool = False) -> dict:
    """One nested dict holding the leaves of all trees; later trees win, or with `disjoint=True`
    a leaf present in two trees is a ValueError naming it."""
    out: Dict[str, Any] = {}
    for tree in trees:
        for k, v in flatten(tree).items():
            if disjoint and k in out:
                raise ValueError(f"leaf {k} is in more than one tree")
            out[k] = v
    return unflatten(out)


def shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def count(tree: Any) -> int:
    """Number of scalars in a tree (arrays, abstract arrays, or boxed params)."""
    return int(sum(math.prod(shape(x)) for x in jax.tree_util.tree_leaves(tree)))
