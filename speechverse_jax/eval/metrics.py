"""Evaluation metrics by name (the task registry's `metric` field), all in percent (0-100).

    score = compute("wer", predictions, references)
    scores = evaluate_task("sf", predictions, references)   # {'slu_f1': .., 'sd_f1': .., 'malformed_rate': ..}

Every metric is `fn(predictions, references, **options) -> float` over a whole corpus. Model
outputs are strings; references are strings in the target format (or already-parsed lists).
Joint outputs (`ASR: ... | Tag: ... |`) are reduced to the task's part by the task parser.

Text normalisation (`normalize_text`, for WER, slot values and keywords): Unicode NFKC,
lowercase, apostrophes dropped ("don't" -> "dont"), every other punctuation character
(Unicode category P*, which includes "%") replaced by a space, whitespace collapsed. Symbols
(category S*: "$", "+", "=") are kept.

    wer             corpus WER: total word edits (S + D + I) / total reference words (jiwer).
    bleu            sacrebleu corpus BLEU (13a tokenisation unless `tokenize=` is given).
    accuracy        exact label match after mapping both sides onto the label set.
    uar             unweighted average recall: mean over reference classes of per-class recall.
    slu_f1          SLURP SLU-F1 (Bastianelli et al. 2020, the official evaluation tool's
                    semantics): predicted (slot, value) pairs are matched to gold pairs of the
                    same slot by lowest value distance; each match adds TP += 1 and
                    FP += d, FN += d; an unmatched prediction adds FP += 1, an unmatched gold
                    FN += 1. This runs twice, with d = word-level WER (jiwer, not capped) and with
                    d = character Levenshtein distance / max length; SLU-F1 is the micro F1 of
                    the summed counts. As in the tool, F1 is 0 when there is no gold and no
                    predicted slot at all.
    sd_f1           slot-label detection F1 (paper Table 7): micro F1 over slot labels only,
                    matched as multisets per utterance, values ignored.
    macro_f1        KWE: F1 of the predicted vs the reference keyword set of each utterance,
                    averaged over utterances (1 when both are empty). Keywords are open-ended,
                    so there is no fixed label set to macro-average over; averaging per
                    utterance weighs every utterance equally, whatever its number of keywords.
    malformed_rate  share of outputs that are empty, loop (some word n-gram, n <= 4, repeated
                    back to back >= 4 times), or, for classification, are not in the label set
                    (for slots: not `none` and nothing parses, or a slot outside the label set).
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jiwer
import sacrebleu
from rapidfuzz.distance import Levenshtein  # a jiwer dependency

from speechverse_jax.data import tasks

Metric = Callable[..., float]
METRICS: Dict[str, Metric] = {}


def register(name: str) -> Callable[[Metric], Metric]:
    def add(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return add


def compute(name: str, predictions: Sequence[str], references: Optional[Sequence[Any]] = None, **options) -> float:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    if references is not None and len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(references)} references")
    return METRICS[name](predictions, references, **options)


_APOSTROPHES = re.compile(r"['\u2019\u02bc`]")


def normalize_text(text: str) -> str:
    """NFKC, lowercase, drop apostrophes, other punctuation -> space, collapse whitespace."""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", str(text)).lower())
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _f1(tp: float, fp: float, fn: float) -> float:
    """F1 as the SLURP tool computes it (0 when undefined), as a fraction."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

@register("wer")
def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    out = jiwer.process_words([normalize_text(r) for r in references], [normalize_text(p) for p in predictions])
    errors = out.substitutions + out.deletions + out.insertions
    words = out.substitutions + out.deletions + out.hits
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return 100.0 * errors / words


