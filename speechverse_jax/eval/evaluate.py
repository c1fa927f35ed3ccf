"""Evaluate a model on manifests: generate per task, score with the task's metric, write reports.

    preds, table = evaluate(model, ["test.jsonl"], settings=[EvalSetting("seen"), EvalSetting("unseen")])

Instructions come from the same prompt code as training (`data.tasks.build_instruction`); the
prompt index of example i is i, so every run scores the same instructions. Constrained decoding
uses the row's label set (or the registry's); joint decoding asks for the transcript first and
scores both parts. Outputs: predictions JSONL (id, task, setting, instruction, reference,
hypothesis, audio) and a per-task metrics table (markdown + JSON).

Bad rows never stop a run: a manifest line that cannot be parsed, a clip that is missing,
unreadable, empty, NaN/inf or longer than the model's limit is skipped and counted by reason
(`EvalSkips`; metrics.json `skipped`, metrics.md, every row in skipped.jsonl with manifest:line).
`strict=True` raises `DataError` naming the manifest and line at the first one instead.
With `out_dir` the predictions are written as they are made (appended and flushed per batch,
with a progress.jsonl journal); a killed evaluation started again with the same arguments and
folder resumes and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from speechverse_jax import fs
from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.audio import SAMPLE_RATE, AudioError, load_audio
from speechverse_jax.data.batching import pad_rows
from speechverse_jax.data.errors import DataError, DataStats
from speechverse_jax.data.manifest import read_manifests
from speechverse_jax.errors import OutputMismatchError
from speechverse_jax.eval import metrics as metrics_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSetting:
    """One way of asking: prompt split, decoding (free / constrained), joint or not."""

    split: str = "seen"  # 'seen' | 'unseen' instructions
    constrained: bool = False  # restrict classification / slot-label outputs to the label set
    joint: bool = False  # ASR first, then the task (paper Table 8)
    num_beams: int = 1
    max_new_tokens: int = 64

    @property
    def name(self) -> str:
        parts = [self.split, "constrained" if self.constrained else "free"]
        if self.joint:
            parts.append("joint")
        if self.num_beams > 1:
            parts.append(f"beam{self.num_beams}")
        return "/".join(parts)


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


def _label_key(labels) -> Tuple[str, ...]:
    return tuple(labels.keys()) if isinstance(labels, dict) else tuple(labels or ())


DEFAULT_MAX_AUDIO_SECONDS = 30.0
# Eval-only skip reasons (the rest are `data.errors.BAD_INPUT`); every reason skips the row in eval.
EVAL_REASONS = ("audio_too_long", "not_in_cache")
PREDICTIONS, SKIPPED, PROGRESS = "predictions.jsonl", "skipped.jsonl", "progress.jsonl"


class EvalSkips(DataStats):
    """Every row eval could not use: counts by reason plus each row (manifest:line, id, message).

    Rows are recorded once (the same clip fails in every setting). `strict` raises `DataError`
    naming the manifest and line at the first one.
    """

    def __init__(self, strict: bool = False):
        super().__init__(strict=strict)
        self.rows: List[Dict[str, Any]] = []
        self._seen: set = set()

    def record(self, reason: str, where: str, message: str = "", n: int = 1, id: Optional[str] = None) -> None:
        if self.strict:
            raise DataError(reason, where, message)
        if (where, reason) in self._seen:
            return
        self._seen.add((where, reason))
        self.counts[reason] += n
        self.rows.append({"where": where, "reason": reason, "message": message, **({"id": id} if id else {})})
        if len(self.first) < self.max_logged:
            self.first.append((reason, where, message))
            log.warning("skipping %s: %s: %s", where, reason, message)

    def by_reason(self) -> Dict[str, int]:
        return {r: int(n) for r, n in sorted(self.counts.items()) if n}

    def report(self) -> Dict[str, Any]:
        return {"total": int(sum(self.counts.values())), "by_reason": self.by_reason()}


def _fingerprint(manifests: Sequence[str], settings, tasks, batch_size, extra) -> str:
    """What decides the predictions: manifest contents, settings, tasks, batch size, model id."""
    h = hashlib.sha256()
    for m in manifests:
        h.update(m.encode())
        h.update(fs.read_text(m).encode() if "://" in m else open(m, "rb").read())
    h.update(json.dumps([[dataclasses.asdict(s) for s in settings], sorted(tasks) if tasks else None,
                         int(batch_size), extra or {}], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _Journal:
    """Resumable output: predictions.jsonl appended batch by batch (flushed), then one line per
    finished batch in progress.jsonl. On start the predictions past the last finished batch (a
    batch cut by a kill) are dropped and those batches run again, so the files end up the same as
    an uninterrupted run's."""

    def __init__(self, out_dir: str, fingerprint: str):
        os.makedirs(out_dir, exist_ok=True)
        self.pred_path, self.prog_path = os.path.join(out_dir, PREDICTIONS), os.path.join(out_dir, PROGRESS)
        self.done: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
        kept: List[str] = []
        header = None
        if os.path.exists(self.prog_path):
            entries = _complete_json_lines(self.prog_path)
            header = entries[0] if entries and "fingerprint" in entries[0] else None
            if header is None or header["fingerprint"] != fingerprint:
                raise OutputMismatchError(
                    f"{out_dir} holds an evaluation of other inputs (manifests, settings, tasks, batch size or "
                    f"checkpoint differ from {PROGRESS}); pass another --out or delete that folder")
            for e in entries[1:]:
                self.done[tuple(e["batch"])] = e
            n = sum(int(e["rows"]) for e in self.done.values())
            lines = _complete_lines(self.pred_path) if os.path.exists(self.pred_path) else []
            if len(lines) < n:
                raise OutputMismatchError(f"{self.pred_path}: {len(lines)} predictions, but {PROGRESS} lists {n} "
                                          "finished rows; the folder was edited: delete it and run again")
            kept = lines[:n]
            if self.done:
                log.warning("resuming the evaluation in %s: %d batches (%d predictions) already done",
                            out_dir, len(self.done), n)
        self.rows = [json.loads(l) for l in kept]
        self.cursor = 0
        _write_lines(self.pred_path, kept)
        _write_lines(self.prog_path, [json.dumps({"fingerprint": fingerprint})]
                     + [json.dumps(e) for e in self.done.values()])
        self.pred = open(self.pred_path, "a", encoding="utf-8")
        self.prog = open(self.prog_path, "a", encoding="utf-8")

    def replay(self, key) -> Optional[Dict[str, Any]]:
        """(rows, skipped) of a batch finished by an earlier run, or None."""
        entry = self.done.get(key)
        if entry is None:
            return None
        rows = self.rows[self.cursor: self.cursor + int(entry["rows"])]
        self.cursor += int(entry["rows"])
        return {"rows": rows, "skipped": entry["skipped"]}

    def commit(self, key, rows: Sequence[Dict[str, Any]], skipped: Sequence[Dict[str, Any]]) -> None:
        self.pred.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in rows))
        self.pred.flush()
        os.fsync(self.pred.fileno())
        self.prog.write(json.dumps({"batch": list(key), "rows": len(rows), "skipped": list(skipped)}) + "\n")
        self.prog.flush()

    def close(self) -> None:
        self.pred.close()
        self.prog.close()


