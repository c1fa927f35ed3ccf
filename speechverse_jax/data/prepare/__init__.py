"""Preparation recipes: the layouts users download -> manifests the pipeline reads.

    run_prepare('librispeech', src_dir, out_dir, tasks='asr,kws', seed=0) -> summary dict

Options are the recipe's keyword arguments; strings (from a command line) are converted to the
type of the option's default, and list options also take 'a,b' strings.

Each recipe writes `<out_dir>/<split>.jsonl` (absolute audio paths, durations from the file
headers) and returns {'dataset', 'src_dir', 'out_dir', 'manifests': {split: path},
'rows': {split: {task: n}}, 'skipped': {reason: n}, 'skip_examples': [...]} (+ recipe extras).

Clips whose header cannot be read (missing, unreadable, empty) are skipped and counted by every
recipe. `check_audio=true` (any recipe) also decodes every written clip and drops the rows whose
audio is unreadable, empty or NaN/inf, counted by reason with `manifest:line` (slow on big corpora:
it reads all the audio once).
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
    check = _coerce(options.pop("check_audio", False), False)
    accepted = inspect.signature(recipe).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"{key}: unknown options {unknown}; accepted: "
                         f"{[k for k in accepted if k not in ('src_dir', 'out_dir')] + ['check_audio']}")
    options = {k: _coerce(v, accepted[k].default) for k, v in options.items()}
    summary = recipe(src_dir, out_dir, **options)
    return check_written_audio(summary) if check else summary


def check_written_audio(summary: Dict[str, Any]) -> Dict[str, Any]:
    """Decode every clip of the written manifests; drop (and count by reason, with manifest:line)
    the rows whose audio cannot be used. Updates the manifests and the summary in place."""
    import collections
    import json

    from speechverse_jax.data.audio import AudioError, load_audio
    from speechverse_jax.data.errors import DataStats, where
    from speechverse_jax.data.manifest import iter_lines, write_manifest

    stats = DataStats()
    for split, path in sorted(summary.get("manifests", {}).items()):
        kept = []
        for line, text in iter_lines(path):
            row = json.loads(text)
            try:
                load_audio(row["audio"], offset=float(row.get("offset") or 0.0),
                           duration=row.get("duration") if row.get("offset") is not None else None)
            except AudioError as e:
                stats.record(e.reason, where(path, line), str(e))
                continue
            kept.append(row)
        write_manifest(path, kept)
        summary.setdefault("rows", {})[split] = dict(sorted(collections.Counter(r["task"] for r in kept).items()))
    skipped = collections.Counter(summary.get("skipped") or {})
    skipped.update(stats.counts)
    summary["skipped"] = dict(sorted(skipped.items()))
    summary["skip_examples"] = list(summary.get("skip_examples") or []) + [f"{w}: {r}: {m}" for r, w, m in stats.first]
    summary["audio_checked"] = True
    return summary


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
