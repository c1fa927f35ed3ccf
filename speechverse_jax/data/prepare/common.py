"""Helpers shared by the preparation recipes: writing manifests, durations, keywords.

Recipes write absolute audio paths, a `duration` for every row (read from the file header) and
one `<split>.jsonl` per split. Rows that cannot be made are counted by reason in the summary.
"""

from __future__ import annotations

import collections
import math
import os
import re
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from speechverse_jax.data.audio import AudioError, probe_duration
from speechverse_jax.data.manifest import write_manifest

# A short English stop-word list for the keyword tools (function words, pronouns, auxiliaries).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same shan't
she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves then
there there's these they they'd they'll they're they've this those through to too under until up very was
wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's
whom why why's with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves
also just like one two said say says upon unto thee thou thy shall will may might must now well yes yet
oh ah mr mrs miss sir us much many even still every ever never always again going get got go went come came
""".split())

_WORD = re.compile(r"[a-z][a-z']*")


def words(text: str) -> List[str]:
    """Lower-cased word tokens (letters and apostrophes)."""
    return _WORD.findall(text.lower())


def content_words(text: str, min_len: int = 3) -> List[str]:
    """Words of `text` that are not stop words and have at least `min_len` letters."""
    return [w.strip("'") for w in words(text) if w not in STOP_WORDS and len(w.strip("'")) >= min_len]


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): rows come out the same in any order."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


class KeywordExtractor:
    """Built-in KWE labels: content words ranked by tf x idf over the corpus it was fitted on.

    `extract(text)` -> up to `max_keywords` words (1 per 8 content words, at least 1), rarer and
    more repeated words first, ties in order of appearance.
    """

    def __init__(self, corpus: Iterable[str], max_keywords: int = 3):
        self.max_keywords = max_keywords
        self.df: collections.Counter = collections.Counter()
        self.n = 0
        for text in corpus:
            self.n += 1
            self.df.update(set(content_words(text)))

    def idf(self, word: str) -> float:
        return math.log((1 + self.n) / (1 + self.df.get(word, 0))) + 1.0

    def extract(self, text: str) -> List[str]:
        cw = content_words(text)
        if not cw:
            return []
        tf = collections.Counter(cw)
        first = {}
        for i, w in enumerate(cw):
            first.setdefault(w, i)
        ranked = sorted(tf, key=lambda w: (-tf[w] * self.idf(w), first[w]))
        k = min(self.max_keywords, max(1, len(cw) // 8 + 1))
        return ranked[:k]


def load_keywords_file(path: str) -> Dict[str, List[str]]:
    """KWE labels from a file: JSON lines {"id": ..., "keywords": [...] or "a, b"} or TSV `id<TAB>a, b`."""
    import json

    out: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                obj = json.loads(line)
                kws = obj.get("keywords", [])
                kws = kws.split(",") if isinstance(kws, str) else kws
                out[str(obj["id"])] = [k.strip() for k in kws if k.strip()]
            else:
                key, _, rest = line.partition("\t")
                out[key.strip()] = [k.strip() for k in rest.split(",") if k.strip()]
    return out


def kws_example(text: str, vocabulary: Sequence[str], rng: np.random.Generator,
                positive_share: float = 0.7) -> Optional[tuple]:
    """(keyword, 'yes'|'no'): with probability `positive_share` a word of the transcript
    (content words preferred), otherwise a vocabulary word absent from it. None if impossible."""
    present = set(words(text))
    if rng.random() < positive_share:
        pool = content_words(text) or [w for w in words(text) if len(w) > 1]
        if pool:
            return str(pool[int(rng.integers(len(pool)))]), "yes"
    candidates = vocabulary
    for _ in range(50):
        if not len(candidates):
            return None
        w = str(candidates[int(rng.integers(len(candidates)))])
        if w not in present:
            return w, "no"
    absent = [w for w in candidates if w not in present]
    return (str(absent[int(rng.integers(len(absent)))]), "no") if absent else None


class ManifestWriter:
    """Collects rows per split, counts skips, writes `<out_dir>/<split>.jsonl`, returns a summary."""

    def __init__(self, dataset: str, src_dir: str, out_dir: str):
        self.dataset, self.src_dir, self.out_dir = dataset, src_dir, out_dir
        self.rows: Dict[str, List[dict]] = collections.defaultdict(list)
        self.skipped: collections.Counter = collections.Counter()
        self.examples: List[str] = []  # first skip messages

    def add(self, split: str, row: Mapping[str, Any]) -> None:
        self.rows[split].append(dict(row))

    def skip(self, reason: str, message: str = "") -> None:
        self.skipped[reason] += 1
        if message and len(self.examples) < 10:
            self.examples.append(f"{reason}: {message}")

    def duration(self, path: str) -> Optional[float]:
        """Header duration in seconds, or None (counted) for missing / unreadable / empty files."""
        try:
            return round(probe_duration(path), 4)
        except AudioError as e:
            self.skip(e.reason, str(e))
            return None

    def write(self) -> Dict[str, Any]:
        manifests, counts = {}, {}
        for split in sorted(self.rows):
            path = os.path.join(self.out_dir, f"{split}.jsonl")
            write_manifest(path, self.rows[split])
            manifests[split] = path
            counts[split] = dict(sorted(collections.Counter(r["task"] for r in self.rows[split]).items()))
        return {"dataset": self.dataset, "src_dir": self.src_dir, "out_dir": self.out_dir, "manifests": manifests,
                "rows": counts, "skipped": dict(sorted(self.skipped.items())), "skip_examples": list(self.examples)}


def as_tuple(value, default=()) -> tuple:
    """Option values given as 'a,b' strings (from a CLI) or sequences -> tuple of strings."""
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def check_tasks(tasks: Sequence[str], allowed: Sequence[str], dataset: str) -> tuple:
    tasks = as_tuple(tasks)
    bad = [t for t in tasks if t not in allowed]
    if bad:
        raise ValueError(f"{dataset}: tasks {bad} are not made by this recipe (choose from {list(allowed)})")
    return tasks


def find_dir(root: str, candidates: Sequence[str], what: str) -> str:
    """The first of root/<candidate> that exists (FileNotFoundError naming all tried)."""
    tried = [os.path.join(root, c) if c else root for c in candidates]
    for p in tried:
        if os.path.isdir(p):
            return p
    raise FileNotFoundError(f"{what}: none of {tried} exists")


def read_tsv(path: str) -> List[Dict[str, str]]:
    """A TSV with a header row -> list of dicts (no quoting: Common Voice style)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def add_keyword_rows(writer: ManifestWriter, split: str, base: Mapping[str, Any], text: str, tasks: Sequence[str],
                     extractor: Optional[KeywordExtractor], vocabulary: Sequence[str], seed: int,
                     positive_share: float, keyword_labels: Optional[Mapping[str, List[str]]]) -> None:
    """The KWS and KWE rows of one utterance (both carry the transcript for joint decoding)."""
    uid = str(base["id"])
    if "kws" in tasks:
        kw = kws_example(text, vocabulary, rng_for(seed, uid), positive_share)
        if kw is None:
            writer.skip("kws_no_keyword", uid)
        else:
            writer.add(split, {**base, "id": f"{uid}/kws", "task": "kws", "keyword": kw[0], "target": kw[1],
                               "transcript": text})
    if "kwe" in tasks:
        if keyword_labels is not None:
            kws = keyword_labels.get(uid)
            if kws is None:
                writer.skip("kwe_no_label", uid)
                return
        else:
            kws = extractor.extract(text) if extractor is not None else []
        if not kws:
            writer.skip("kwe_no_keywords", uid)
        else:
            writer.add(split, {**base, "id": f"{uid}/kwe", "task": "kwe", "target": list(kws), "transcript": text})
