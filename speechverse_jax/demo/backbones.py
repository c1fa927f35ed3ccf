"""Pretrain the demo's own backbones, in JAX, before they are frozen.

The paper's frozen split works because WavLM and Flan-T5 arrive pretrained. Nothing can be
downloaded here, so the demo pretrains tiny stand-ins on its own corpus:

- the speech encoder: a small WavLM (large-style: layer norm, pre-LN, 50 Hz frames) trained from
  scratch with CTC on characters of the training transcripts; the CTC head is dropped afterwards;
- the LLM: a small Flan-style T5 trained on the *text* form of the training tasks
  (`<transcript> <instruction>` -> answer, the paper's "GT -> LLM" setting), so it knows the
  vocabulary, the instructions and the answer formats.

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
                   progress: bool = True, log: Callable = print) -> Tuple[dict, PretrainReport]:
    """CTC on characters from random init -> (params of `WavLM(cfg)`, report)."""
    usable = [i for i, (c, t) in enumerate(zip(clips, transcripts)) if t and 0 < len(c) <= max_samples]
    if not usable:
        raise ValueError("pretrain_wavlm: no clip with a transcript fits max_samples")
    max_frames = int(feature_lengths(cfg, max_samples))
    max_label = max(len(ctc_ids(transcripts[i])) for i in usable)
    model = WavLMForCTC(cfg)
    rng = np.random.default_rng(seed)

    def batches(i):
        idx = rng.choice(usable, batch_size, replace=len(usable) < batch_size)
        audio = np.zeros((batch_size, max_samples), np.float32)
        mask = np.zeros_like(audio, bool)
        labels = np.zeros((batch_size, max_label), np.int32)
        label_pad = np.ones((batch_size, max_label), np.float32)
        for r, j in enumerate(idx):
            c = clips[j]
            audio[r, : len(c)], mask[r, : len(c)] = c, True
            ids = ctc_ids(transcripts[j])
            labels[r, : len(ids)], label_pad[r, : len(ids)] = ids, 0.0
        return {"audio": audio, "audio_mask": mask, "labels": labels, "label_paddings": label_pad}

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
    report.extra["cer_greedy_train_sample"] = _ctc_cer(model, params, batches(10_000), transcripts)
    return params["wavlm"], report


def _ctc_cer(model, params, batch, _transcripts) -> float:
    """Character error rate of greedy CTC decoding on one batch (a sanity figure for the log)."""
    import jiwer

    logits, frame_mask = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m))(
        params, batch["audio"], batch["audio_mask"])
    best = np.asarray(jnp.argmax(logits, -1))
    lens = np.asarray(frame_mask.sum(-1))
    hyps, refs = [], []
    for r in range(best.shape[0]):
        seq, prev = [], 0
        for t in best[r, : lens[r]]:
            if t != prev and t != 0:
                seq.append(CTC_ALPHABET[t - 1])
            prev = t
        ids = batch["labels"][r][batch["label_paddings"][r] == 0]
        refs.append("".join(CTC_ALPHABET[i - 1] for i in ids) or " ")
        hyps.append("".join(seq))
    return float(jiwer.cer(refs, hyps))


# -- the LLM ------------------------------------------------------------------------------------

def pretrain_t5(cfg: T5Config, pairs: Sequence[Tuple[str, str]], tokenizer, steps: int, batch_size: int = 32,
                max_input: int = 64, max_target: int = 32, lr: float = 3e-3, seed: int = 0,
                progress: bool = True, log: Callable = print) -> Tuple[dict, PretrainReport]:
    """Text-to-text training of a fresh T5 on (input, target) pairs -> (params of `T5(cfg)`, report)."""
    eos = cfg.eos_token_id
    enc = [tokenizer(s).input_ids[:max_input] for s, _ in pairs]
    dec = [tokenizer(t).input_ids[: max_target - 1] for _, t in pairs]
    dec = [d if d and d[-1] == eos else d + [eos] for d in dec]
    rng = np.random.default_rng(seed)
    model = T5(cfg)

    def batches(i):
        idx = rng.choice(len(pairs), batch_size, replace=len(pairs) < batch_size)
        ids = np.zeros((batch_size, max_input), np.int32)
        tgt = np.zeros((batch_size, max_target), np.int32)
        for r, j in enumerate(idx):
            ids[r, : len(enc[j])] = enc[j]
            tgt[r, : len(dec[j])] = dec[j]
        return {"input_ids": ids, "input_mask": ids != 0, "targets": tgt, "target_mask": tgt != 0}

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                             decoder_input_ids=shift_right(batch["targets"], cfg.decoder_start_token_id,
                                                           cfg.pad_token_id),
                             decoder_mask=batch["target_mask"], deterministic=False, rngs={"dropout": rng})
        return token_cross_entropy(logits, batch["targets"], batch["target_mask"])[0]

    sample = batches(0)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), input_ids=sample["input_ids"][:1],
                                 decoder_input_ids=sample["targets"][:1])["params"])
    log(f"T5 pretraining: {len(pairs)} text pairs, {steps} steps of {batch_size}")
    return _run(loss_fn, params, batches, steps, lr, steps // 10, "t5 (text tasks)", progress, log)


def text_pairs(rows: Sequence[dict], instruction_for: Callable[[dict, int], str]) -> List[Tuple[str, str]]:
    """The text form of the speech tasks: `<what is said> <instruction>` -> target.

    The transcript stands where the audio frames will stand (first), the instruction follows, as in
    the speech model's input. Rows without a transcript (non-speech clips) have nothing to read.
    """
    pairs = []
    for i, row in enumerate(rows):
        transcript = row.get("transcript") or ""
        if not transcript:
            continue
        pairs.append((f"{transcript} {instruction_for(row, i)}", row["target"]))
    return pairs
