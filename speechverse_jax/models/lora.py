"""Helpers over params pytrees holding LoRA adapters (`.../lora_a`, `.../lora_b` next to `kernel`).

All functions take and return plain nested dicts; leaves may be arrays, abstract arrays
(`jax.ShapeDtypeStruct`) or logically-partitioned boxes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax.numpy as jnp
from flax import traverse_util

from speechverse_jax import tree
from speechverse_jax.models.layers import LoRAConfig

LORA_KEYS = ("lora_a", "lora_b")


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def is_lora_path(key: tuple) -> bool:
    return bool(key) and str(key[-1]) in LORA_KEYS


def split_lora(params: dict) -> Tuple[dict, dict]:
    """-> (base, adapters): leaves named lora_a/lora_b go to adapters; nesting is preserved."""
    flat = traverse_util.flatten_dict(dict(params))
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    adapters = {k: v for k, v in flat.items() if is_lora_path(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge_lora(params: dict, lora_cfg: LoRAConfig) -> dict:
    """Fold every adapter into its kernel: `kernel + scale * lora_a @ lora_b`; drop the adapters.

    The result has the layout of the model built without LoRA and gives the same outputs
    (dropout aside). Computed in float32, stored in the kernel's dtype.
    """
    flat = traverse_util.flatten_dict(dict(params))
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
    return traverse_util.unflatten_dict(out)


def graft_lora(previous: Dict[str, Any], fresh: Dict[str, Any], where: str = "previous stage"
               ) -> Tuple[Dict[str, Any], List[str]]:
    """Start a stage from the previous stage's trainable params (flat `{'a/b': leaf}` dicts).

    Every leaf of `previous` replaces its twin in `fresh` (shapes must agree); the leaves only
    `fresh` has keep their fresh init: LoRA adapters there start with b = 0, so the new stage
    starts where the previous one ended. Returns (params, the paths that kept their fresh init).
    """
    unused = sorted(k for k in previous if k not in fresh)
    if unused:
        raise ValueError(f"{where}: params not in this stage's trainable set: {unused[:10]}")
    for k, v in previous.items():
        if tree.shape(v) != tree.shape(fresh[k]):
            raise ValueError(f"{where}: {k} has shape {tree.shape(v)}, this model wants {tree.shape(fresh[k])}")
    return {**fresh, **previous}, sorted(k for k in fresh if k not in previous)