def _complete_lines(path: str) -> List[str]:
    """The lines of a file that end with a newline (a line cut by a kill is dropped)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text.split("\n")[:-1] if text else []


def _complete_json_lines(path: str) -> List[Dict[str, Any]]:
    out = []
    for line in _complete_lines(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _write_lines(path: str, lines: Sequence[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate(model, manifests: Sequence[str], settings: Sequence[EvalSetting] = (EvalSetting(),),
             tasks: Optional[Sequence[str]] = None, batch_size: int = 16, cache=None,
             progress: bool = True, out_dir: Optional[str] = None, strict: bool = False,
             skips: Optional[EvalSkips] = None, max_audio_seconds: Optional[float] = None,
             fingerprint_extra: Optional[Dict[str, Any]] = None,
             ) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Dict[str, float]]]]:
    """-> (predictions, table[task][setting name][metric]).

    `model` is an `api.SpeechVerseModel`; `cache` an optional `data.encoder_cache.EncoderCache`
    holding the frozen encoder's states for these examples (skips the audio encoder).
    Joint settings apply to tasks with transcripts only (rows with a `transcript` field).

    Rows that cannot be used (manifest problems, unreadable / empty / NaN-inf audio, audio longer
    than `max_audio_seconds` -- default the model's `max_audio_seconds`, else 30 s) are skipped and
    recorded in `skips` (an `EvalSkips`); `strict` raises `DataError` (manifest:line) at the first.
    With `out_dir`, predictions are appended to `out_dir/predictions.jsonl` batch by batch and a
    killed run started again with the same arguments resumes (see `_Journal`).
    """
    from tqdm import tqdm

    from speechverse_jax.decode.constraints import constraint_for_task
    from speechverse_jax.decode.generate import GenerateConfig

    skips = skips if skips is not None else EvalSkips(strict)
    skips.strict = skips.strict or strict
    limit = float(max_audio_seconds or getattr(model, "max_audio_seconds", None) or DEFAULT_MAX_AUDIO_SECONDS)
    if skips.strict:
        _strict_check(list(manifests), limit, cache)
    examples = read_manifests(list(manifests), skips, require_target=True)
    by_task: Dict[str, List[Any]] = {}
    for ex in examples:
        if tasks is not None and ex.task not in tasks:
            continue
        if cache is not None and ex.id not in cache.states:
            why = getattr(cache, "skipped", {}).get(ex.id)
            skips.record(why[0] if why else "not_in_cache", ex.where,
                         why[1] if why else f"id {ex.id!r} has no cached encoder states", id=ex.id)
            continue
        if cache is None and ex.duration > limit + 1e-6:
            skips.record("audio_too_long", ex.where, f"{ex.duration:.2f}s is longer than the model's limit of "
                         f"{limit:g}s", id=ex.id)
            continue
        by_task.setdefault(ex.task, []).append(ex)
    journal = _Journal(out_dir, _fingerprint(manifests, settings, tasks, batch_size, fingerprint_extra)) \
        if out_dir else None
    predictions: List[Dict[str, Any]] = []
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    total = sum(len(v) for v in by_task.values()) * len(settings)
    bar = tqdm(total=total, desc="evaluate", disable=not progress, dynamic_ncols=True)
    constraints: Dict[Tuple, Any] = {}
    try:
        for task, rows in sorted(by_task.items()):
            t = tasks_lib.get_task(task)
            for setting in settings:
                if setting.constrained and not t.labels and not any(_label_key(tasks_lib.resolve_labels(t, ex)) for ex in rows):
                    bar.update(len(rows))
                    continue  # nothing to constrain (free-text task)
                use = [ex for ex in rows if not setting.joint or ex.fields.get("transcript")]
                if not use:
                    bar.update(len(rows))
                    continue
                gen = GenerateConfig(max_new_tokens=setting.max_new_tokens, num_beams=setting.num_beams)
                hyps, refs = [], []
                for k, idx in enumerate(_batches(len(use), batch_size)):
                    key = (task, setting.name, k)
                    done = journal.replay(key) if journal else None
                    if done is None:
                        done = _run_batch(model, task, t, setting, [use[i] for i in idx], idx, gen, cache,
                                          constraints, constraint_for_task, limit, skips.strict)
                        if journal:
                            journal.commit(key, done["rows"], done["skipped"])
                    for s in done["skipped"]:
                        skips.record(s["reason"], s["where"], s["message"], id=s.get("id"))
                    predictions += done["rows"]
                    hyps += [p["hypothesis"] for p in done["rows"]]
                    refs += [p["reference"] for p in done["rows"]]
                    bar.update(len(idx))
                if not refs:
                    continue
                labels = tasks_lib.resolve_labels(t, use[0]) if t.labels or use[0].fields.get("labels") else None
                table.setdefault(task, {})[setting.name] = metrics_lib.evaluate_task(task, hyps, refs, labels=labels)
                table[task][setting.name]["examples"] = len(refs)
    finally:
        bar.close()
        if journal:
            journal.close()
    if skips.counts:
        log.warning(skips.summary("eval: rows skipped"))
    return predictions, table


def _strict_check(manifests: List[str], limit: float, cache) -> None:
    """Strict mode, before any generation: every row and clip in file order; `DataError` at the first bad one."""
    found = EvalSkips()
    examples = read_manifests(manifests, found, require_target=True)
    bad = [(r["where"], r["reason"], r["message"]) for r in found.rows]
    for ex in examples:
        if cache is not None:
            continue
        try:
            clip = load_audio(ex.audio, offset=ex.offset if ex.segment else 0.0,
                              duration=ex.duration if ex.segment else None)
            if clip.size > limit * SAMPLE_RATE + 1:
                bad.append((ex.where, "audio_too_long", f"{clip.size / SAMPLE_RATE:.2f}s is longer than the "
                            f"model's limit of {limit:g}s"))
        except AudioError as e:
            bad.append((ex.where, e.reason, str(e)))
    if bad:
        order = {m: i for i, m in enumerate(manifests)}
        where, reason, message = min(bad, key=lambda b: (order.get(b[0].rsplit(":", 1)[0], 0),
                                                         int(b[0].rsplit(":", 1)[1])))
        raise DataError(reason, where, message)


def _run_batch(model, task, t, setting, chunk, idx, gen, cache, constraints, constraint_for_task,
               limit, strict=False) -> Dict[str, Any]:
    """Generate for one batch of examples; clips that cannot be used are left out and returned
    under 'skipped'. -> {'rows': prediction dicts, 'skipped': [{where, reason, message, id}]}."""
    skipped, clips, keep = [], [], []
    for ex in chunk:
        if cache is not None:
            keep.append(True)
            continue
        try:
            clip = load_audio(ex.audio, offset=ex.offset if ex.segment else 0.0,
                              duration=ex.duration if ex.segment else None)
        except AudioError as e:
            skipped.append({"where": ex.where, "reason": e.reason, "message": str(e), "id": ex.id})
            keep.append(False)
            continue
        if clip.size > limit * SAMPLE_RATE + 1:
            skipped.append({"where": ex.where, "reason": "audio_too_long", "id": ex.id,
                            "message": f"{clip.size / SAMPLE_RATE:.2f}s is longer than the model's limit of {limit:g}s"})
            keep.append(False)
            continue
        clips.append(clip)
        keep.append(True)
    if strict and skipped:
        raise DataError(skipped[0]["reason"], skipped[0]["where"], skipped[0]["message"])
    idx = [i for i, k in zip(idx, keep) if k]
    chunk = [ex for ex, k in zip(chunk, keep) if k]
    if not chunk:
        return {"rows": [], "skipped": skipped}
    instructions = [tasks_lib.build_instruction(task, ex, i, split=setting.split, joint=setting.joint)
                    for i, ex in zip(idx, chunk)]
    references = [tasks_lib.format_joint_target(task, ex.fields["transcript"], ex.target)
                  if setting.joint else ex.target for ex in chunk]
    constraint = None
    if setting.constrained and not setting.joint:
        labels = tasks_lib.resolve_labels(t, chunk[0])
        key = (task, _label_key(labels))
        if key not in constraints:
            constraints[key] = constraint_for_task(task, model.tokenizer, labels=list(_label_key(labels)))
        constraint = constraints[key]
    # lengths padded to bucket sizes: tasks and batches share compiled programs
    prompt = model.text.encode_prompts_padded(instructions, 16, bucket=True)  # (+ prefix_* in the decoder layout)
    if cache is not None:
        states = [cache.states[ex.id].transpose(1, 0, 2) for ex in chunk]  # [frames, L+1, dim]
        x, mask = pad_rows(states, 8, np.float32, bucket=True)
        inputs, from_states = (x.transpose(0, 2, 1, 3), mask), True
    else:
        inputs, from_states = pad_rows(clips, SAMPLE_RATE, np.float32), False
    out = model.generate_ids(inputs, gen=gen, constraint=constraint, from_states=from_states, **prompt)
    texts = model.decode_text(out)
    rows = [{"id": ex.id, "task": task, "setting": setting.name, "split": setting.split,
             "instruction": ins_text, "reference": ref, "hypothesis": hyp, "audio": ex.audio}
            for ex, ins_text, ref, hyp in zip(chunk, instructions, references, texts)]
    return {"rows": rows, "skipped": skipped}


def write_reports(out_dir: str, predictions: Sequence[Dict[str, Any]], table: Dict[str, Any],
                  baselines: Optional[Dict[str, Any]] = None, skips: Optional[EvalSkips] = None) -> Dict[str, str]:
    """predictions.jsonl, metrics.json and metrics.md (one row per task and setting), and
    skipped.jsonl (every row that was skipped, with manifest:line and reason)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, n) for k, n in
             (("predictions", PREDICTIONS), ("json", "metrics.json"), ("markdown", "metrics.md"),
              ("skipped", SKIPPED))}
    skips = skips if skips is not None else EvalSkips()
    _write_lines(paths["predictions"], [json.dumps(p, ensure_ascii=False) for p in predictions])
    _write_lines(paths["skipped"], [json.dumps(r, ensure_ascii=False) for r in skips.rows])
    _write_lines(paths["json"], [json.dumps({"metrics": table, "baselines": baselines or {},
                                             "skipped": skips.report()}, indent=2)])
    md = markdown_table(table, baselines)
    rep = skips.report()
    md += (f"\nSkipped rows: {rep['total']}"
           + (" (" + ", ".join(f"{r} {n}" for r, n in rep["by_reason"].items()) + f"; each in {SKIPPED})"
              if rep["total"] else "") + "\n")
    _write_lines(paths["markdown"], md.rstrip("\n").split("\n"))
    return paths


