"""Fisher English -> speaker counting (SC: one vs two speakers) manifests from segment transcripts.

Layout (LDC releases, parts 1 and 2 extracted anywhere under `<src>`):
    .../fe_03_p1_tran/data/trans/<nnn>/fe_03_<nnnnn>.txt   lines `<start> <end> <A|B>: <text>`
    .../fe_03_p1_sph*/audio/<nnn>/fe_03_<nnnnn>.sph        2-channel 8 kHz NIST SPHERE
Transcripts and audio are matched by file stem. (Shorten-compressed .sph needs converting with
sph2pipe first: libsndfile cannot read it; such files are counted as unreadable.)

Segments (all offsets into the conversation; the loader downmixes both channels):
    one: a single turn of `min_seconds`..`max_seconds` that no turn of the other speaker overlaps
    two: two consecutive turns of different speakers spanning at most `max_seconds`, each speaking
         at least `min_speaker_seconds` inside it
Conversations go to train / dev / test by a seeded hash of their id (`dev_share`, `test_share`).
Each row carries the turns' text as `transcript` (for joint decoding).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict, List, Tuple

from speechverse_jax.data.prepare import common

Turn = Tuple[float, float, str, str]  # start, end, speaker, text


def read_turns(path: str) -> List[Turn]:
    """The timed turns of one Fisher transcript (comment and blank lines skipped)."""
    turns = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 2)
            if len(parts) < 3 or ":" not in parts[2]:
                continue
            try:
                start, end = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            speaker, _, text = parts[2].partition(":")
            if end > start:
                turns.append((start, end, speaker.strip(), text.strip()))
    return sorted(turns)


def _overlaps(turns: List[Turn], start: float, end: float, speaker: str) -> float:
    """Seconds of [start, end) covered by turns of speakers other than `speaker`."""
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e, spk, _ in turns if spk != speaker)


def segments(turns: List[Turn], min_seconds: float = 1.0, max_seconds: float = 15.0,
             min_speaker_seconds: float = 0.5) -> List[Tuple[float, float, str, str]]:
    """(start, end, 'one'|'two', transcript) segments of one conversation."""
    out = []
    for s, e, spk, text in turns:
        if min_seconds <= e - s <= max_seconds and _overlaps(turns, s, e, spk) == 0.0:
            out.append((s, e, "one", text))
    for (s1, e1, k1, t1), (s2, e2, k2, t2) in zip(turns, turns[1:]):
        start, end = min(s1, s2), max(e1, e2)
        if k1 != k2 and min_seconds <= end - start <= max_seconds \
                and e1 - s1 >= min_speaker_seconds and e2 - s2 >= min_speaker_seconds:
            out.append((start, end, "two", f"{t1} {t2}".strip()))
    return sorted(out)


def _split_of(conv: str, seed: int, dev_share: float, test_share: float) -> str:
    u = common.rng_for(seed, conv).random()
    return "test" if u < test_share else "dev" if u < test_share + dev_share else "train"


def prepare(src_dir: str, out_dir: str, seed: int = 0, min_seconds: float = 1.0, max_seconds: float = 15.0,
            min_speaker_seconds: float = 0.5, dev_share: float = 0.05, test_share: float = 0.05,
            tasks=("sc",)) -> Dict[str, Any]:
    """Write `<out>/{train,dev,test}.jsonl`; returns the summary."""
    common.check_tasks(tasks, ("sc",), "fisher")
    writer = common.ManifestWriter("fisher", src_dir, out_dir)
    audio = {os.path.splitext(os.path.basename(p))[0]: p
             for p in glob.glob(os.path.join(src_dir, "**", "*.sph"), recursive=True)}
    transcripts = sorted(p for p in glob.glob(os.path.join(src_dir, "**", "fe_*.txt"), recursive=True))
    if not transcripts:
        raise FileNotFoundError(f"fisher: no fe_*.txt transcripts under {src_dir}")
    for tpath in transcripts:
        conv = os.path.splitext(os.path.basename(tpath))[0]
        if conv not in audio:
            writer.skip("missing_file", f"{conv}.sph")
            continue
        total = writer.duration(audio[conv])
        if total is None:
            continue
        split = _split_of(conv, seed, dev_share, test_share)
        for start, end, label, text in segments(read_turns(tpath), min_seconds, max_seconds, min_speaker_seconds):
            if end > total + 1e-3:
                writer.skip("segment_past_end", f"{conv} {start:.2f}-{end:.2f}")
                continue
            row = {"audio": os.path.abspath(audio[conv]), "offset": round(start, 3),
                   "duration": round(end - start, 3), "id": f"{conv}_{int(start * 100):07d}_{label}",
                   "task": "sc", "target": label}
            if text:
                row["transcript"] = text
            writer.add(split, row)
    return writer.write()
