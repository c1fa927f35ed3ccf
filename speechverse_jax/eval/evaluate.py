"""Evaluate a model on manifests: generate per task, score with the task's metric, write reports.

    preds, table = evaluate(model, ["test.jsonl"], settings=[EvalSetting("seen"), EvalSetting("unseen")])

Instructions come from the same prompt code as training (`data.tasks.build_instruction`); the
prompt index of example i is i, so every run scores the same instructions. Constrained decoding
uses the row's label set (or the registry's); joint decoding asks for the transcript first and
scores both parts. Outputs: predictions JSONL (id, task, setting, instruction, reference,
hypothesis, audio) and a per-task metrics table (markdown + JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.audio import SAMPLE_RATE, load_audio
from speechverse_jax.data.batching import pad_rows
from speechverse_jax.data.manifest import read_manifests
from speechverse_jax.eval import metrics as metrics_lib


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


def evaluate(model, manifests: Sequence[str], settings: Sequence[EvalSetting] = (EvalSetting(),),
             tasks: Optional[Sequence[str]] = None, batch_size: int = 16, cache=None,
             progress: bool = True) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Dict[str, float]]]]:
    """-> (predictions, table[task][setting name][metric]).

    `model` is an `api.SpeechVerseModel`; `cache` an optional `data.encoder_cache.EncoderCache`
    holding the frozen encoder's states for these examples (skips the audio encoder).
    Joint settings apply to tasks with transcripts only (rows with a `transcript` field).
    """
    from tqdm import tqdm

    from speechverse_jax.decode.constraints import constraint_for_task
    from speechverse_jax.decode.generate import GenerateConfig

    examples = read_manifests(list(manifests), require_target=True)
    by_task: Dict[str, List[Any]] = {}
    for ex in examples:
        if tasks is None or ex.task in tasks:
            by_task.setdefault(ex.task, []).append(ex)
    predictions: List[Dict[str, Any]] = []
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    total = sum(len(v) for v in by_task.values()) * len(settings)
    bar = tqdm(total=total, desc="evaluate", disable=not progress, dynamic_ncols=True)
    constraints: Dict[Tuple, Any] = {}
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
            for idx in _batches(len(use), batch_size):
                chunk = [use[i] for i in idx]
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
                ins, ins_mask = model.text.encode_padded(instructions, 16)
                if cache is not None:
                    states = [cache.states[ex.id].transpose(1, 0, 2) for ex in chunk]  # [frames, L+1, dim]
                    x, mask = pad_rows(states, 8, np.float32)
                    inputs, from_states = (x.transpose(0, 2, 1, 3), mask), True
                else:
                    clips = [load_audio(ex.audio, offset=ex.offset if ex.segment else 0.0,
                                        duration=ex.duration if ex.segment else None) for ex in chunk]
                    inputs, from_states = pad_rows(clips, SAMPLE_RATE, np.float32), False
                out = model.generate_ids(inputs, ins, ins_mask, gen, constraint, from_states=from_states)
                texts = model.decode_text(out)
                for ex, ins_text, ref, hyp in zip(chunk, instructions, references, texts):
                    predictions.append({"id": ex.id, "task": task, "setting": setting.name, "split": setting.split,
                                        "instruction": ins_text, "reference": ref, "hypothesis": hyp,
                                        "audio": ex.audio})
                hyps += texts
                refs += references
                bar.update(len(chunk))
            labels = tasks_lib.resolve_labels(t, use[0]) if t.labels or use[0].fields.get("labels") else None
            table.setdefault(task, {})[setting.name] = metrics_lib.evaluate_task(task, hyps, refs, labels=labels)
            table[task][setting.name]["examples"] = len(use)
    bar.close()
    return predictions, table


def write_reports(out_dir: str, predictions: Sequence[Dict[str, Any]], table: Dict[str, Any],
                  baselines: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """predictions.jsonl, metrics.json and metrics.md (one row per task and setting)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, n) for k, n in
             (("predictions", "predictions.jsonl"), ("json", "metrics.json"), ("markdown", "metrics.md"))}
    with open(paths["predictions"], "w") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"metrics": table, "baselines": baselines or {}}, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(table, baselines))
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
