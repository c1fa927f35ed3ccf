"""Convert params between the unrolled and the scanned (`model.scan_layers`) layouts.

Unrolled (the converted-checkpoint and HF-export layout):

    t5/{encoder,decoder}/block_{i}/...        i = 0..L-1
    wavlm/encoder/layers_{i}/...              i = 0..L-1
    llm/layers_{i}/...                        i = 0..L-1  (decoder-only LLM, `models/decoder_lm.py`)

Scanned: the same leaves stacked on a new leading axis of size L (WavLM: L-1, layer 0 keeps its
own name because it alone owns `rel_attn_embed`):

    t5/{encoder,decoder}/blocks/...           [L, ...]
    wavlm/encoder/layers_0/..., wavlm/encoder/layers/...   [L-1, ...]
    llm/layers/...                            [L, ...]

Works on flat dicts ('/'-joined paths, with or without a leading 'wavlm/' / 't5/' / 'llm/' or
SpeechVerse prefix) of numpy arrays, jax arrays or `jax.ShapeDtypeStruct`s. A decoder-only LLM's
layers are recognised at the root of the dict (`layers_{i}/...`, the `DecoderLM` params alone) or
under a path component named `llm`.
"""

from __future__ import annotations

import re
from typing import Any, Dict

import jax
import numpy as np

from speechverse_jax import tree as tree_lib

_T5_UNROLLED = re.compile(r"^(.*?)(encoder|decoder)/block_(\d+)/(.*)$")
_WAVLM_UNROLLED = re.compile(r"^(.*?)encoder/layers_(\d+)/(.*)$")
_T5_SCANNED = re.compile(r"^(.*?)(encoder|decoder)/blocks/(.*)$")
_WAVLM_SCANNED = re.compile(r"^(.*?)encoder/layers/(.*)$")
_LM_UNROLLED = re.compile(r"^((?:.*/)?llm/|)layers_(\d+)/(.*)$")
_LM_SCANNED = re.compile(r"^((?:.*/)?llm/|)layers/(.*)$")


def is_scanned(flat: Dict[str, Any]) -> bool:
    """Whether a flat params dict holds stacked layers."""
    return any(_T5_SCANNED.match(k) or _WAVLM_SCANNED.match(k) or _LM_SCANNED.match(k) for k in flat)


def _stack(values):
    if isinstance(values[0], jax.ShapeDtypeStruct):
        v = values[0]
        return jax.ShapeDtypeStruct((len(values),) + tuple(v.shape), v.dtype)
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    import jax.numpy as jnp

    return jnp.stack(values)


def _unstack(value, n):
    if isinstance(value, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)] * n
    return [value[i] for i in range(n)]


def stack_layers(flat: Dict[str, Any]) -> Dict[str, Any]:
    """Unrolled -> scanned (a dict already scanned is returned unchanged)."""
    out, groups = {}, {}
    for k, v in flat.items():
        m = _LM_UNROLLED.match(k)
        if m:
            prefix, i, rest = m.groups()
            groups.setdefault(f"{prefix}layers/{rest}", {})[int(i)] = v
            continue
        m = _T5_UNROLLED.match(k)
        if m and "/wavlm/" not in "/" + m.group(1):
            prefix, stack, i, rest = m.groups()
            groups.setdefault(f"{prefix}{stack}/blocks/{rest}", {})[int(i)] = v
            continue
        m = _WAVLM_UNROLLED.match(k)
        if m and int(m.group(2)) > 0:
            prefix, i, rest = m.groups()
            groups.setdefault(f"{prefix}encoder/layers/{rest}", {})[int(i) - 1] = v
            continue
        out[k] = v
    for k, by_index in groups.items():
        n = max(by_index) + 1
        missing = sorted(set(range(n)) - set(by_index))
        if missing:
            raise ValueError(f"scan layout: {k} has no layer(s) {missing} to stack")
        out[k] = _stack([by_index[i] for i in range(n)])
    return out


def unstack_layers(flat: Dict[str, Any]) -> Dict[str, Any]:
    """Scanned -> unrolled (a dict already unrolled is returned unchanged)."""
    out = {}
    for k, v in flat.items():
        m = _LM_SCANNED.match(k)
        if m:
            prefix, rest = m.groups()
            for i, x in enumerate(_unstack(v, v.shape[0])):
                out[f"{prefix}layers_{i}/{rest}"] = x
            continue
        m = _T5_SCANNED.match(k)
        if m:
            prefix, stack, rest = m.groups()
            for i, x in enumerate(_unstack(v, v.shape[0])):
                out[f"{prefix}{stack}/block_{i}/{rest}"] = x
            continue
        m = _WAVLM_SCANNED.match(k)
        if m:
            prefix, rest = m.groups()
            for i, x in enumerate(_unstack(v, v.shape[0])):
                out[f"{prefix}encoder/layers_{i + 1}/{rest}"] = x
            continue
        out[k] = v
    return out


def to_layout(flat: Dict[str, Any], scanned: bool) -> Dict[str, Any]:
    """`flat` in the scanned (True) or unrolled (False) layout, whichever it is in now."""
    return stack_layers(flat) if scanned else unstack_layers(flat)


def tree_to_layout(tree: Any, scanned: bool) -> Any:
    """`to_layout` on a nested params dict."""
    return tree_lib.unflatten(to_layout(tree_lib.flatten(tree), scanned))


def _slice_sharding(sharding):
    """The sharding of one layer of a stacked array: the same mesh without the leading axis."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)[1:]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def restore_stacked(restore_unrolled, flat_target: Dict[str, Any]) -> Dict[str, Any]:
    """Restore a scanned-layout flat target from an unrolled-layout checkpoint.

    `restore_unrolled(tree)` restores a nested unrolled abstract tree; `flat_target` holds
    `jax.ShapeDtypeStruct`s (with shardings) in the scanned layout. Each layer is restored with the
    sharding of its slice, then the layers are stacked into the target's sharding.
    """
    unrolled = {}
    for k, v in flat_target.items():
        parts = unstack_layers({k: v})
        sh = getattr(v, "sharding", None)
        for uk, uv in parts.items():
            s = sh if uk == k else (_slice_sharding(sh) if sh is not None else None)
            unrolled[uk] = jax.ShapeDtypeStruct(uv.shape, uv.dtype, sharding=s)
    restored = tree_lib.flatten(restore_unrolled(tree_lib.unflatten(unrolled)))
    out = {}
    for k, v in flat_target.items():
        parts = unstack_layers({k: v})
        if list(parts) == [k]:
            out[k] = restored[k]
            continue
        layers = [restored[uk] for uk in parts]
        sh = getattr(v, "sharding", None)
        import jax.numpy as jnp

        out[k] = jax.jit(lambda xs: jnp.stack(xs), out_shardings=sh)(layers)
    return out