def markdown_table(table: Dict[str, Any], baselines: Optional[Dict[str, Any]] = None) -> str:
    lines = ["| task | metric (%) | setting | score | malformed (%) | baseline (%) | examples |",
             "|---|---|---|---|---|---|---|"]
    for task in sorted(table):
        metric = tasks_lib.get_task(task).metric
        base = _baseline_text(task, (baselines or {}).get(task))
        for setting, scores in table[task].items():
            main = scores.get(metric)
            extra = [f"{k} {v:.3f}" for k, v in scores.items()
                     if k not in (metric, "malformed_rate", "examples") and isinstance(v, float)]
            score = "-" if main is None else f"{main:.3f}"
            if extra:
                score += " (" + ", ".join(extra) + ")"
            lines.append(f"| {task} | {metric} | {setting} | {score} | {scores.get('malformed_rate', 0.0):.3f} | "
                         f"{base} | {scores.get('examples', '')} |")
    return "\n".join(lines) + "\n"


def _baseline_text(task: str, b: Optional[Dict[str, Any]]) -> str:
    """The numeric entries of a baseline dict (fractions) in percent, like the metrics."""
    if not b:
        return "-"
    parts = [f"{k.replace('_', ' ')} {100.0 * v:.1f}" for k, v in b.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_labels"]
    return ", ".join(parts) or "-"
