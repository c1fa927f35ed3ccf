"""Preparation recipes: the layouts users download -> manifests the pipeline reads.

    run_prepare('librispeech', src_dir, out_dir, tasks='asr,kws', seed=0) -> summary dict

Options are the recipe's keyword arguments; strings (from a command line) are converted to the
type of the option's default, and list options also take 'a,b' strings.

Each recipe writes `<out_dir>/<split>.jsonl` (absolute audio paths, durations from the file
headers) and returns {'dataset', 'src_dir', 'out_dir', 'manifests': {split: path},
'rows': {split: {task: n}}, 'skipped': {reason: n}, 'skip_examples': [...]} (+ recipe extras).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

from speechverse_jax.data.prepare import commonvoice, covost2, fisher, librispeech, msppodcast, slurp, voxpopuli

RECIPES: Dict[str, Callable[..., Dict[str, Any]]] = {
    "librispeech": librispeech.prepare,
    "commonvoice": commonvoice.prepare,
    "voxpopuli": voxpopuli.prepare,
    "slurp": slurp.prepare,
    "covost2": covost2.prepare,
    "msppodcast": msppodcast.prepare,
    "fisher": fisher.prepare,
}


def recipe_name(dataset: str) -> str:
    """A dataset name as typed ('LibriSpeech', 'cv', 'covost') -> its key in RECIPES."""
    key = dataset.lower().replace("-", "").replace("_", "")
    aliases = {"mcv": "commonvoice", "cv": "commonvoice", "covost": "covost2", "msp": "msppodcast"}
    key = aliases.get(key, key)
    if key not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(RECIPES)}")
    return key


def run_prepare(dataset: str, src_dir: str, out_dir: str, **options) -> Dict[str, Any]:
    """Run the recipe `dataset` (a key of RECIPES) with `options` (its keyword arguments)."""
    key = recipe_name(dataset)
    recipe = RECIPES[key]
    accepted = inspect.signature(recipe).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"{key}: unknown options {unknown}; accepted: "
                        f"{[k for k in accepted if k not in ('src_dir', 'out_dir')]}")
    options = {k: _coerce(v, accepted[k].default) for k, v in options.items()}
    return recipe(src_dir, out_dir, **options)


def _coerce(value: Any, default: Any) -> Any:
    """CLI strings -> the type of the option's default (bool / int / float); lists stay as given."""
    if not isinstance(value, str) or default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple) and default and all(isinstance(d, (int, float)) for d in default):
        return tuple(type(d)(v) for d, v in zip(default, value.split(",")))
    return value
