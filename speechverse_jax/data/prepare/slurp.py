"""SLURP -> ASR, intent classification (IC) and slot filling (SF) manifests.

Layout (the SLURP repository plus its downloaded audio):
    <src>/dataset/slurp/{train,devel,test}.jsonl   (optional train_synthetic.jsonl)
        {"slurp_id", "sentence", "sentence_annotation": "wake me up at [time : five am]",
         "intent": "alarm_set", "recordings": [{"file": "audio-....flac", ...}, ...], ...}
    <src>/audio/slurp_real/*.flac, <src>/audio/slurp_synth/*.flac
(also accepted: the jsonl files and slurp_real/ directly under `<src>`.)

Options follow the paper: `intents='top10'` keeps the 10 most frequent intents of the train
split for IC (the others go to `<split>_unseen.jsonl`, the held-out labels of Table 7);
`slots='paper4'` keeps date, place_name, person, time for SF. Each IC / SF row carries its
label set in `labels`, so prompts list exactly the labels of the subset.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Dict, List, Sequence, Tuple, Union

from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.prepare import common

TASKS = ("asr", "ic", "sf")
PAPER_SLOTS = ("date", "place_name", "person", "time")
_SLOT = re.compile(r"\[\s*([^\[\]:]+?)\s*:\s*([^\[\]]*?)\s*\]")


def parse_annotation(annotation: str) -> List[Tuple[str, str]]:
    """'wake me up at [time : five am] on [date : monday]' -> [('time', 'five am'), ('date', 'monday')]."""
    return [(k.strip(), v.strip()) for k, v in _SLOT.findall(annotation) if k.strip() and v.strip()]


def _find(src_dir: str) -> Tuple[str, List[str]]:
    text_dir = common.find_dir(src_dir, ["dataset/slurp", "slurp", ""], "slurp jsonl folder")
    if not os.path.exists(os.path.join(text_dir, "train.jsonl")) and not os.path.exists(
            os.path.join(text_dir, "test.jsonl")):
        raise FileNotFoundError(f"slurp: no train.jsonl / test.jsonl in {text_dir}")
    audio_dirs = [os.path.join(src_dir, d)
                  for d in ("audio/slurp_real", "audio/slurp_synth", "slurp_real", "slurp_synth")]
    return text_dir, [d for d in audio_dirs if os.path.isdir(d)]


def _read(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _subset(option: Union[str, Sequence[str]], counts: collections.Counter,
            presets: Dict[str, Sequence[str]]) -> List[str]:
    if isinstance(option, str) and option in presets:
        return list(presets[option])
    if isinstance(option, str) and option.startswith("top"):
        n = int(option[3:])
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    return list(common.as_tuple(option))


def prepare(src_dir: str, out_dir: str, tasks: Sequence[str] = TASKS,
            splits: Sequence[str] = ("train", "devel", "test"), intents: Union[str, Sequence[str]] = "top10",
            slots: Union[str, Sequence[str]] = "paper4", recordings: str = "all",
            sf_keep_empty: bool = False) -> Dict[str, Any]:
    """Write `<out>/<split>.jsonl` (+ `<split>_unseen.jsonl` for held-out intents); returns the summary.

    intents: 'all' | 'topN' (most frequent in train) | list. slots: 'all' | 'paper4' | list.
    recordings: 'all' (one example per recording) | 'first' (one per sentence).
    """
    tasks = common.check_tasks(tasks, TASKS, "slurp")
    if recordings not in ("all", "first"):
        raise ValueError(f"slurp: recordings must be 'all' or 'first', got {recordings!r}")
    text_dir, audio_dirs = _find(src_dir)
    writer = common.ManifestWriter("slurp", src_dir, out_dir)
    data = {s: _read(os.path.join(text_dir, f"{s}.jsonl")) for s in common.as_tuple(splits)
            if os.path.exists(os.path.join(text_dir, f"{s}.jsonl"))}
    missing = [s for s in common.as_tuple(splits) if s not in data]
    if missing:
        raise FileNotFoundError(f"slurp: {missing} not found in {text_dir}")
    train_path = os.path.join(text_dir, "train.jsonl")  # subsets are chosen on train, whatever is written
    reference = data.get("train") or (_read(train_path) if os.path.exists(train_path)
                                      else [r for rows in data.values() for r in rows])
    intent_counts = collections.Counter(r["intent"] for r in reference)
    slot_counts = collections.Counter(k for r in reference
                                      for k, _ in parse_annotation(r.get("sentence_annotation", "")))
    intent_set = _subset(intents, intent_counts, {"all": sorted(intent_counts)})
    slot_set = _subset(slots, slot_counts, {"all": sorted(slot_counts), "paper4": PAPER_SLOTS})
    all_intents = sorted(set(intent_counts) | {r["intent"] for rows in data.values() for r in rows})
    unseen_set = [i for i in all_intents if i not in intent_set]
    intent_labels = {i: tasks_lib.SLURP_INTENTS.get(i, "") for i in intent_set}
    unseen_labels = {i: tasks_lib.SLURP_INTENTS.get(i, "") for i in unseen_set}
    slot_labels = {s: tasks_lib.SF_SLOTS.get(s, s.replace("_", " ")) for s in slot_set}
    for split, rows in data.items():
        for r in rows:
            sentence = (r.get("sentence") or "").strip()
            recs = r.get("recordings") or []
            if recordings == "first":
                recs = recs[:1]
            if not recs:
                writer.skip("no_recording", str(r.get("slurp_id")))
            for rec in recs:
                path = next((os.path.join(d, rec["file"]) for d in audio_dirs
                             if os.path.exists(os.path.join(d, rec["file"]))), None)
                if path is None:
                    writer.skip("missing_file", rec.get("file", ""))
                    continue
                duration = writer.duration(path)
                if duration is None:
                    continue
                uid = os.path.splitext(rec["file"])[0]
                base = {"audio": os.path.abspath(path), "duration": duration, "transcript": sentence,
                        "slurp_id": r.get("slurp_id")}
                if "asr" in tasks and sentence:
                    writer.add(split, {**base, "id": uid, "task": "asr", "target": sentence})
                if "ic" in tasks:
                    if r["intent"] in intent_labels:
                        writer.add(split, {**base, "id": f"{uid}/ic", "task": "ic", "target": r["intent"],
                                           "labels": intent_labels})
                    else:
                        writer.add(f"{split}_unseen", {**base, "id": f"{uid}/ic", "task": "ic",
                                                       "target": r["intent"], "labels": unseen_labels})
                if "sf" in tasks:
                    pairs = [(k, v) for k, v in parse_annotation(r.get("sentence_annotation", "")) if k in slot_labels]
                    if pairs or sf_keep_empty:
                        writer.add(split, {**base, "id": f"{uid}/sf", "task": "sf",
                                           "target": tasks_lib.format_slots(pairs), "labels": slot_labels})
                    else:
                        writer.skip("sf_no_slot_in_subset")
    summary = writer.write()
    summary.update(intents=intent_set, unseen_intents=unseen_set, slots=slot_set)
    return summary
