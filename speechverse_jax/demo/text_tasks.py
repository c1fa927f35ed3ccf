"""The text the demo's T5 is pretrained on: an endless stream of the speech tasks in text form.

    stream = TextTasks(sentence_families(seed), kws_vocabulary(families), IC_LABELS, weights)
    pairs = stream.sample(rng, n)        # n (input, target) texts of one kind

Used by the demo-backbones recipe (demo/recipe.py); `_t5_query_scale` gives a T5 trained from
scratch HF's query initialisation.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from speechverse_jax.models.t5 import T5Config


def _t5_query_scale(params: dict, cfg: T5Config) -> dict:
    """T5 attention has no 1/sqrt(d_kv) in its logits; HF initialises the query projections
    d_kv**0.5 times smaller than the others instead. `T5.init` draws every projection alike
    (lecun normal: it only matters for training from scratch), which starts the attention
    saturated. Scale the queries down to HF's init: on a copy task (random 8-token strings,
    T5 3+3x192) the loss after 950 steps was 1.55 with it, 2.06 without."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    flat = {k: v * (cfg.d_kv ** -0.5) if len(k) >= 2 and k[-2] == "q" and k[-1] == "kernel" else v
            for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


class TextTasks:
    """An endless stream of the speech tasks in text form, `<what is said> <instruction>` -> answer,
    drawn from the corpus's *train* sentences (`corpus.sentence_families(...)[f]['train']`: many
    more than the corpus speaks; dev and test sentences are never among them).

    What it teaches the frozen T5 is to read its input: most of the stream is copying (the ASR
    instruction; template sentences and random word strings that cannot be memorised), then the
    lexical tasks (IC, SF, KWS, KWE, open questions, and IC / KWE in the joint format).
    `copy_stretched` repeats each spoken word 1-4 times in the input and asks for the plain
    sentence: audio frames are many per word, and the T5 should read such input too.
    `copy_labels` copies strings that mix the demo's answer words (`corpus.answer_words`: accents,
    speech / non-speech, yes / no...) into corpus words: the output row of a piece that is never a
    target only moves with every other such piece's, until they are one vector. The
    acoustic tasks (AC, SC, SNS) are left out: their text form carries no answer, and training on
    it would teach the T5 to ignore its input for those instructions.
    """

    WEIGHTS = {"copy": 0.3, "copy_random": 0.15, "copy_stretched": 0.1, "ic": 0.12, "sf": 0.1, "kws": 0.08,
               "kwe": 0.07, "open": 0.04, "joint": 0.04}

    def __init__(self, families: Dict[str, Dict[str, Sequence]], kws_vocab: Sequence[str],
                 ic_labels: Dict[str, str], weights: Dict[str, float] = None,
                 salad_words: Tuple[int, int] = (2, 12)):
        from speechverse_jax.demo import corpus

        self.held_out = {s.text for fam in families.values() for sp in ("dev", "test") for s in fam.get(sp, ())}

        self.asr = list(dict.fromkeys(families["asr"]["train"]))
        self.commands = list(dict.fromkeys(families["commands"]["train"]))
        self.open = list(dict.fromkeys(families["open"]["train"]))
        by_intent: Dict[str, list] = {}
        for s in self.commands:
            by_intent.setdefault(s.intent, []).append(s)
        self.by_intent = [by_intent[k] for k in sorted(by_intent)]
        self.kws_vocab = list(kws_vocab)
        self.words = sorted({w for fam in (self.asr, self.commands, self.open) for s in fam for w in s.text.split()})
        self.ic_labels = dict(ic_labels)
        self.weights = dict(weights or self.WEIGHTS)
        self.salad_words = (int(salad_words[0]), int(salad_words[1]))  # word-salad lengths, both ends included
        if not 1 <= self.salad_words[0] <= self.salad_words[1]:
            raise ValueError(f"TextTasks: salad_words must be (low, high) with 1 <= low <= high, got {salad_words}")
        self._kws_pick = corpus.kws_pick
        self.answer_words = corpus.answer_words()

    def _pick(self, items, rng):
        return items[int(rng.integers(len(items)))]

    def _instruction(self, task, row, rng, joint=False):
        from speechverse_jax.data import tasks

        return tasks.build_instruction(task, row, int(rng.integers(1 << 16)), joint=joint)

    def one(self, kind: str, rng: np.random.Generator) -> Tuple[str, str]:
        """One (input, target) pair of `kind`: the input is `<what is said> <instruction>`."""
        said, instruction, target = self.parts(kind, rng)
        return f"{said} {instruction}", target

    def parts(self, kind: str, rng: np.random.Generator) -> Tuple[str, str, str]:
        """One example of `kind` as (what is said, instruction, target): the decoder-only LM puts
        what is said where the audio goes in its chat prompt."""
        from speechverse_jax.data import tasks

        if kind in ("copy", "copy_random", "copy_shuffled", "copy_stretched"):
            if kind == "copy_random":  # word orders no template makes (never a held-out sentence)
                text = self._word_salad(rng)
            elif kind == "copy_shuffled":
                words = self._pick(self._pick((self.asr, self.commands, self.open), rng), rng).text.split()
                text = " ".join(words[int(i)] for i in rng.permutation(len(words)))
                if text in self.held_out:
                    text = self._word_salad(rng)
            else:
                fam = self._pick((self.asr, self.asr, self.commands, self.open), rng)
                text = self._pick(fam, rng).text
            said = text
            if kind == "copy_stretched":  # each word 1-4 times, as audio frames stretch a word
                said = " ".join(" ".join([w] * int(rng.integers(1, 5))) for w in text.split())
            return said, self._instruction("asr", {}, rng), text
        if kind == "copy_labels":  # the answer words (accents, speech / non-speech...) among corpus words
            words = [self._pick(self.answer_words, rng) for _ in range(int(rng.integers(1, 4)))]
            words += [self._pick(self.words, rng) for _ in range(int(rng.integers(1, 6)))]
            text = " ".join(words[int(i)] for i in rng.permutation(len(words)))
            return text, self._instruction("asr", {}, rng), text
        if kind in ("ic", "sf") or (kind == "joint" and rng.random() < 0.5):
            s = self._pick(self._pick(self.by_intent, rng), rng)
            if kind == "sf":
                return s.text, self._instruction("sf", {}, rng), tasks.format_slots(s.slots)
            row = {"labels": self.ic_labels}
            if kind == "joint":
                return (s.text, self._instruction("ic", row, rng, joint=True),
                        tasks.format_joint_target("ic", s.text, s.intent))
            return s.text, self._instruction("ic", row, rng), s.intent
        if kind == "kws_random":  # keyword spotting in a word salad: the answer is in the input alone
            text = self._word_salad(rng)
            present = text.split()
            if rng.random() < 0.5:
                keyword, answer = self._pick(present, rng), "yes"
            else:
                keyword, answer = self._pick([w for w in self.kws_vocab if w not in present], rng), "no"
            return text, self._instruction("kws", {"keyword": keyword}, rng), answer
        if kind in ("kws", "kwe", "joint"):
            s = self._pick(self.asr, rng)
            if kind == "kws":
                keyword, answer = self._kws_pick(s.text, self.kws_vocab, bool(rng.random() < 0.5), rng)
                return s.text, self._instruction("kws", {"keyword": keyword}, rng), answer
            keywords = tasks.format_keywords(s.keywords)
            if kind == "joint":
                return (s.text, self._instruction("kwe", {}, rng, joint=True),
                        tasks.format_joint_target("kwe", s.text, keywords))
            return s.text, self._instruction("kwe", {}, rng), keywords
        if kind == "open":
            s = self._pick(self.open, rng)
            return s.text, self._instruction("open", {}, rng), s.answer
        raise ValueError(f"TextTasks: unknown kind {kind!r}")

    def _word_salad(self, rng: np.random.Generator) -> str:
        while True:
            low, high = self.salad_words
            text = " ".join(self._pick(self.words, rng) for _ in range(int(rng.integers(low, high + 1))))
            if text not in self.held_out:
                return text

    def sample(self, rng: np.random.Generator, n: int) -> List[Tuple[str, str]]:
        """`n` (input, target) pairs of one kind, drawn by `weights`: one kind per batch keeps the
        padding short (a copy batch is about 32 tokens long, an IC batch with its label list about 100)."""
        return [(f"{said} {instruction}", target) for said, instruction, target in self.sample_parts(rng, n)]

    def sample_parts(self, rng: np.random.Generator, n: int) -> List[Tuple[str, str, str]]:
        """`n` (what is said, instruction, target) triples of one kind; the same draws as `sample`."""
        kinds = sorted(self.weights)
        p = np.asarray([self.weights[k] for k in kinds], float)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        return [self.parts(kind, rng) for _ in range(n)]
