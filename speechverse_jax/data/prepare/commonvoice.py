"""Mozilla Common Voice -> ASR, accent classification (AC), KWS and KWE manifests.

Layout (a language folder of a release, e.g. cv-corpus-5.1-2020-06-22/en/):
    <src>/{train,dev,test}.tsv   header: client_id path sentence up_votes down_votes age gender accent(s) ...
    <src>/clips/<path>           mp3 clips
(`<src>` may also be the release folder holding `en/`.)

AC keeps the paper's 5 accents (A.3): release 5.1 codes us / england / indian / australia /
canada, and the free-text labels of later releases ("United States English", ...), mapped to
american / british / indian / australian / canadian. Other accents are counted, not written.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence

from speechverse_jax.data.prepare import common

TASKS = ("asr", "ac", "kws", "kwe")
ACCENTS = {
    "us": "american", "united states english": "american",
    "england": "british", "england english": "british",
    "indian": "indian", "india and south asia (india, pakistan, sri lanka)": "indian",
    "australia": "australian", "australian english": "australian",
    "canada": "canadian", "canadian english": "canadian",
}


def find_root(src_dir: str, language: str = "en") -> str:
    for cand in (src_dir, os.path.join(src_dir, language)):
        if os.path.isdir(os.path.join(cand, "clips")) and any(
                os.path.exists(os.path.join(cand, f"{s}.tsv")) for s in ("train", "dev", "test", "validated")):
            return cand
    raise FileNotFoundError(f"commonvoice: no <split>.tsv + clips/ in {src_dir} or {os.path.join(src_dir, language)}")


def accent_of(row: Mapping[str, str], accent_map: Mapping[str, str]) -> Optional[str]:
    raw = (row.get("accent") or row.get("accents") or "").strip().lower()
    for part in [raw] + [p.strip() for p in raw.split("|")]:  # later releases join several with '|'
        if part in accent_map:
            return accent_map[part]
    return None


def prepare(src_dir: str, out_dir: str, tasks: Sequence[str] = ("asr", "ac"),
            splits: Sequence[str] = ("train", "dev", "test"), language: str = "en", seed: int = 0,
            kws_positive_share: float = 0.7, keywords_file: Optional[str] = None, max_keywords: int = 3,
            accent_map: Optional[Mapping[str, str]] = None, lowercase: bool = False) -> Dict[str, Any]:
    """Write the manifests; returns the summary."""
    tasks = common.check_tasks(tasks, TASKS, "commonvoice")
    root = find_root(src_dir, language)
    accent_map = {k.lower(): v for k, v in (accent_map or ACCENTS).items()}
    writer = common.ManifestWriter("commonvoice", src_dir, out_dir)
    labels = common.load_keywords_file(keywords_file) if keywords_file else None
    for split in common.as_tuple(splits):
        tsv = os.path.join(root, f"{split}.tsv")
        if not os.path.exists(tsv):
            raise FileNotFoundError(f"commonvoice: {tsv} not found")
        rows = common.read_tsv(tsv)
        texts = [(r.get("sentence") or "").strip() for r in rows]
        texts = [t.lower() for t in texts] if lowercase else texts
        extractor = common.KeywordExtractor(texts, max_keywords) if "kwe" in tasks else None
        vocabulary = sorted({w for t in texts for w in common.content_words(t)}) if "kws" in tasks else []
        for row, text in zip(rows, texts):
            clip = (row.get("path") or "").strip()
            if not clip:
                writer.skip("missing_field", f"{tsv}: row without path")
                continue
            path = os.path.join(root, "clips", clip)
            duration = writer.duration(path)
            if duration is None:
                continue
            uid = os.path.splitext(clip)[0]
            base = {"audio": os.path.abspath(path), "duration": duration, "id": uid}
            if "asr" in tasks:
                if text:
                    writer.add(split, {**base, "task": "asr", "target": text})
                else:
                    writer.skip("empty_transcript", uid)
            if "ac" in tasks:
                accent = accent_of(row, accent_map)
                if accent is None:
                    writer.skip("accent_not_in_label_set", uid)
                else:
                    writer.add(split, {**base, "id": f"{uid}/ac", "task": "ac", "target": accent,
                                       **({"transcript": text} if text else {})})
            if text:
                common.add_keyword_rows(writer, split, base, text, tasks, extractor, vocabulary, seed,
                                        kws_positive_share, labels)
    return writer.write()
