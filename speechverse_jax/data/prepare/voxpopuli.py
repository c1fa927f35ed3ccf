"""VoxPopuli (transcribed data) -> ASR manifests.

Layout (what the VoxPopuli `get_asr_data.py` script writes, per language):
    <src>/transcribed_data/<lang>/asr_{train,dev,test}.tsv
        header: id raw_text normalized_text speaker_id split gender is_gold_transcript accent
    <src>/transcribed_data/<lang>/<year>/<id>.ogg         (year = first 4 characters of id)
(`<src>` may also be the `transcribed_data/<lang>` folder itself.)
"""

from __future__ import annotations

import os
from typing import Any, Dict, Sequence

from speechverse_jax.data.prepare import common


def find_root(src_dir: str, language: str) -> str:
    for cand in (src_dir, os.path.join(src_dir, language), os.path.join(src_dir, "transcribed_data", language)):
        if any(os.path.exists(os.path.join(cand, f"asr_{s}.tsv")) for s in ("train", "dev", "test")):
            return cand
    raise FileNotFoundError(f"voxpopuli: no asr_<split>.tsv under {src_dir} (looked in <src>, <src>/{language}, "
                            f"<src>/transcribed_data/{language})")


def prepare(src_dir: str, out_dir: str, splits: Sequence[str] = ("train", "dev", "test"), language: str = "en",
            text_field: str = "normalized_text", tasks: Sequence[str] = ("asr",)) -> Dict[str, Any]:
    """Write `<out>/<split>.jsonl` (ASR); returns the summary."""
    common.check_tasks(tasks, ("asr",), "voxpopuli")
    root = find_root(src_dir, language)
    writer = common.ManifestWriter("voxpopuli", src_dir, out_dir)
    for split in common.as_tuple(splits):
        tsv = os.path.join(root, f"asr_{split}.tsv")
        if not os.path.exists(tsv):
            raise FileNotFoundError(f"voxpopuli: {tsv} not found")
        for row in common.read_tsv(tsv):
            uid = (row.get("id") or "").strip()
            text = (row.get(text_field) or row.get("raw_text") or "").strip()
            if not uid or not text:
                writer.skip("empty_transcript", uid or tsv)
                continue
            path = os.path.join(root, uid[:4], uid + ".ogg")
            duration = writer.duration(path)
            if duration is None:
                continue
            out = {"audio": os.path.abspath(path), "duration": duration, "id": uid, "task": "asr", "target": text}
            if row.get("accent") and row["accent"] != "None":
                out["accent"] = row["accent"]
            writer.add(split, out)
    return writer.write()
