"""Manifests: JSON lines, one example per line, read into `Example`s with bad lines counted.

Fields of a line:
    audio        path relative to the manifest's folder, absolute, or a URL (`gs://...`)
    offset       optional, seconds: the example is the segment [offset, offset + duration)
    duration     optional, seconds: with `offset`, the segment length; without it, the clip's
                 length (used for bucketing and filters; probed from the file header if absent)
    task         one of tasks.TASK_NAMES (or the reader's `default_task`)
    target       the answer: a string, or a list (kwe keywords, sf [slot, value] pairs) or a
                 {slot: value} mapping (sf), turned into the target text by tasks.format_target
    instruction  optional; otherwise one is drawn from the task's prompts
    id           optional; default `<manifest file name>:<line>`
    task-specific: keyword (kws), target_language (st), labels (a custom label set: list or
                 {label: description}), transcript (enables joint decoding), anything else kept.

NeMo manifests (`audio_filepath`, `duration`, `text`, optional `offset`) read as ASR as they are.

Every line that cannot be used is counted in a `DataStats` by reason (malformed_json,
missing_field, bad_field, unknown_task, unknown_label, missing_file, unreadable_audio,
empty_audio) with the manifest file and line; `strict=True` raises `DataError` instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from speechverse_jax import fs
from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.audio import AudioError, probe_duration
from speechverse_jax.data.errors import DataStats, where

_CORE = {"audio", "audio_filepath", "offset", "duration", "task", "target", "text", "instruction", "id"}


@dataclasses.dataclass(slots=True)
class Example:
    """One usable manifest line. `target` is already the formatted target text."""

    audio: str  # resolved path or URL
    task: str
    target: str
    duration: float  # seconds of audio this example uses
    offset: float = 0.0
    segment: bool = False  # True: read `duration` seconds from `offset`; False: the whole file
    instruction: Optional[str] = None
    id: str = ""
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)  # keyword, labels, transcript, ...
    manifest: str = ""
    line: int = 0

    def get(self, key: str, default=None):
        """Field lookup used by the prompt builder (core attributes first, then `fields`)."""
        if key in ("audio", "task", "target", "duration", "offset", "instruction", "id"):
            value = getattr(self, key)
            return default if value is None else value
        return self.fields.get(key, default)

    @property
    def where(self) -> str:
        return where(self.manifest, self.line)


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def resolve_audio_path(audio: str, manifest_dir: str) -> str:
    """Relative paths are relative to the manifest's folder; absolute paths and URLs are kept."""
    if fs.is_remote(audio) or os.path.isabs(audio):
        return audio
    if fs.is_remote(manifest_dir):
        return manifest_dir.rstrip("/") + "/" + audio
    return os.path.normpath(os.path.join(manifest_dir, audio))


