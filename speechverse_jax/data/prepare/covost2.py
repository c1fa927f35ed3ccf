"""CoVoST 2 (English -> X) -> speech translation (ST) manifests, optionally ASR too.

Layout: the CoVoST 2 tsv next to (or pointing into) a Common Voice English release:
    <src>/covost_v2.en_<lang>.tsv            header: path sentence translation client_id split
      (or the per-split files of get_covost_splits.py: covost_v2.en_<lang>.<split>.tsv)
    <cv_dir>/clips/<path>                     Common Voice mp3 clips (cv_dir defaults to <src>;
                                              <src>/en is tried too)
When a tsv lacks `sentence`, transcripts come from `<cv_dir>/validated.tsv` (only needed for ASR
rows and joint decoding). Split values train / dev / test (anything else keeps its own name).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Dict, Optional, Sequence

from speechverse_jax.data import tasks as tasks_lib
from speechverse_jax.data.prepare import common


def _clips_dir(src_dir: str, cv_dir: Optional[str]) -> str:
    for cand in ([cv_dir] if cv_dir else []) + [src_dir, os.path.join(src_dir, "en")]:
        if cand and os.path.isdir(os.path.join(cand, "clips")):
            return cand
    raise FileNotFoundError(f"covost2: no clips/ folder (give cv_dir=<Common Voice en folder>); tried {src_dir}")


def _tables(src_dir: str, target_language: Optional[str]) -> Dict[str, list]:
    """{language code: [(split or None, tsv path), ...]}."""
    out: Dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(src_dir, "covost_v2.en_*.tsv"))):
        m = re.match(r"covost_v2\.en_([a-z]+)(?:\.(\w+))?\.tsv$", os.path.basename(path))
        if m and (target_language is None or m.group(1) == target_language):
            out.setdefault(m.group(1), []).append((m.group(2), path))
    if not out:
        raise FileNotFoundError(f"covost2: no covost_v2.en_{target_language or '*'}.tsv in {src_dir}")
    return out


def prepare(src_dir: str, out_dir: str, target_language: Optional[str] = None, cv_dir: Optional[str] = None,
            tasks: Sequence[str] = ("st",), splits: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write `<out>/<split>.jsonl` (rows of every en->X pair found, or of `target_language`)."""
    tasks = common.check_tasks(tasks, ("st", "asr"), "covost2")
    root = _clips_dir(src_dir, cv_dir)
    writer = common.ManifestWriter("covost2", src_dir, out_dir)
    validated = None
    wanted = set(common.as_tuple(splits)) if splits else None
    for lang, tables in _tables(src_dir, target_language).items():
        for fixed_split, path in tables:
            for row in common.read_tsv(path):
                split = fixed_split or row.get("split", "train")
                if wanted is not None and split not in wanted:
                    continue
                clip = (row.get("path") or "").strip()
                translation = (row.get("translation") or "").strip()
                if not clip or not translation:
                    writer.skip("missing_field", f"{path}: {clip or 'row without path'}")
                    continue
                sentence = (row.get("sentence") or "").strip()
                if not sentence and ("asr" in tasks or "sentence" not in row):
                    if validated is None:
                        vpath = os.path.join(root, "validated.tsv")
                        validated = {r["path"]: r.get("sentence", "") for r in common.read_tsv(vpath)} \
                            if os.path.exists(vpath) else {}
                    sentence = validated.get(clip, "").strip()
                audio = os.path.join(root, "clips", clip)
                duration = writer.duration(audio)
                if duration is None:
                    continue
                uid = os.path.splitext(clip)[0]
                base = {"audio": os.path.abspath(audio), "duration": duration}
                if sentence:
                    base["transcript"] = sentence
                if "st" in tasks:
                    writer.add(split, {**base, "id": f"{uid}/st_{lang}", "task": "st", "target": translation,
                                       "target_language": lang,
                                       "target_language_name": tasks_lib.LANGUAGES.get(lang, lang)})
                if "asr" in tasks and sentence:
                    writer.add(split, {**base, "id": uid, "task": "asr", "target": sentence})
    return writer.write()
