"""Helpers over params pytrees holding LoRA adapters (`.../lora_a`, `.../lora_b` next to `kernel`).

All functions take and return plain nested dicts; leaves may be arrays, abstract arrays
(`jax.ShapeDtypeStruct`) or logically-partitioned boxes.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from speechverse_jax.models.layers import LoRAConfig

LORA_KEYS = ("lora_a", "lora_b")


def _flat(tree: Any) -> dict:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat) if flat else {}


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def is_lora_path(key: tuple) -> bool:
    return bool(key) and str(key[-1]) in LORA_KEYS


def split_lora(params: dict) -> Tuple[dict, dict]:
    """-> (base, adapters): leaves named lora_a/lora_b go to adapters; nesting is preserved."""
    flat = _flat(params)
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    adapters = {k: v for k, v in flat.items() if is_lora_path(k)}
    return _unflat(base), _unflat(adapters)


def merge_trees(base: dict, adapters: dict) -> dict:
    """Union of two nested dicts with disjoint leaves (inverse of `split_lora`)."""
    flat = _flat(base)
    for k, v in _flat(adapters).items():
        if k in flat:
            raise ValueError(f"merge_trees: leaf {_path(k)} is in both trees")
        flat[k] = v
    return _unflat(flat)


def merge_lora(params: dict, lora_cfg: LoRAConfig) -> dict:
    """Fold every adapter into its kernel: `kernel + scale * lora_a @ lora_b`; drop the adapters.

    The result has the layout of the model built without LoRA and gives the same outputs
    (dropout aside). Computed in float32, stored in the kernel's dtype.
    """
    flat = _flat(params)
    out = {k: v for k, v in flat.items() if not is_lora_path(k)}
    parents = {k[:-1] for k in flat if is_lora_path(k)}
    for parent in sorted(parents, key=_path):
        a, b, kernel = (flat.get(parent + (n,)) for n in ("lora_a", "lora_b", "kernel"))
        if a is None or b is None or kernel is None:
            raise ValueError(f"merge_lora: {_path(parent)} needs kernel, lora_a and lora_b")
        delta = lora_cfg.scale * jnp.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        if delta.shape != kernel.shape:
            raise ValueError(f"merge_lora: {_path(parent)}: a @ b is {delta.shape}, kernel is {kernel.shape}")
        out[parent + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return _unflat(out)


def graft_lora(params_without_lora: dict, params_with_lora_init: dict) -> dict:
    """Add the (fresh) adapters of `params_with_lora_init` to an existing tree.

    Base leaves are taken from `params_without_lora` unchanged; its structure must be the base
    structure of `params_with_lora_init` (same paths and shapes), else ValueError naming the path.
    """
    base = _flat(params_without_lora)
    init = _flat(params_with_lora_init)
    if any(is_lora_path(k) for k in base):
        raise ValueError("graft_lora: the first tree already has LoRA adapters")
    init_base = {k for k in init if not is_lora_path(k)}
    missing = sorted(_path(k) for k in init_base - set(base))
    extra = sorted(_path(k) for k in set(base) - init_base)
    if missing or extra:
        raise ValueError(f"graft_lora: base trees differ; missing {missing[:10]}, unexpected {extra[:10]}")
    for k in init_base:
        if _shape(base[k]) != _shape(init[k]):
            raise ValueError(f"graft_lora: {_path(k)} has shape {_shape(base[k])}, "
                             f"the LoRA model expects {_shape(init[k])}")
    out = dict(base)
    out.update({k: v for k, v in init.items() if is_lora_path(k)})
    return _unflat(out)


def count_params(tree: Any) -> int:
    """Number of scalars in a tree (arrays, abstract arrays, or boxed params)."""
    return int(sum(math.prod(_shape(x)) for x in jax.tree_util.tree_leaves(tree)))
