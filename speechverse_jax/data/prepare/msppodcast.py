"""MSP-Podcast -> emotion recognition (ER, 4 classes) and sentiment (ASC) manifests, optional ASR.

Layout (release 1.11):
    <src>/Labels/labels_consensus.csv   header: FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set
    <src>/Audios/<FileName>              16 kHz wav (older releases: <src>/Audio/)
    <src>/Transcripts/<stem>.txt         optional; adds `transcript` (joint decoding) and ASR rows

ER keeps N / H / S / A -> neutral / happy / sad / angry (paper A.3); other classes are counted.
ASC: valence (1-7) below 3 -> negative, above 5 -> positive, otherwise neutral (the paper splits
"at 3 and 5"; `valence_bounds` changes the cut points). Split_Set Train / Development / Test1 /
Test2 / Test3 -> train / dev / test1 / test2 / test3.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, Sequence, Tuple

from speechverse_jax.data.prepare import common

TASKS = ("er", "asc", "asr")
EMOTIONS = {"N": "neutral", "H": "happy", "S": "sad", "A": "angry"}
SPLITS = {"train": "train", "development": "dev", "test1": "test1", "test2": "test2", "test3": "test3"}


def valence_class(valence: float, bounds: Tuple[float, float] = (3.0, 5.0)) -> str:
    lo, hi = bounds
    return "negative" if valence < lo else "positive" if valence > hi else "neutral"


def prepare(src_dir: str, out_dir: str, tasks: Sequence[str] = ("er", "asc"),
            valence_bounds: Tuple[float, float] = (3.0, 5.0), splits: Sequence[str] = ()) -> Dict[str, Any]:
    """Write `<out>/<split>.jsonl`; returns the summary."""
    tasks = common.check_tasks(tasks, TASKS, "msppodcast")
    labels_csv = os.path.join(src_dir, "Labels", "labels_consensus.csv")
    if not os.path.exists(labels_csv):
        raise FileNotFoundError(f"msppodcast: {labels_csv} not found")
    audio_dir = common.find_dir(src_dir, ["Audios", "Audio"], "msppodcast audio folder")
    transcripts = os.path.join(src_dir, "Transcripts")
    wanted = set(common.as_tuple(splits))
    writer = common.ManifestWriter("msppodcast", src_dir, out_dir)
    with open(labels_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        name = (row.get("FileName") or "").strip()
        split_raw = (row.get("Split_Set") or "").strip().lower()
        split = SPLITS.get(split_raw, split_raw or "unknown")
        if wanted and split not in wanted:
            continue
        path = os.path.join(audio_dir, name)
        duration = writer.duration(path)
        if duration is None:
            continue
        uid = os.path.splitext(name)[0]
        base = {"audio": os.path.abspath(path), "duration": duration}
        tpath = os.path.join(transcripts, uid + ".txt")
        text = open(tpath, encoding="utf-8").read().strip() if os.path.exists(tpath) else ""
        if text:
            base["transcript"] = text
        if "er" in tasks:
            emotion = EMOTIONS.get((row.get("EmoClass") or "").strip().upper())
            if emotion is None:
                writer.skip("emotion_not_in_4_classes", f"{name}: {row.get('EmoClass')}")
            else:
                writer.add(split, {**base, "id": f"{uid}/er", "task": "er", "target": emotion})
        if "asc" in tasks:
            try:
                valence = float(row.get("EmoVal", ""))
            except ValueError:
                writer.skip("bad_valence", f"{name}: {row.get('EmoVal')!r}")
            else:
                writer.add(split, {**base, "id": f"{uid}/asc", "task": "asc",
                                   "target": valence_class(valence, tuple(valence_bounds)), "valence": valence})
        if "asr" in tasks:
            if text:
                writer.add(split, {**base, "id": uid, "task": "asr", "target": text})
            else:
                writer.skip("no_transcript", name)
    return writer.write()
