"""LibriSpeech -> ASR, KWS and KWE manifests.

Layout (as downloaded from openslr, one or more splits extracted side by side):
    <src>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <src>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
(`<src>` may also be the LibriSpeech folder itself.) Each `.trans.txt` line is `<utt id> <WORDS>`.

Writes `<out>/<split>.jsonl`. KWS (paper A.3): 70% positives (a word of the transcript), 30%
negatives (a word of the split's vocabulary absent from it), seeded per utterance. KWE: the
built-in tf-idf keyword extractor fitted on the split, or labels from `keywords_file`.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict, Optional, Sequence

from speechverse_jax.data.prepare import common

TASKS = ("asr", "kws", "kwe")


def read_transcripts(split_dir: str) -> Dict[str, tuple]:
    """{utt id: (flac path, transcript)} for one split folder."""
    out = {}
    for trans in sorted(glob.glob(os.path.join(split_dir, "*", "*", "*.trans.txt"))):
        folder = os.path.dirname(trans)
        with open(trans, encoding="utf-8") as f:
            for line in f:
                uid, _, text = line.strip().partition(" ")
                if uid:
                    out[uid] = (os.path.join(folder, uid + ".flac"), text.strip())
    return out


def find_splits(src_dir: str) -> Dict[str, str]:
    """{split name: folder} for every folder holding <speaker>/<chapter>/*.trans.txt."""
    roots = [os.path.join(src_dir, "LibriSpeech"), src_dir]
    for root in roots:
        if not os.path.isdir(root):
            continue
        found = {d: os.path.join(root, d) for d in sorted(os.listdir(root))
                 if glob.glob(os.path.join(root, d, "*", "*", "*.trans.txt"))}
        if found:
            return found
    raise FileNotFoundError(f"librispeech: no <split>/<speaker>/<chapter>/*.trans.txt under {roots}")


def prepare(src_dir: str, out_dir: str, tasks: Sequence[str] = TASKS, splits: Optional[Sequence[str]] = None,
            seed: int = 0, kws_positive_share: float = 0.7, keywords_file: Optional[str] = None,
            max_keywords: int = 3, lowercase: bool = True) -> Dict[str, Any]:
    """Write the manifests; returns the summary (manifests, rows per split and task, skips)."""
    tasks = common.check_tasks(tasks, TASKS, "librispeech")
    writer = common.ManifestWriter("librispeech", src_dir, out_dir)
    labels = common.load_keywords_file(keywords_file) if keywords_file else None
    available = find_splits(src_dir)
    wanted = common.as_tuple(splits, available)
    for split in wanted:
        if split not in available:
            raise FileNotFoundError(f"librispeech: split {split!r} not found (have {sorted(available)})")
        utts = read_transcripts(available[split])
        texts = {uid: (t.lower() if lowercase else t) for uid, (_, t) in utts.items()}
        extractor = common.KeywordExtractor(texts.values(), max_keywords) if "kwe" in tasks else None
        vocabulary = sorted({w for t in texts.values() for w in common.content_words(t)})
        for uid in sorted(utts):
            path, _ = utts[uid]
            text = texts[uid]
            if not text:
                writer.skip("empty_transcript", uid)
                continue
            duration = writer.duration(path)
            if duration is None:
                continue
            base = {"audio": os.path.abspath(path), "duration": duration, "id": uid}
            if "asr" in tasks:
                writer.add(split, {**base, "task": "asr", "target": text})
            common.add_keyword_rows(writer, split, base, text, tasks, extractor, vocabulary, seed,
                                    kws_positive_share, labels)
    return writer.write()