@register("bleu")
def bleu(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

def _canonical(predictions, references, labels) -> Tuple[List[Optional[str]], List[str]]:
    """Both sides mapped onto the label set (default: the distinct references); unknown -> None."""
    label_set = tasks.as_label_dict(labels) if labels else {str(r): "" for r in references}
    preds = [tasks.canonical_label(p, label_set) for p in predictions]
    refs = []
    for r in references:
        name = tasks.canonical_label(r, label_set)
        if name is None:
            raise ValueError(f"reference {r!r} is not in the label set {sorted(label_set)}")
        refs.append(name)
    return preds, refs


@register("accuracy")
def accuracy(predictions: Sequence[str], references: Sequence[str], labels=None) -> float:
    preds, refs = _canonical(predictions, references, labels)
    return 100.0 * sum(p == r for p, r in zip(preds, refs)) / max(1, len(refs))


@register("exact_match")
def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of answers equal to the reference after `normalize_text` (open questions)."""
    return 100.0 * sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references)) / max(
        1, len(references))


@register("uar")
def uar(predictions: Sequence[str], references: Sequence[str], labels=None) -> float:
    preds, refs = _canonical(predictions, references, labels)
    hits, totals = collections.Counter(), collections.Counter(refs)
    for p, r in zip(preds, refs):
        hits[r] += p == r
    return 100.0 * sum(hits[c] / n for c, n in totals.items()) / max(1, len(totals))


# --------------------------------------------------------------------------------------------
# Slots and keywords
# --------------------------------------------------------------------------------------------

Pairs = List[Tuple[str, str]]


def _slots(item: Any) -> Pairs:
    pairs = tasks.parse_output("sf", item) if isinstance(item, str) else [tuple(p) for p in item]
    return [(" ".join(str(k).lower().split()), normalize_text(v)) for k, v in pairs]


def _word_distance(gold: str, pred: str) -> float:
    if not gold:
        return 0.0 if not pred else 1.0
    return jiwer.wer(gold, pred)


def _char_distance(gold: str, pred: str) -> float:
    return Levenshtein.normalized_distance(gold, pred)


def _span_counts(gold: Pairs, pred: Pairs, distance: Callable[[str, str], float]) -> Tuple[float, float, float]:
    """SLURP span-distance counts (tp, fp, fn) of one utterance."""
    remaining = list(gold)
    tp = fp = fn = 0.0
    for label, value in pred:
        candidates = [(distance(g, value), i) for i, (gl, g) in enumerate(remaining) if gl == label]
        if not candidates:
            fp += 1
            continue
        d, i = min(candidates)  # lowest distance, first on ties
        tp, fp, fn = tp + 1, fp + d, fn + d
        remaining.pop(i)
    return tp, fp, fn + len(remaining)


def slurp_scores(predictions: Sequence[Any], references: Sequence[Any]) -> Dict[str, float]:
    """{'word_f1', 'char_f1', 'slu_f1'} in percent (see the module docstring)."""
    totals = {"word": [0.0, 0.0, 0.0], "char": [0.0, 0.0, 0.0]}
    for p, r in zip(predictions, references):
        gold, pred = _slots(r), _slots(p)
        for name, dist in (("word", _word_distance), ("char", _char_distance)):
            counts = _span_counts(gold, pred, dist)
            totals[name] = [a + b for a, b in zip(totals[name], counts)]
    summed = [w + c for w, c in zip(totals["word"], totals["char"])]
    return {"word_f1": 100 * _f1(*totals["word"]), "char_f1": 100 * _f1(*totals["char"]), "slu_f1": 100 * _f1(*summed)}


@register("slu_f1")
def slu_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    return slurp_scores(predictions, references)["slu_f1"]


@register("sd_f1")
def sd_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    tp = fp = fn = 0
    for p, r in zip(predictions, references):
        pred = collections.Counter(k for k, _ in _slots(p))
        gold = collections.Counter(k for k, _ in _slots(r))
        matched = sum((pred & gold).values())
        tp, fp, fn = tp + matched, fp + sum(pred.values()) - matched, fn + sum(gold.values()) - matched
    return 100 * _f1(tp, fp, fn)


def _keywords(item: Any) -> set:
    words = tasks.parse_output("kwe", item) if isinstance(item, str) else list(item)
    return {k for k in (normalize_text(w) for w in words) if k}


@register("macro_f1")
def macro_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    scores = []
    for p, r in zip(predictions, references):
        pred, gold = _keywords(p), _keywords(r)
        if not pred and not gold:
            scores.append(1.0)
            continue
        tp = len(pred & gold)
        scores.append(_f1(tp, len(pred) - tp, len(gold) - tp))
    return 100.0 * sum(scores) / max(1, len(scores))


# --------------------------------------------------------------------------------------------
# Malformed outputs
# --------------------------------------------------------------------------------------------

def is_looping(text: str, max_ngram: int = 4, min_repeats: int = 4) -> bool:
    """True when some word n-gram (n <= max_ngram) occurs >= min_repeats times back to back."""
    words = normalize_text(text).split()
    for n in range(1, max_ngram + 1):
        for start in range(len(words) - n * min_repeats + 1):
            gram = words[start : start + n]
            if all(words[start + j * n : start + (j + 1) * n] == gram for j in range(1, min_repeats)):
                return True
    return False


def is_malformed(text: str, task: Optional[str] = None, labels: Optional[tasks.LabelSet] = None) -> bool:
    """Empty, looping, or (with a task / labels) not a valid answer; see the module docstring."""
    t = tasks.get_task(task) if task is not None else None
    if text.lstrip().startswith("ASR:") and t is not None:
        text = tasks.parse_joint_output(text, t).answer
    if not text.strip() or is_looping(text):
        return True
    label_set = tasks.as_label_dict(labels) if labels else (dict(t.labels) if t is not None else {})
    if t is not None and t.kind == "slots":
        if text.strip().lower() in ("none", "none;"):
            return False
        pairs = tasks.parse_slots(text)
        return not pairs or (bool(label_set) and any(tasks.canonical_label(k, label_set) is None for k, _ in pairs))
    if label_set and (t is None or t.kind == "classification"):
        return tasks.canonical_label(text, label_set) is None
    return False


@register("malformed_rate")
def malformed_rate(predictions: Sequence[str], references: Optional[Sequence[Any]] = None,
                   task: Optional[str] = None, labels: Optional[tasks.LabelSet] = None) -> float:
    return 100.0 * sum(is_malformed(p, task, labels) for p in predictions) / max(1, len(predictions))


# --------------------------------------------------------------------------------------------
# Per task
# --------------------------------------------------------------------------------------------

def evaluate_task(task: str, predictions: Sequence[str], references: Sequence[Any],
                  labels: Optional[tasks.LabelSet] = None) -> Dict[str, float]:
    """The task's metric (plus sd_f1 for slots, asr_wer for joint references) and malformed_rate.

    Joint predictions and references (`ASR: ... | Tag: ... |`) are split: the task part is scored
    with the task's metric, the transcripts with WER.
    """
    t = tasks.get_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{t.name}: {len(predictions)} predictions but {len(references)} references")
    out: Dict[str, float] = {}
    if references and all(isinstance(r, str) and r.lstrip().startswith("ASR:") for r in references):
        joint_p = [tasks.parse_joint_output(p, t) for p in predictions]
        joint_r = [tasks.parse_joint_output(r, t) for r in references]
        out["asr_wer"] = wer([j.transcript for j in joint_p], [j.transcript for j in joint_r])
        predictions, references = [j.answer for j in joint_p], [j.answer for j in joint_r]
    if t.metric in ("wer", "bleu", "slu_f1", "macro_f1", "exact_match"):
        out[t.metric] = compute(t.metric, predictions, references)
    elif t.metric in ("accuracy", "uar"):
        out[t.metric] = compute(t.metric, predictions, references, labels=labels or t.labels or None)
    if t.kind == "slots":
        out["sd_f1"] = sd_f1(predictions, references)
    out["malformed_rate"] = malformed_rate(predictions, task=t.name, labels=labels)
    return out