def _number(obj: Mapping, key: str) -> Optional[float]:
    if obj.get(key) is None:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Skip("bad_field", f"{key}={value!r} is not a number")
    try:
        value = float(value)
    except ValueError:
        raise _Skip("bad_field", f"{key}={value!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise _Skip("bad_field", f"{key}={value!r} must be a finite number >= 0")
    return value


def parse_example(obj: Any, manifest: str, line: int, default_task: Optional[str] = None,
                  label_overrides: Optional[Mapping[str, Any]] = None, require_target: bool = True,
                  probe: bool = True, check_files: bool = True) -> Example:
    """One decoded JSON line -> Example. Raises `_Skip(reason, message)` for unusable lines."""
    if not isinstance(obj, dict):
        raise _Skip("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    nemo = "audio" not in obj and "audio_filepath" in obj
    audio = obj.get("audio_filepath") if nemo else obj.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise _Skip("missing_field", "no 'audio' (or NeMo 'audio_filepath') path")
    task_name = obj.get("task") or ("asr" if nemo else default_task)
    if not task_name:
        raise _Skip("missing_field", "no 'task'")
    try:
        task = tasks_lib.get_task(str(task_name))
    except KeyError:
        raise _Skip("unknown_task", f"task {task_name!r} is not one of {', '.join(tasks_lib.TASK_NAMES)}") from None
    raw_target = obj.get("target", obj.get("text") if (nemo or task.name == "asr") else None)
    fields = {k: v for k, v in obj.items() if k not in _CORE}
    labels = tasks_lib.resolve_labels(task, fields, label_overrides)
    if raw_target is None or (isinstance(raw_target, str) and not raw_target.strip()):
        if require_target:
            raise _Skip("missing_field", "no 'target'")
        target = ""
    else:
        try:
            target = tasks_lib.format_target(task, raw_target, labels)
        except ValueError as e:
            reason = "unknown_label" if task.is_classification and isinstance(raw_target, str) else "bad_field"
            raise _Skip(reason, str(e)) from None
    for key in task.required:
        if fields.get(key) in (None, ""):
            raise _Skip("missing_field", f"task {task.name} needs the field {key!r}")
    instruction = obj.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise _Skip("bad_field", "'instruction' must be a non-empty string")
    offset, duration = _number(obj, "offset"), _number(obj, "duration")
    if duration is not None and duration == 0:
        raise _Skip("empty_audio", "duration is 0")
    path = resolve_audio_path(audio.strip(), os.path.dirname(manifest) if not fs.is_remote(manifest)
                              else manifest.rsplit("/", 1)[0])
    segment = offset is not None
    if check_files and not fs.is_remote(path) and not os.path.exists(path):
        raise _Skip("missing_file", f"{path}: file not found")
    if duration is None or (segment and duration is None):
        if not probe:
            raise _Skip("missing_field", "no 'duration' and duration probing is off")
        try:
            total = probe_duration(path)
        except AudioError as e:
            raise _Skip(e.reason, str(e)) from None
        duration = total - (offset or 0.0)
        if duration <= 0:
            raise _Skip("empty_audio", f"offset {offset} is past the end of {path} ({total:.3f}s)")
    return Example(
        audio=path, task=task.name, target=target, duration=float(duration), offset=float(offset or 0.0),
        segment=segment, instruction=instruction, id=str(obj.get("id") or f"{os.path.basename(manifest)}:{line}"),
        fields=fields, manifest=manifest, line=line,
    )


def iter_lines(path: str) -> Iterable[tuple]:
    """(line number, text) of the non-blank lines of a local or `gs://` file."""
    if fs.is_remote(path):
        text = fs.read_text(path)
        lines = text.splitlines()
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    for i, text in enumerate(lines, start=1):
        if text.strip():
            yield i, text


def read_manifest(path: str, stats: Optional[DataStats] = None, default_task: Optional[str] = None,
                  label_overrides: Optional[Mapping[str, Any]] = None, require_target: bool = True,
                  probe: bool = True, check_files: bool = True, strict: bool = False) -> List[Example]:
    """All usable examples of one manifest; the rest are counted in `stats` (or raise when strict)."""
    stats = stats if stats is not None else DataStats(strict=strict)
    if strict:
        stats.strict = True
    out = []
    for line, text in iter_lines(path):
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Skip("malformed_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(parse_example(obj, path, line, default_task, label_overrides, require_target, probe,
                                     check_files))
        except _Skip as s:
            stats.record(s.reason, where(path, line), s.message)
    return out


def read_manifests(paths: Union[str, Sequence[str]], stats: Optional[DataStats] = None, **kwargs) -> List[Example]:
    """`read_manifest` over several files (a list, or one string of comma-separated paths)."""
    stats = stats if stats is not None else DataStats(strict=kwargs.get("strict", False))
    out: List[Example] = []
    for p in split_paths(paths):
        out.extend(read_manifest(p, stats, **kwargs))
    return out


def split_paths(paths: Union[str, Sequence[str], None]) -> List[str]:
    if not paths:
        return []
    if isinstance(paths, str):
        return [p.strip() for p in paths.split(",") if p.strip()]
    return [str(p) for p in paths]


def write_manifest(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON lines (UTF-8, no ASCII escaping); returns the number of rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
