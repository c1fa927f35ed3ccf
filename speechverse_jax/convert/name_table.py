"""Apply a name table (HF tensor name -> our param path) and check that everything fits.

A converter for one model family only writes its table; this module reads the tensors one at a
time, transforms them, compares each against the shape the Flax model expects, and reports every
missing, unexpected or mis-shaped tensor in one error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from speechverse_jax import tree as tree_lib
from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint

Transform = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One param of ours, built from one or more HF tensors.

    `sources` are HF names; alternatives for the same source (e.g. old and new names of a
    weight-normed conv) are given as a tuple of names, the first present one is used.
    `transform(*arrays)` returns the array in our layout (default: identity).
    """

    path: str  # '/'-joined param path, e.g. 'encoder/layers_0/attention/q/kernel'
    sources: Tuple[object, ...]  # each item: an HF name, or a tuple of alternative names
    transform: Optional[Transform] = None


def transpose(w: np.ndarray) -> np.ndarray:
    """torch Linear `[out, in]` -> our Dense kernel `[in, out]`."""
    return np.ascontiguousarray(w.T)


def _resolve(ckpt: HFCheckpoint, source) -> Optional[str]:
    names = (source,) if isinstance(source, str) else tuple(source)
    for name in names:
        if name in ckpt:
            return name
    return None


def convert(
    ckpt: HFCheckpoint,
    table: Sequence[Entry],
    expected: Dict[str, Tuple[Tuple[int, ...], np.dtype]],
    ignore: Iterable[str] = (),
    dtype: Optional[np.dtype] = None,
    prefix: str = "",
) -> dict:
    """Build the nested params dict for `table` from `ckpt`.

    Args:
      expected: our flat param path -> (shape, dtype), usually from `jax.eval_shape(model.init)`.
      ignore: regexes of HF names that may be present but are not used (e.g. tied copies).
      dtype: cast floating tensors to this dtype (default: the expected dtype).
      prefix: prepended to HF names (e.g. 'wavlm.' for a WavLMForCTC checkpoint).
    Raises:
      CheckpointError listing every missing, unexpected and mis-shaped tensor.
    """
    # A checkpoint saved from a task head model carries a prefix ("wavlm.", "model."): accept it.
    missing: List[str] = []
    misshaped: List[str] = []
    used: set = set()
    flat: Dict[str, np.ndarray] = {}
    ignore_res = [re.compile(p) for p in ignore]

    for entry in table:
        names = []
        for source in entry.sources:
            alts = (source,) if isinstance(source, str) else tuple(source)
            name = _resolve(ckpt, tuple(prefix + a for a in alts))
            if name is None:
                missing.append(" or ".join(prefix + a for a in alts) + f" (for {entry.path})")
            names.append(name)
        if any(n is None for n in names):
            continue
        used.update(names)
        if entry.path not in expected:
            raise CheckpointError(f"internal: name table maps to unknown param {entry.path}")
        arrays = [ckpt.get(n) for n in names]
        value = entry.transform(*arrays) if entry.transform else arrays[0]
        shape, want_dtype = expected[entry.path]
        if tuple(value.shape) != tuple(shape):
            src = ", ".join(f"{n} {tuple(ckpt.shape(n))}" for n in names)
            misshaped.append(f"{entry.path}: expected {tuple(shape)}, got {tuple(value.shape)} from {src}")
            continue
        target = dtype if (dtype is not None and np.issubdtype(value.dtype, np.floating)) else want_dtype
        if value.dtype.kind == "V" or str(value.dtype) == "bfloat16" or np.issubdtype(value.dtype, np.floating):
            value = value.astype(target)
        flat[entry.path] = value

    unexpected = [
        f"{n} {tuple(ckpt.shape(n))}"
        for n in ckpt.names()
        if n not in used and not any(r.fullmatch(n) for r in ignore_res)
    ]
    not_produced = sorted(set(expected) - set(flat) - {e.path for e in table})
    problems = []
    if missing:
        problems.append("missing tensors:\n  " + "\n  ".join(missing))
    if misshaped:
        problems.append("mis-shaped tensors:\n  " + "\n  ".join(misshaped))
    if unexpected:
        problems.append("unexpected tensors (not used by the model):\n  " + "\n  ".join(unexpected))
    if not_produced:
        problems.append("params with no source in the name table:\n  " + "\n  ".join(not_produced))
    if problems:
        raise CheckpointError(f"{ckpt.folder}: checkpoint does not fit the model config\n" + "\n".join(problems))
    return tree_lib.unflatten(flat)


def expected_shapes(abstract_params: dict) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Flat '/'-joined path -> (shape, dtype) of an abstract (eval_shape) params tree."""
    flat = tree_lib.flatten(abstract_params)
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}
