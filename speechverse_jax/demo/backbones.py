"""Pretrain the demo's own backbones, in JAX, before they are frozen.

The paper's frozen split works because WavLM and Flan-T5 arrive pretrained. Nothing can be
downloaded here, so the demo pretrains tiny stand-ins on its own corpus:

- the speech encoder: a small WavLM (large-style: layer norm, pre-LN, 50 Hz frames) trained from
  scratch with CTC on characters of the training transcripts; the CTC head is dropped afterwards;
- the LLM: a small Flan-style T5 trained on an endless stream of text tasks made from the corpus's
  train sentences (`TextTasks`: `<what is said> <instruction>` -> answer, the paper's "GT -> LLM"
  setting), in phases (configs/demo.py `t5_phases`): copying alone first, then the task mix,
  still mostly copying under the ASR instruction. A T5 trained on the corpus's few thousand
  text pairs alone memorised frequent answers and ignored its input (copy WER 116% on dev text);
  the speech model built on such a T5 cannot learn anything from the audio.

Both are written in the Hugging Face layout (`convert/export.py`), then converted with
`speechverse-jax convert`, exactly like downloaded weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from speechverse_jax.data.tokenizer import TextEncoder
from speechverse_jax.models.speechverse import token_cross_entropy
from speechverse_jax.models.t5 import T5, T5Config, shift_right
from speechverse_jax.models.wavlm import WavLM, WavLMConfig, feature_lengths

CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # index 0 of the CTC output is the blank


def ctc_ids(text: str) -> List[int]:
    """Characters -> CTC label ids (1..len(alphabet)); other characters are dropped."""
    return [CTC_ALPHABET.index(c) + 1 for c in text.lower() if c in CTC_ALPHABET]


class WavLMForCTC(nn.Module):
    """WavLM + a linear character head (the head is discarded after pretraining)."""

    cfg: WavLMConfig

    @nn.compact
    def __call__(self, audio, audio_mask):
        out = WavLM(self.cfg, name="wavlm")(audio, audio_mask)
        logits = nn.Dense(len(CTC_ALPHABET) + 1, name="ctc_head")(out.last_hidden_state)
        return logits, out.frame_mask


def _adamw(lr: float, steps: int, warmup: int, clip: float = 1.0) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=0.01))


@dataclasses.dataclass
class PretrainReport:
    name: str
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    extra: Dict[str, float] = dataclasses.field(default_factory=dict)


def _run(loss_fn, params, batches: Callable[[int], Dict[str, np.ndarray]], steps: int, lr: float, warmup: int,
         name: str, progress: bool, log: Callable = print) -> Tuple[dict, PretrainReport]:
    from tqdm import tqdm

    tx = _adamw(lr, steps, warmup)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0, losses = time.time(), []
    rng = jax.random.PRNGKey(0)
    bar = tqdm(range(steps), desc=f"pretrain {name}", disable=not progress, dynamic_ncols=True)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, batches(i), jax.random.fold_in(rng, i))
        if i % 10 == 0 or i == steps - 1:
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"pretraining {name}: non-finite loss at step {i}")
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if not progress and i % max(steps // 10, 10) == 0:
                log(f"{name} step {i}/{steps}: loss {losses[-1]:.3f} ({time.time() - t0:.0f}s)")
    report = PretrainReport(name, steps, round(time.time() - t0, 1), losses[0], float(np.mean(losses[-3:])))
    log(f"pretrained {name}: {steps} steps in {report.seconds}s, loss {report.first_loss:.3f} -> {report.last_loss:.3f}")
    return params, report


# -- the speech encoder -------------------------------------------------------------------------

def pretrain_wavlm(cfg: WavLMConfig, clips: Sequence[np.ndarray], transcripts: Sequence[str], steps: int,
                   batch_size: int = 16, max_samples: int = 64000, lr: float = 2e-3, seed: int = 0,
                   dev: Tuple[Sequence[np.ndarray], Sequence[str]] = None, progress: bool = True, log: Callable = print) -> Tuple[dict, PretrainReport]:
    """CTC on characters from random init -> (params of `WavLM(cfg)`, report).

    Batches hold clips of similar length (three padded shapes: 26% less time a step than padding
    every clip to `max_samples`). `dev`: held-out (clips, transcripts) whose greedy-CTC character
    error rate goes into the report. (A second CTC head over the T5's sentencepiece pieces was
    tried, to make the last layer a linear read-out of the T5's tokens: even at weight 0.1 it
    slowed the characters down, dev CER 40% against 13% after 600 steps. A per-frame voice-identity
    head on the middle layer, weight 0.3, raised the linear-probe speaker-count accuracy from 70%
    to 82% but the dev CER from 12% to 34% after 800 steps; not kept either.)"""
    usable = [i for i, (c, t) in enumerate(zip(clips, transcripts)) if t and 0 < len(c) <= max_samples]
    if not usable:
        raise ValueError("pretrain_wavlm: no clip with a transcript fits max_samples")
    max_frames = int(feature_lengths(cfg, max_samples))
    chars = [ctc_ids(t) for t in transcripts]
    max_label = max(len(chars[i]) for i in usable)
    model = WavLMForCTC(cfg)
    rng = np.random.default_rng(seed)

    def labels_of(seqs, idx, width):
        labels = np.zeros((len(idx), width), np.int32)
        pad = np.ones((len(idx), width), np.float32)
        for r, j in enumerate(idx):
            labels[r, : len(seqs[j])], pad[r, : len(seqs[j])] = seqs[j], 0.0
        return labels, pad

    # clips grouped by length (a few padded shapes, each compiled once): a batch of 2-second
    # clips is not padded to `max_samples`
    edges = [e for e in (max_samples // 2, (3 * max_samples) // 4) if e < max_samples] + [max_samples]
    groups = [[i for i in usable if lo < len(clips[i]) <= hi] for lo, hi in zip([0] + edges[:-1], edges)]
    groups, edges = zip(*[(g, e) for g, e in zip(groups, edges) if g])
    share = np.asarray([len(g) for g in groups], float) / len(usable)

    def batches(i):
        k = int(rng.choice(len(groups), p=share))
        idx = rng.choice(groups[k], batch_size, replace=len(groups[k]) < batch_size)
        audio = np.zeros((batch_size, edges[k]), np.float32)
        mask = np.zeros_like(audio, bool)
        for r, j in enumerate(idx):
            audio[r, : len(clips[j])], mask[r, : len(clips[j])] = clips[j], True
        batch = {"audio": audio, "audio_mask": mask}
        batch["labels"], batch["label_paddings"] = labels_of(chars, idx, max_label)
        return batch

    def loss_fn(params, batch, rng):
        logits, frame_mask = model.apply({"params": params}, batch["audio"], batch["audio_mask"])
        per_seq = optax.ctc_loss(logits.astype(jnp.float32), 1.0 - frame_mask.astype(jnp.float32),
                                 batch["labels"], batch["label_paddings"])
        n_labels = jnp.maximum((1.0 - batch["label_paddings"]).sum(-1), 1.0)
        return jnp.mean(per_seq / n_labels)

    sample = batches(0)
    params = model.init(jax.random.PRNGKey(seed), sample["audio"][:1], sample["audio_mask"][:1])["params"]
    params = nn.unbox(params)
    log(f"WavLM pretraining: {len(usable)} clips, frames <= {max_frames}, {steps} steps of {batch_size}")
    params, report = _run(loss_fn, params, batches, steps, lr, steps // 10, "wavlm (ctc)", progress, log)
    if dev is not None:
        report.extra["dev_cer"] = ctc_cer(model, params, dev[0], dev[1])
        log(f"WavLM greedy CTC on held-out clips: {report.extra}")
    return params["wavlm"], report


def _collapse(best: np.ndarray) -> List[int]:
    """Greedy CTC: merge repeats, drop blanks (id 0)."""
    out, prev = [], 0
    for t in best:
        if t != prev and t != 0:
            out.append(int(t))
        prev = t
    return out


def ctc_cer(model: WavLMForCTC, params: dict, clips: Sequence[np.ndarray], transcripts: Sequence[str],
            batch_size: int = 16) -> float:
    """Character error rate (%) of greedy CTC decoding on held-out clips."""
    import jiwer

    apply = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m))
    hyps = []
    for start in range(0, len(clips), batch_size):
        part = clips[start:start + batch_size]
        width = int(np.ceil(max(map(len, part)) / 16000)) * 16000  # whole seconds: few shapes
        audio = np.zeros((batch_size, width), np.float32)
        mask = np.zeros_like(audio, bool)
        for r, c in enumerate(part):
            audio[r, : len(c)], mask[r, : len(c)] = c, True
        logits, frame_mask = apply(params, audio, mask)
        best, lens = np.asarray(jnp.argmax(logits, -1)), np.asarray(frame_mask.sum(-1))
        hyps += ["".join(CTC_ALPHABET[t - 1] for t in _collapse(best[r, : lens[r]])) for r in range(len(part))]
    refs = ["".join(CTC_ALPHABET[i - 1] for i in ctc_ids(t)) or " " for t in transcripts]
    return round(100 * float(jiwer.cer(refs, hyps)), 2)


# -- the LLM ------------------------------------------------------------------------------------

def pretrain_t5(cfg: T5Config, pairs, tokenizer, steps: int, batch_size: int = 32,
                max_input: int = 192, max_target: int = 48, lr: float = 3e-3, warmup: int = 0,
                seed: int = 0, progress: bool = True, log: Callable = print,
                init_params: dict = None) -> Tuple[dict, PretrainReport]:
    """Text-to-text training of a fresh T5 -> (params of `T5(cfg)`, report).

    `pairs`: a list of (input, target) texts drawn uniformly, or a callable
    `pairs(rng, n) -> [(input, target)] * n` (an endless stream, e.g. `TextTasks.sample`). Inputs
    and targets are padded to multiples of 16 per batch (a few shapes, each compiled once).
    Dropout follows `cfg.dropout_rate` (the demo uses 0: the stream never repeats).
    """
    eos = cfg.eos_token_id
    rng = np.random.default_rng(seed)
    model = T5(cfg)
    if callable(pairs):
        draw = pairs
        n_pairs = "a stream of"
    else:
        pairs = list(pairs)
        n_pairs = str(len(pairs))

        def draw(r, n):
            return [pairs[j] for j in r.choice(len(pairs), n, replace=len(pairs) < n)]

    text_encoder = TextEncoder(tokenizer=tokenizer)

    def encode(text, limit):
        ids = text_encoder.encode([text])[0][:limit]
        return ids if ids and ids[-1] == eos else ids[: limit - 1] + [eos]

    def pad_to(n, limit):
        return min(limit, int(np.ceil(n / 16) * 16))

    def batches(i):
        batch = draw(rng, batch_size)
        enc = [encode(x, max_input) for x, _ in batch]
        dec = [encode(t, max_target) for _, t in batch]
        ids = np.zeros((batch_size, pad_to(max(map(len, enc)), max_input)), np.int32)
        tgt = np.zeros((batch_size, pad_to(max(map(len, dec)), max_target)), np.int32)
        for r, (e, d) in enumerate(zip(enc, dec)):
            ids[r, : len(e)] = e
            tgt[r, : len(d)] = d
        return {"input_ids": ids, "input_mask": ids != 0, "targets": tgt, "target_mask": tgt != 0}

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                             decoder_input_ids=shift_right(batch["targets"], cfg.decoder_start_token_id,
                                                           cfg.pad_token_id),
                             decoder_mask=batch["target_mask"], deterministic=cfg.dropout_rate == 0,
                             rngs={"dropout": rng})
        return token_cross_entropy(logits, batch["targets"], batch["target_mask"])[0]

    sample = batches(0)
    if init_params is None:
        init_params = _t5_query_scale(nn.unbox(model.init(
            jax.random.PRNGKey(seed), input_ids=sample["input_ids"][:1],
            decoder_input_ids=sample["targets"][:1])["params"]), cfg)
    params = init_params
    log(f"T5 pretraining: {n_pairs} text pairs, {steps} steps of {batch_size}")
    return _run(loss_fn, params, batches, steps, lr, warmup or steps // 10, "t5 (text tasks)", progress, log)


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
    sentence: audio frames are many per word, and the T5 should read such input too. The
    acoustic tasks (AC, SC, SNS) are left out: their text form carries no answer, and training on
    it would teach the T5 to ignore its input for those instructions.
    """

    WEIGHTS = {"copy": 0.3, "copy_random": 0.15, "copy_stretched": 0.1, "ic": 0.12, "sf": 0.1, "kws": 0.08,
               "kwe": 0.07, "open": 0.04, "joint": 0.04}

    def __init__(self, families: Dict[str, Dict[str, Sequence]], kws_vocab: Sequence[str],
                 ic_labels: Dict[str, str], weights: Dict[str, float] = None):
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
        self._kws_pick = corpus.kws_pick

    def _pick(self, items, rng):
        return items[int(rng.integers(len(items)))]

    def _instruction(self, task, row, rng, joint=False):
        from speechverse_jax.data import tasks

        return tasks.build_instruction(task, row, int(rng.integers(1 << 16)), joint=joint)

    def one(self, kind: str, rng: np.random.Generator) -> Tuple[str, str]:
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
            return f"{said} {self._instruction('asr', {}, rng)}", text
        if kind in ("ic", "sf") or (kind == "joint" and rng.random() < 0.5):
            s = self._pick(self._pick(self.by_intent, rng), rng)
            if kind == "sf":
                return f"{s.text} {self._instruction('sf', {}, rng)}", tasks.format_slots(s.slots)
            row = {"labels": self.ic_labels}
            if kind == "joint":
                return (f"{s.text} {self._instruction('ic', row, rng, joint=True)}",
                        tasks.format_joint_target("ic", s.text, s.intent))
            return f"{s.text} {self._instruction('ic', row, rng)}", s.intent
        if kind == "kws_random":  # keyword spotting in a word salad: the answer is in the input alone
            text = self._word_salad(rng)
            present = text.split()
            if rng.random() < 0.5:
                keyword, answer = self._pick(present, rng), "yes"
            else:
                keyword, answer = self._pick([w for w in self.kws_vocab if w not in present], rng), "no"
            return f"{text} {self._instruction('kws', {'keyword': keyword}, rng)}", answer
        if kind in ("kws", "kwe", "joint"):
            s = self._pick(self.asr, rng)
            if kind == "kws":
                keyword, answer = self._kws_pick(s.text, self.kws_vocab, bool(rng.random() < 0.5), rng)
                return f"{s.text} {self._instruction('kws', {'keyword': keyword}, rng)}", answer
            keywords = tasks.format_keywords(s.keywords)
            if kind == "joint":
                return (f"{s.text} {self._instruction('kwe', {}, rng, joint=True)}",
                        tasks.format_joint_target("kwe", s.text, keywords))
            return f"{s.text} {self._instruction('kwe', {}, rng)}", keywords
        if kind == "open":
            s = self._pick(self.open, rng)
            return f"{s.text} {self._instruction('open', {}, rng)}", s.answer
        raise ValueError(f"TextTasks: unknown kind {kind!r}")

    def _word_salad(self, rng: np.random.Generator) -> str:
        while True:
            text = " ".join(self._pick(self.words, rng) for _ in range(int(rng.integers(2, 13))))
            if text not in self.held_out:
                return text

    def sample(self, rng: np.random.Generator, n: int) -> List[Tuple[str, str]]:
        """`n` pairs of one kind, drawn by `weights`: one kind per batch keeps the padding short
        (a copy batch is about 32 tokens long, an IC batch with its label list about 100)."""
        kinds = sorted(self.weights)
        p = np.asarray([self.weights[k] for k in kinds], float)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        return [self.one(kind, rng) for _ in range(n)]
