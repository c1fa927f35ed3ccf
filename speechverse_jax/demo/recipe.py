"""`speechverse-jax demo-backbones`: the recipe that makes the demo's pretrained WavLM and LLMs once.

Real users download WavLM and Flan-T5 (or Llama / Qwen / Gemma); the demo ships its own tiny
stand-ins, made by this recipe (config: speechverse_jax/configs/demo_backbones.py) and released with
the package like downloaded weights (demo/shipped.py checks and converts them):

    1. tokenizer   a T5-style sentencepiece model over the train sentences, labels and prompts; a
                   BPE tokenizer with a chat template over the same texts for the decoder-only LM
    2. wavlm       from scratch on espeak-ng speech made on the fly (demo/speech_stream.py): CTC on
                   characters (what is said) + utterance-level accent and voice-count heads (who speaks)
    3. t5          from scratch on an endless stream of text tasks (demo/text_tasks.py TextTasks):
                   copying first, then the task mix, over train sentences and random word orders
    4. lm          a Llama-style decoder-only LM on the same stream, what is said in its chat prompt
                   where the audio goes, loss on the answer only (the demo's decoder-only layout)
    5. gates       on held-out dev data: greedy CTC CER, linear probes (accent, one vs two voices,
                   speech vs non-speech), each LLM alone on dev text (copy WER, IC, SF, KWS, KWE)
    6. release     HF-layout folders (WavLM without its heads, T5 + tokenizer, LM + tokenizer),
                   converted once with --verify, and MANIFEST.json (checksums, recipe, commit, wall
                   time, machine, gates)

Every training part checkpoints with orbax into `out/<part>/`; batch `i` is a pure function of
(seed, i), so a run killed and started again ends with the same weights as an uninterrupted one.
Logs: `out/<part>/metrics.jsonl` and TensorBoard; progress bars; `out/report.json` at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from speechverse_jax.data.batching import bucket_length
from speechverse_jax.errors import UserError
from speechverse_jax.models.wavlm import WavLM, WavLMConfig, feature_lengths


def _say(msg: str) -> None:
    print(f"[demo-backbones] {msg}", flush=True)


class GateError(UserError):
    """Backbones below a quality gate of the recipe."""


# -- the training loop every part shares ---------------------------------------------------------

def _seed_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]))


def _schedule(phases: Sequence[Tuple], lr: float) -> optax.Schedule:
    """Warm-up + cosine decay per phase ((steps, warmup) or (steps, warmup, peak lr) each; the peak
    defaults to `lr`), joined into one schedule. Appending a phase leaves the earlier steps' rates
    as they were, so a run can be continued from a finished one."""
    parts, bounds, total = [], [], 0
    for steps, warmup, *peak in phases:
        top = float(peak[0]) if peak else lr
        parts.append(optax.warmup_cosine_decay_schedule(0.0, top, max(warmup, 1), max(steps, warmup + 1), top * 0.05))
        total += steps
        bounds.append(total)
    return optax.join_schedules(parts, bounds[:-1]) if len(parts) > 1 else parts[0]


def train_part(name: str, workdir: str, loss_fn: Callable, params: dict, batch_at: Callable[[int], dict],
               steps: int, schedule: optax.Schedule, checkpoint_every: int, progress: bool = True,
               log_every: int = 25, prefetch: int = 2, adam_b2: float = 0.999) -> Tuple[dict, Dict[str, Any]]:
    """Adam-W (clipped at global norm 1) from `params` for `steps` steps, resuming from `workdir`'s
    newest checkpoint.

    `loss_fn(params, batch, rng) -> (loss, aux dict)`; `batch_at(i)`: batch of step `i` (made
    ahead on `prefetch` threads). Returns (params, {steps, seconds, first/last loss}).
    """
    import concurrent.futures

    from tqdm import tqdm

    from speechverse_jax.train.checkpoint import Checkpointer
    from speechverse_jax.train.metrics_log import MetricsWriter

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=adam_b2, weight_decay=0.01))
    state = {"params": params, "opt_state": tx.init(params)}
    ckpt = Checkpointer(workdir, keep=2, async_save=False)
    start, seconds_before = 0, 0.0
    if ckpt.latest_step() is not None:
        state, _, meta = ckpt.restore(state)
        start, seconds_before = int(meta["step"]), float(meta.get("seconds", 0.0))
        _say(f"{name}: resuming at step {start}/{steps} from {workdir}")
    metrics = MetricsWriter(workdir)

    @jax.jit
    def step_fn(state, batch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss, aux

    t0 = time.time()
    bar = tqdm(total=steps, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(prefetch, 1))
    ahead = {i: pool.submit(batch_at, i) for i in range(start, min(start + prefetch, steps))}
    try:
        for i in range(start, steps):
            batch = ahead.pop(i).result()
            if i + prefetch < steps:
                ahead[i + prefetch] = pool.submit(batch_at, i + prefetch)
            state, loss, aux = step_fn(state, batch, jax.random.PRNGKey(i))
            if i % log_every == 0 or i == steps - 1:
                loss = float(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{name}: non-finite loss at step {i}; the last checkpoint is in "
                                             f"{workdir}")
                values = {"loss": loss, "lr": float(schedule(i)), "seconds": round(seconds_before + time.time() - t0, 1),
                          **{k: float(v) for k, v in aux.items()}}
                metrics.write(i, "train", values)
                bar.set_postfix(loss=f"{loss:.3f}")
                if not progress and i % (log_every * 10) == 0:
                    _say(f"{name} step {i}/{steps}: loss {loss:.3f} ({time.time() - t0:.0f}s)")
            bar.update(1)
            if (i + 1) % checkpoint_every == 0 or i + 1 == steps:
                seconds = seconds_before + time.time() - t0
                ckpt.save(i + 1, state, {}, {"step": i + 1, "seconds": round(seconds, 1), "part": name})
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        ckpt.close()
        metrics.close()
    seconds = round(seconds_before + time.time() - t0, 1)
    from speechverse_jax.train.metrics_log import read_metrics

    losses = [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")]  # every session's
    return state["params"], {"steps": steps, "seconds": seconds, "first_loss": losses[0] if losses else None,
                             "last_loss": float(np.mean(losses[-4:])) if losses else None}


# -- the speech encoder ----------------------------------------------------------------------------

CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # CTC output 0 is the blank


def ctc_ids(text: str) -> List[int]:
    return [CTC_ALPHABET.index(c) + 1 for c in text.lower() if c in CTC_ALPHABET]


def ctc_collapse(best: np.ndarray) -> str:
    """Greedy CTC path -> text: merge repeats, drop blanks."""
    out, prev = [], 0
    for t in best:
        if t != prev and t != 0:
            out.append(CTC_ALPHABET[int(t) - 1])
        prev = t
    return "".join(out)


def ctc_cer(hyps: Sequence[str], transcripts: Sequence[str]) -> float:
    """Character error rate (%) of greedy CTC outputs against transcripts reduced to the CTC alphabet
    (lower case, other characters dropped)."""
    import jiwer

    refs = ["".join(CTC_ALPHABET[i - 1] for i in ctc_ids(t)) or " " for t in transcripts]
    return round(100 * float(jiwer.cer(refs, [h or "" for h in hyps])), 2)


def masked_mean_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    """[batch, frames, dim] (+ [batch, frames] mask) -> [batch, 2 * dim]: mean and std over real frames."""
    m = mask[..., None].astype(x.dtype)
    n = jnp.maximum(m.sum(1), 1.0)
    mean = (x * m).sum(1) / n
    var = (((x - mean[:, None]) ** 2) * m).sum(1) / n
    return jnp.concatenate([mean, jnp.sqrt(var + 1e-6)], -1)


class WavLMPretrainer(nn.Module):
    """WavLM + a character CTC head on the last layer + accent and voice-count heads on the pooled
    states of layer `aux_layer`. Only the `wavlm` subtree is released."""

    cfg: WavLMConfig
    num_accents: int
    aux_layer: int

    @nn.compact
    def __call__(self, audio, audio_mask):
        out = WavLM(self.cfg, name="wavlm")(audio, audio_mask)
        ctc = nn.Dense(len(CTC_ALPHABET) + 1, name="ctc_head")(out.last_hidden_state)
        pooled = masked_mean_std(out.hidden_states[self.aux_layer], out.frame_mask)
        accent = nn.Dense(self.num_accents, name="accent_head")(pooled)
        voices = nn.Dense(3, name="voices_head")(pooled)
        return ctc, accent, voices, out.frame_mask


def _masked_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over rows whose label is >= 0."""
    keep = (labels >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
    return (ce * keep).sum() / jnp.maximum(keep.sum(), 1.0)


LABELS_PER_SECOND = 30  # CTC label width per second of padded audio (50 frames a second)


def ctc_feasible(ids: Sequence[int], frames: int) -> bool:
    """Can CTC align `ids` to `frames` frames (a blank between repeated characters)?"""
    repeats = sum(1 for a, b in zip(ids, ids[1:]) if a == b)
    return len(ids) + repeats <= frames


def wavlm_batches(stream, cfg: WavLMConfig, batch_size: int, edges: Sequence[int], seed: int) -> Callable[[int], dict]:
    """batch_at(i) for the speech stream: block i // k is made once, sorted by length into k batches."""
    import threading

    per_block = int(stream.data["block_size"]) // batch_size
    cache: Dict[int, Any] = {}
    lock = threading.Lock()

    def block(j):
        with lock:
            if j not in cache:
                cache[j] = (threading.Event(), None)
                owner = True
            else:
                owner = False
            event = cache[j][0]
        if owner:
            from speechverse_jax.demo.speech_stream import batches_of_block

            try:
                clips = stream.block(j)
                made = (clips, batches_of_block(clips, batch_size, edges, _seed_rng(seed, 0xB10C, j)))
            except Exception as e:  # noqa: BLE001 - handed to every thread waiting for this block
                made = e
            with lock:
                cache[j] = (event, made)
                for old in [k for k in cache if k < j - 2]:
                    del cache[old]
            event.set()
        event.wait()
        made = cache[j][1]
        if isinstance(made, Exception):
            raise made
        return made

    def batch_at(i):
        from speechverse_jax.demo.speech_stream import pad_edge

        clips, groups = block(i // per_block)
        idx = groups[i % per_block]
        width = pad_edge(max(clips[k].audio.size for k in idx), edges)
        max_label = int(np.ceil(width / 16000 * LABELS_PER_SECOND / 16) * 16)  # one label width per audio width
        audio = np.zeros((batch_size, width), np.float32)
        mask = np.zeros((batch_size, width), bool)
        lab = np.zeros((batch_size, max_label), np.int32)
        lab_pad = np.ones((batch_size, max_label), np.float32)
        for r, k in enumerate(idx):
            n = min(clips[k].audio.size, width)
            audio[r, :n], mask[r, :n] = clips[k].audio[:n], True
            ids = ctc_ids(clips[k].text)
            # a transcript CTC cannot align (too many characters for the frames) would give the loss a
            # floor of 1e5: the clip still trains the voice heads, its CTC row is left empty
            if ctc_feasible(ids, int(feature_lengths(cfg, n))) and len(ids) <= max_label:
                lab[r, : len(ids)], lab_pad[r, : len(ids)] = ids, 0.0
            elif clips[k].text:
                lab_pad[r, 0] = 2.0  # marks "no CTC target" (see the loss)
        return {"audio": audio, "audio_mask": mask, "labels": lab, "label_paddings": lab_pad,
                "accent": np.asarray([clips[k].accent for k in idx], np.int32),
                "voices": np.asarray([clips[k].voices for k in idx], np.int32)}

    return batch_at


def pretrain_wavlm(config, families, workdir: str, progress: bool = True) -> Tuple[dict, WavLMConfig, Dict]:
    """-> (params of `WavLMPretrainer` incl. heads, WavLMConfig, report)."""
    from speechverse_jax.demo.speech_stream import SpeechStream

    w = config.wavlm
    cfg = WavLMConfig.from_hf(w.model.to_dict())
    stream = SpeechStream(families, w.data.to_dict(), int(config.seed))
    model = WavLMPretrainer(cfg, len(w.data.accents), int(w.aux_layer))
    edges = [int(s * 16000) for s in w.data.length_edges_seconds]
    batch_at = wavlm_batches(stream, cfg, int(w.batch_size), edges, int(config.seed))
    sample = batch_at(0)
    params = nn.unbox(model.init(jax.random.PRNGKey(int(config.seed)), sample["audio"][:1],
                                 sample["audio_mask"][:1])["params"])

    def loss_fn(params, batch, rng):
        ctc_logits, accent, voices, frame_mask = model.apply({"params": params}, batch["audio"], batch["audio_mask"])
        skip = batch["label_paddings"][:, 0] > 1.5  # rows without a usable CTC target
        paddings = jnp.minimum(batch["label_paddings"], 1.0)
        per_seq = optax.ctc_loss(ctc_logits.astype(jnp.float32), 1.0 - frame_mask.astype(jnp.float32),
                                 batch["labels"], paddings)
        n_labels = jnp.maximum((1.0 - paddings).sum(-1), 1.0)
        keep = 1.0 - skip.astype(jnp.float32)
        ctc = jnp.sum(jnp.where(skip, 0.0, per_seq / n_labels)) / jnp.maximum(keep.sum(), 1.0)
        acc_loss, voice_loss = _masked_ce(accent, batch["accent"]), _masked_ce(voices, batch["voices"])
        total = ctc + float(w.accent_weight) * acc_loss + float(w.voices_weight) * voice_loss
        return total, {"ctc": ctc, "accent_ce": acc_loss, "voices_ce": voice_loss}

    phases = [(int(ph["steps"]), int(ph["warmup_steps"]), float(ph["lr"])) for ph in w.phases]
    steps = sum(ph[0] for ph in phases)
    schedule = _schedule(phases, float(w.phases[0]["lr"]))
    _say(f"wavlm: {sum(x.size for x in jax.tree_util.tree_leaves(params['wavlm'])) / 1e6:.2f}M params, "
         f"{steps} steps of {w.batch_size} clips made on the fly in {len(phases)} phase(s)")
    params, report = train_part("wavlm", workdir, loss_fn, params, batch_at, steps, schedule,
                                int(config.checkpoint_every), progress, adam_b2=float(w.adam_b2))
    return params, cfg, report


# -- the LLM ---------------------------------------------------------------------------------------

def build_tokenizer(config, families, out_dir: str):
    """The T5 tokenizer (sentencepiece) over the train sentences, answers and every prompt wording."""
    import transformers

    from speechverse_jax import hf_tiny
    from speechverse_jax.data.tokenizer import load_tokenizer

    if os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        return load_tokenizer(out_dir)
    texts = tokenizer_texts(families)
    spm = hf_tiny.train_spiece(texts, os.path.join(out_dir, "spm"), vocab_size=int(config.tokenizer.vocab_size),
                                    character_coverage=float(config.tokenizer.character_coverage))
    shutil.copy(spm, os.path.join(out_dir, "spiece.model"))
    tok = transformers.T5Tokenizer.from_pretrained(out_dir, extra_ids=0, legacy=False)
    tok.save_pretrained(out_dir)
    shutil.rmtree(os.path.join(out_dir, "spm"), ignore_errors=True)
    return load_tokenizer(out_dir)


def tokenizer_texts(families) -> List[str]:
    """Train sentences, every task's answers and label descriptions, and every prompt wording (seen
    and unseen: a general-purpose tokenizer covers the words of any instruction)."""
    from speechverse_jax.data import tasks
    from speechverse_jax.demo import corpus

    texts = [s.text for fam in families.values() for s in fam["train"]]
    texts += [s.answer for s in families["open"]["train"]]
    texts += [tasks.format_slots(s.slots) for s in families["commands"]["train"][:3000]]
    texts += [tasks.format_keywords(s.keywords) for s in families["asr"]["train"][:3000]]
    texts += list(corpus.IC_LABELS) + list(corpus.IC_LABELS.values()) + list(corpus.AC_LABELS.values())
    for task in corpus.DEMO_TASKS:
        row = {"labels": corpus.IC_LABELS if task == "ic" else corpus.AC_LABELS if task == "ac" else None,
               "keyword": "garden"}
        row = {k: v for k, v in row.items() if v is not None}
        for split in ("seen", "unseen"):
            for k in range(tasks.prompt_count(task) * 3):
                texts.append(tasks.build_instruction(task, row, k, split=split))
                if task in tasks.JOINT_TASKS_DEFAULT:
                    texts.append(tasks.build_instruction(task, row, k, joint=True, split=split))
    return texts


def _phase_streams(families, phases):
    """One `TextTasks` stream per phase and the phases' end steps: batch `i` comes from stream
    `searchsorted(bounds, i, 'right')` (the last one past the end)."""
    from speechverse_jax.demo.corpus import IC_LABELS, kws_vocabulary
    from speechverse_jax.demo.text_tasks import TextTasks

    streams = [TextTasks(families, kws_vocabulary(families), IC_LABELS, weights=dict(ph["tasks"]),
                         salad_words=tuple(ph["salad_words"])) for ph in phases]
    return streams, np.cumsum([int(ph["steps"]) for ph in phases])


def _train_phased(name: str, section, workdir: str, loss_fn: Callable, params: dict, batch_at: Callable,
                  config, progress: bool, what: str):
    """`train_part` over `section.phases` (one warm-up + cosine each, peak the phase's `lr` or `section.lr`)."""
    steps = int(sum(int(ph["steps"]) for ph in section.phases))
    schedule = _schedule([(int(ph["steps"]), int(ph["warmup_steps"]), float(ph.get("lr", section.lr)))
                          for ph in section.phases], float(section.lr))
    _say(f"{name}: {sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.2f}M params, {what}, "
         f"{steps} steps of {int(section.batch_size)} in {len(section.phases)} phases")
    return train_part(name, workdir, loss_fn, params, batch_at, steps, schedule, int(config.checkpoint_every),
                      progress, adam_b2=float(section.adam_b2))


def pretrain_t5(config, families, tokenizer, workdir: str, progress: bool = True):
    """-> (params of `T5(cfg)`, T5Config, report)."""
    from speechverse_jax.data.tokenizer import TextEncoder
    from speechverse_jax.demo.text_tasks import _t5_query_scale
    from speechverse_jax.models.speechverse import token_cross_entropy
    from speechverse_jax.models.t5 import T5, T5Config, shift_right

    t = config.t5
    vocab = int(np.ceil(len(tokenizer) / 64) * 64)
    cfg = T5Config.from_hf(dict(t.model.to_dict(), vocab_size=vocab, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, is_encoder_decoder=True))
    model = T5(cfg)
    streams, bounds = _phase_streams(families, t.phases)
    text_encoder = TextEncoder(tokenizer=tokenizer)
    eos, bs = cfg.eos_token_id, int(t.batch_size)
    max_in, max_out = int(t.max_input_tokens), int(t.max_target_tokens)

    def encode(text, limit):
        ids = text_encoder.encode([text])[0][:limit]
        return ids if ids and ids[-1] == eos else ids[: limit - 1] + [eos]

    def pad_to(n, limit):
        return min(limit, int(np.ceil(n / 16) * 16))

    def batch_at(i):
        phase = int(np.searchsorted(bounds, i, side="right"))
        pairs = streams[min(phase, len(streams) - 1)].sample(_seed_rng(int(config.seed), 0x7E57, i), bs)
        enc = [encode(x, max_in) for x, _ in pairs]
        dec = [encode(y, max_out) for _, y in pairs]
        ids = np.zeros((bs, pad_to(max(map(len, enc)), max_in)), np.int32)
        tgt = np.zeros((bs, pad_to(max(map(len, dec)), max_out)), np.int32)
        for r, (e, d) in enumerate(zip(enc, dec)):
            ids[r, : len(e)], tgt[r, : len(d)] = e, d
        return {"input_ids": ids, "targets": tgt}

    def loss_fn(params, batch, rng):
        tgt = batch["targets"]
        logits = model.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["input_ids"] != 0,
                             decoder_input_ids=shift_right(tgt, cfg.decoder_start_token_id, cfg.pad_token_id),
                             decoder_mask=tgt != 0, deterministic=True)
        loss = token_cross_entropy(logits, tgt, tgt != 0)[0]
        return loss, {}

    sample = batch_at(0)
    params = _t5_query_scale(nn.unbox(model.init(jax.random.PRNGKey(int(config.seed)), input_ids=sample["input_ids"][:1],
                                                 decoder_input_ids=sample["targets"][:1])["params"]), cfg)
    params, report = _train_phased("t5", t, workdir, loss_fn, params, batch_at, config, progress,
                                   f"vocab {vocab}, text pairs")
    return params, cfg, report


# -- the decoder-only LM ---------------------------------------------------------------------------

def build_lm_tokenizer(config, families, out_dir: str):
    """The decoder-only LM's own tokenizer: byte-level-free BPE over the same texts as the T5's, with
    pad / bos / eos and a small chat template (hf_tiny.TINY_CHAT_TEMPLATE) when `lm.tokenizer.chat_template`."""
    from speechverse_jax import hf_tiny
    from speechverse_jax.data.tokenizer import load_tokenizer

    if not os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        template = hf_tiny.TINY_CHAT_TEMPLATE if bool(config.lm.tokenizer.chat_template) else None
        hf_tiny.save_decoder_tokenizer(out_dir, tokenizer_texts(families), int(config.lm.tokenizer.vocab_size),
                                       chat_template=template)
    return load_tokenizer(out_dir)


def lm_config(config, tokenizer):
    """The `DecoderLMConfig` of `config.lm.model` for `tokenizer` (vocabulary rounded up to 64)."""
    from speechverse_jax.models.decoder_lm import DecoderLMConfig

    vocab = int(np.ceil(len(tokenizer) / 64) * 64)
    return DecoderLMConfig.from_hf(dict(config.lm.model.to_dict(), vocab_size=vocab,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


class LMPrompts:
    """Text examples in the decoder-only layout: `prefix | what is said | suffix` (the chat prompt of
    the instruction, split where the audio goes, `speechverse_decoder.prompt_parts`), then the answer
    and EOS. What is said is cut to `max_input` tokens, the answer to `max_target` (EOS kept)."""

    def __init__(self, tokenizer, max_input: int, max_target: int):
        self.tokenizer, self.max_input, self.max_target = tokenizer, int(max_input), int(max_target)
        self._parts: Dict[str, Tuple[List[int], List[int]]] = {}

    def prompt(self, said: str, instruction: str) -> List[int]:
        from speechverse_jax.models.speechverse_decoder import prompt_parts

        parts = self._parts.get(instruction)
        if parts is None:
            parts = prompt_parts(self.tokenizer, instruction)
            if len(self._parts) < 65536:
                self._parts[instruction] = parts
        said_ids = list(self.tokenizer(said, add_special_tokens=False)["input_ids"])[: self.max_input]
        return parts[0] + said_ids + parts[1]

    def answer(self, target: str) -> List[int]:
        from speechverse_jax.models.speechverse_decoder import answer_ids

        ids = answer_ids(self.tokenizer, target)
        return ids if len(ids) <= self.max_target else ids[: self.max_target - 1] + ids[-1:]


def pretrain_lm(config, families, tokenizer, workdir: str, progress: bool = True):
    """The decoder-only LM on the text tasks (the T5's phases), loss on the answer tokens only.
    -> (params of `DecoderLM(cfg)`, DecoderLMConfig, report)."""
    from speechverse_jax.models.decoder_lm import DecoderLM
    from speechverse_jax.models.speechverse import token_cross_entropy

    t = config.lm
    cfg = lm_config(config, tokenizer)
    model = DecoderLM(cfg)
    streams, bounds = _phase_streams(families, t.phases)
    prompts = LMPrompts(tokenizer, int(t.max_input_tokens), int(t.max_target_tokens))
    bs, pad = int(t.batch_size), int(cfg.pad_token_id or 0)

    def batch_at(i):
        phase = int(np.searchsorted(bounds, i, side="right"))
        triples = streams[min(phase, len(streams) - 1)].sample_parts(_seed_rng(int(config.seed), 0x7E57, i), bs)
        rows = [(prompts.prompt(said, instruction), prompts.answer(target)) for said, instruction, target in triples]
        length = int(np.ceil(max(len(p) + len(a) for p, a in rows) / 16) * 16)
        ids = np.full((bs, length), pad, np.int32)
        mask = np.zeros((bs, length), bool)
        answer = np.zeros((bs, length), bool)
        for r, (p, a) in enumerate(rows):
            ids[r, : len(p) + len(a)] = p + a
            mask[r, : len(p) + len(a)] = True
            answer[r, len(p): len(p) + len(a)] = True
        return {"ids": ids, "mask": mask, "answer": answer}

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, input_ids=batch["ids"], attention_mask=batch["mask"]).logits
        # position j predicts token j + 1: the loss is on the answer tokens (EOS included)
        loss = token_cross_entropy(logits[:, :-1], batch["ids"][:, 1:], batch["answer"][:, 1:])[0]
        return loss, {}

    sample = batch_at(0)
    params = nn.unbox(model.init(jax.random.PRNGKey(int(config.seed)), input_ids=sample["ids"][:1],
                                 attention_mask=sample["mask"][:1])["params"])
    params, report = _train_phased("lm", t, workdir, loss_fn, params, batch_at, config, progress,
                                   f"vocab {cfg.vocab_size}, chat-prompt examples")
    return params, cfg, report


# -- the gates -------------------------------------------------------------------------------------

def _render_rows(rows_specs, progress: bool, desc: str, workers: int = 2):
    """[(row, spec)] -> [(row, audio)], rendered on `workers` threads (espeak-ng runs as a subprocess)."""
    import concurrent.futures

    from tqdm import tqdm

    from speechverse_jax.demo import speak

    rows_specs = list(rows_specs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        audio = list(tqdm(pool.map(lambda rs: speak.render(rs[1]), rows_specs), total=len(rows_specs), desc=desc,
                          disable=not progress, leave=False))
    return [(row, a) for (row, _), a in zip(rows_specs, audio)]


def _planned(task: str, split: str, n: int, families, seed: int):
    """`n` (row, spec) pairs of a corpus task drawn from `split`'s sentences (the corpus's planning)."""
    from speechverse_jax.data.prepare.common import rng_for
    from speechverse_jax.demo import corpus

    pools = {name: corpus.Pool(fam[split]) for name, fam in families.items()}
    return corpus.plan_task(task, split, n, pools, corpus.kws_vocabulary(families),
                            rng_for(seed, f"gates/{split}/{task}"))


def _encode_all(model: WavLMPretrainer, params: dict, clips: Sequence[np.ndarray], batch_size: int = 16):
    """-> (greedy CTC texts, [n, layers + 1, 2 * hidden] pooled mean/std per layer)."""
    @jax.jit
    def run(params, audio, mask):
        out = WavLM(model.cfg).apply({"params": params["wavlm"]}, audio, mask)
        ctc = nn.Dense(len(CTC_ALPHABET) + 1).apply({"params": params["ctc_head"]}, out.last_hidden_state)
        pooled = jnp.stack([masked_mean_std(h, out.frame_mask) for h in out.hidden_states], 1)
        return jnp.argmax(ctc, -1), out.frame_mask.sum(-1), pooled

    texts, feats = [], []
    for start in range(0, len(clips), batch_size):
        part = clips[start:start + batch_size]
        width = int(np.ceil(max(map(len, part)) / 32000)) * 32000  # 2-second steps: few shapes to compile
        audio = np.zeros((batch_size, width), np.float32)
        mask = np.zeros_like(audio, bool)
        for r, c in enumerate(part):
            audio[r, : len(c)], mask[r, : len(c)] = c, True
        best, lens, pooled = jax.device_get(run(params, audio, mask))
        texts += [ctc_collapse(best[r, : lens[r]]) for r in range(len(part))]
        feats.append(pooled[: len(part)])
    return texts, np.concatenate(feats)


def _probe(train_x, train_y, test_x, test_y) -> Tuple[float, int]:
    """Best-layer accuracy (%) of a logistic-regression probe, its L2 strength picked by 3-fold
    cross-validation on the train clips (800 clips against 2 x hidden features: an unregularised
    probe overfits); -> (accuracy, layer)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = (0.0, -1)
    folds = int(min(3, np.min(np.unique(np.asarray(train_y), return_counts=True)[1])))
    for layer in range(train_x.shape[1]):
        # a class with a single train clip (tiny test runs) leaves no folds to cross-validate over
        probe = (LogisticRegressionCV(Cs=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0], cv=folds, max_iter=3000) if folds >= 2
                 else LogisticRegression(C=0.1, max_iter=3000))
        clf = make_pipeline(StandardScaler(), probe)
        with warnings.catch_warnings():  # scikit-learn 1.8 announces default changes on every fit (one per layer)
            warnings.simplefilter("ignore", FutureWarning)
            clf.fit(train_x[:, layer], train_y)
        acc = 100.0 * float(np.mean(clf.predict(test_x[:, layer]) == np.asarray(test_y)))
        best = max(best, (round(acc, 2), layer))
    return best


def encoder_gates(config, families, model: WavLMPretrainer, params: dict, progress: bool = True) -> Dict[str, Any]:
    """Greedy CTC CER on held-out dev clips (corpus voices, and voices beyond them), and linear
    probes trained on train-sentence clips, scored on dev-sentence clips."""
    from speechverse_jax.demo.speech_stream import SpeechStream

    g, seed = config.gates, int(config.seed)
    out: Dict[str, Any] = {}
    dev = _render_rows(_planned("asr", "dev", int(g.eval_clips), families, seed), progress, "dev clips")
    hyps, _ = _encode_all(model, params, [a for _, a in dev])
    out["encoder_dev_cer"] = ctc_cer(hyps, [r["transcript"] for r, _ in dev])
    # voices, speeds and pitches beyond the corpus's ranges, on the same dev sentences (reported only)
    wide = SpeechStream({k: {"train": f["dev"], "dev": [], "test": []} for k, f in families.items()},
                        dict(config.wavlm.data.to_dict(), kinds={"sentence": 1.0}, noise_prob=0.0), seed + 1)
    rng = _seed_rng(seed, 0xD1DE)
    wide_clips = [wide.render(wide.spec(rng)) for _ in range(int(g.eval_clips))]
    hyps, _ = _encode_all(model, params, [c.audio for c in wide_clips])
    out["encoder_dev_cer_wide_voices"] = ctc_cer(hyps, [c.text for c in wide_clips])
    out["examples"] = [{"ref": c.text, "hyp": h} for c, h in list(zip(wide_clips, hyps))[:3]]
    for gate, task in (("probe_accent", "ac"), ("probe_voices", "sc"), ("probe_speech", "sns")):
        train = _render_rows(_planned(task, "train", int(g.probe_train_clips), families, seed), progress, f"{task} train")
        test = _render_rows(_planned(task, "dev", int(g.eval_clips), families, seed), progress, f"{task} dev")
        _, train_x = _encode_all(model, params, [a for _, a in train])
        _, test_x = _encode_all(model, params, [a for _, a in test])
        acc, layer = _probe(train_x, [r["target"] for r, _ in train], test_x, [r["target"] for r, _ in test])
        out[gate], out[f"{gate}_layer"] = acc, layer
    return out


def _text_cases(config, families) -> List[Tuple[str, str, List[dict]]]:
    """The LLM gates' held-out dev rows: [(measure, task, rows)], each row with `transcript` (what is
    said), the task's fields and `target`. The `_shuffled` measures are reported, never gated: dev
    sentences with their words shuffled (orders no template makes) tell an LLM that reads its input
    from one that recalls templates."""
    from speechverse_jax.demo.corpus import kws_pick, kws_vocabulary, shuffled_sentences

    names = {"asr": "copy_wer", "ic": "ic_accuracy", "sf": "sf_slu_f1", "kws": "kws_accuracy", "kwe": "kwe_f1"}
    seed, n = int(config.seed), int(config.gates.text_rows)
    cases = [(name, task, [r for r, _ in _planned(task, "dev", n, families, seed)]) for task, name in names.items()]
    every = [s.text for fam in families.values() for sp in ("train", "dev", "test") for s in fam[sp]]
    shuffled = shuffled_sentences(families["asr"]["dev"], seed, every)[:n]
    rng, vocab = _seed_rng(seed, 0x5AFE), kws_vocabulary(families)
    kws_rows = []
    for i, s in enumerate(shuffled):
        keyword, answer = kws_pick(s.text, vocab, i % 2 == 0, rng)
        kws_rows.append({"task": "kws", "transcript": s.text, "keyword": keyword, "target": answer})
    cases += [("copy_wer_shuffled", "asr", [{"task": "asr", "transcript": s.text, "target": s.text}
                                            for s in shuffled]),
              ("kws_accuracy_shuffled", "kws", kws_rows),
              ("label_copy_wer", "asr", _label_copy_rows(families, seed))]
    return cases


def _label_copy_rows(families, seed: int, per_word: int = 5) -> List[dict]:
    """Copy rows that hold each demo answer word (`corpus.answer_words`: the accents, speech /
    non-speech, yes / no...) among 2-4 words of held-out dev sentences: an LLM that cannot write a
    label cannot answer with it, whatever its adapters feed it."""
    from speechverse_jax.demo.corpus import answer_words

    rng = _seed_rng(seed, 0x1AB)
    dev_words = sorted({w for s in families["asr"]["dev"] for w in s.text.split()})
    rows = []
    for word in answer_words():
        for _ in range(per_word):
            words = [word] + [dev_words[int(i)] for i in rng.integers(len(dev_words), size=int(rng.integers(2, 5)))]
            text = " ".join(words[int(i)] for i in rng.permutation(len(words)))
            rows.append({"task": "asr", "transcript": text, "target": text})
    return rows


def _score_cases(config, families, prefix: str, answer: Callable[[List[str], List[str]], List[str]]) -> Dict[str, Any]:
    """{prefix + measure: score} of `answer(what is said [n], instructions [n]) -> n answers`."""
    from speechverse_jax.data import tasks
    from speechverse_jax.eval import metrics

    out = {}
    for name, task, rows in _text_cases(config, families):
        hyps = answer([r["transcript"] for r in rows], [tasks.build_instruction(task, r, i) for i, r in enumerate(rows)])
        spec = tasks.get_task(task)
        labels = tasks.resolve_labels(spec, rows[0]) if (spec.labels or rows[0].get("labels")) else None
        result = metrics.evaluate_task(task, hyps, [r["target"] for r in rows], labels=labels)
        out[prefix + name] = round(float(result[spec.metric]), 2)
    return out


COLLAPSE_COSINE = 0.95


def collapsed_answer_pieces(output_rows, tokenizer, prefix: str) -> Dict[str, Any]:
    """The pieces of the demo's answer labels (`corpus.answer_labels`) whose output row (`[vocab, d]`,
    the logits' weights) has cosine >= COLLAPSE_COSINE with another row. A piece that no training
    target ever held ends up there: its row only ever moves with every other unwritten piece's
    (release 4's LM: the accents at 0.998 with each other, and AC answered one of them). Reported,
    not gated: a trained pair can stay that close and still be told apart (release 6's `▁y` / `▁no`,
    KWS 97%); the label-copy gate asks the functional question.
    -> {prefix + 'collapsed_answer_pieces': count, prefix + 'collapsed_answer_piece_names': [piece]}."""
    from speechverse_jax.demo.corpus import answer_labels

    special = set(tokenizer.all_special_ids)
    ids = sorted({i for labels in answer_labels().values() for label in labels
                  for i in tokenizer(label, add_special_tokens=False)["input_ids"] if i not in special})
    rows = np.asarray(output_rows, np.float32)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    cos = unit[ids] @ unit.T  # [pieces, vocab]
    cos[np.arange(len(ids)), ids] = -1.0
    collapsed = [tokenizer.convert_ids_to_tokens(i) for i, c in zip(ids, cos.max(axis=1)) if c >= COLLAPSE_COSINE]
    return {prefix + "collapsed_answer_pieces": len(collapsed), prefix + "collapsed_answer_piece_names": collapsed}


def text_gates(config, families, t5_cfg, params, tokenizer) -> Dict[str, Any]:
    """The T5 alone on the text form of held-out dev examples (`<transcript> <instruction>`, greedy)."""
    from speechverse_jax.data.tokenizer import TextEncoder
    from speechverse_jax.decode.generate import GenerateConfig, generate
    from speechverse_jax.models.t5 import T5

    model = T5(t5_cfg)
    encoder = TextEncoder(tokenizer=tokenizer)

    def answer(said, instructions):
        ids = encoder.encode([f"{x} {y}" for x, y in zip(said, instructions)])
        hyps = []
        for start in range(0, len(ids), 64):
            part = ids[start:start + 64]
            arr = np.zeros((len(part), bucket_length(max(map(len, part)), 16)), np.int32)  # shared shapes
            for i, x in enumerate(part):
                arr[i, : len(x)] = x
            mask = jnp.asarray(arr != 0)
            enc = model.apply({"params": params}, model.apply({"params": params}, arr, method=T5.embed), mask,
                              method=T5.encode)
            gen = generate(model, params, enc, mask, GenerateConfig(max_new_tokens=48))
            hyps += [tokenizer.decode(t[:n], skip_special_tokens=True)
                     for t, n in zip(np.asarray(gen.tokens), np.asarray(gen.lengths))]
        return hyps

    head = params["lm_head"]["kernel"].T if "lm_head" in params else params["shared"]["embedding"]
    return dict(_score_cases(config, families, "text_", answer), **collapsed_answer_pieces(head, tokenizer, "text_"))


def lm_gates(config, families, lm_cfg, params, tokenizer) -> Dict[str, Any]:
    """The decoder-only LM alone on the same held-out dev examples, what is said in its chat prompt
    where the audio goes (greedy, KV cache)."""
    from speechverse_jax.decode.generate import GenerateConfig
    from speechverse_jax.decode.generate_decoder import generate_lm
    from speechverse_jax.models.decoder_lm import DecoderLM

    model = DecoderLM(lm_cfg)
    prompts = LMPrompts(tokenizer, int(config.lm.max_input_tokens), int(config.lm.max_target_tokens))
    embed = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=DecoderLM.embed))

    def answer(said, instructions):
        rows = [prompts.prompt(x, y) for x, y in zip(said, instructions)]
        hyps = []
        for start in range(0, len(rows), 64):
            part = rows[start:start + 64]
            arr = np.zeros((len(part), bucket_length(max(map(len, part)), 16)), np.int32)  # shared shapes
            mask = np.zeros(arr.shape, bool)
            for i, x in enumerate(part):  # left padding: the answer follows the prompt's last token
                arr[i, arr.shape[1] - len(x):], mask[i, arr.shape[1] - len(x):] = x, True
            gen = generate_lm(model, params, embed(params, arr), mask, GenerateConfig(max_new_tokens=48))
            hyps += [tokenizer.decode(t[:n], skip_special_tokens=True).strip()
                     for t, n in zip(np.asarray(gen.tokens), np.asarray(gen.lengths))]
        return hyps

    head = params["lm_head"]["kernel"].T if "lm_head" in params else params["embed_tokens"]["embedding"]
    return dict(_score_cases(config, families, "lm_", answer), **collapsed_answer_pieces(head, tokenizer, "lm_"))


def judge(measured: Mapping[str, Any], thresholds: Mapping[str, Sequence]) -> Dict[str, Dict[str, Any]]:
    """{gate: {value, threshold, op, passed}} for every threshold of the config."""
    from speechverse_jax.demo.shipped import check_gates

    missing = sorted(set(thresholds) - set(measured))
    if missing:
        raise KeyError(f"gates.thresholds.{missing[0]}: nothing measures it")
    return check_gates({name: {"value": measured[name], "threshold": threshold, "op": op}
                        for name, (op, threshold) in thresholds.items()})


def plot_training(out_dir: str, out_png: str) -> str:
    """The parts' training curves side by side: the WavLM's objectives, the T5's and the LM's loss (a
    running median over 8 logs: their batches are one task kind each, so single logs jump between kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechverse_jax.train.metrics_log import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, part, keys in ((axes[0], "wavlm", ("ctc", "accent_ce", "voices_ce")), (axes[1], "t5", ("loss",)),
                           (axes[2], "lm", ("loss",))):
        path = os.path.join(out_dir, part, "metrics.jsonl")
        rows = read_metrics(path, "train") if os.path.exists(path) else []
        for key in keys:
            steps = [r["step"] for r in rows if key in r]
            values = np.asarray([r[key] for r in rows if key in r], float)
            if part != "wavlm" and values.size:
                values = np.asarray([np.median(values[max(0, i - 7):i + 1]) for i in range(values.size)])
            ax.plot(steps, values, label=key if part == "wavlm" else "loss (running median)")
        ax.set_title(part)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def gate_table(gates: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| gate | measured | target | |", "|---|---|---|---|"]
    for name, g in gates.items():
        lines.append(f"| {name} | {g['value']:g} | {g['op']} {g['threshold']:g} | {'ok' if g['passed'] else 'FAILED'} |")
    return "\n".join(lines)


# -- the whole recipe ------------------------------------------------------------------------------

def recipe_dict(config) -> dict:
    """The recipe as plain JSON (what MANIFEST.json records): the config without where it is written."""
    recipe = json.loads(json.dumps(config.to_dict()))
    recipe.pop("out", None)
    return recipe


def _check_recipe(config, out_dir: str) -> dict:
    """The recipe is written once into the run folder; resuming with another one is refused."""
    recipe = recipe_dict(config)
    path = os.path.join(out_dir, "recipe.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != recipe:
            diff = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
            raise UserError(f"{out_dir} holds a run of another recipe (fields {diff} differ); use another --out "
                            "or the same config to resume")
    else:
        with open(path, "w") as f:
            json.dump(recipe, f, indent=2)
    return recipe


PARTS = ("all", "tokenizer", "wavlm", "t5", "lm")


def run_recipe(config, out_dir: Optional[str] = None, progress: bool = True, part: str = "all") -> Dict[str, Any]:
    """Make (or resume making) the demo backbones into `out_dir`; the release lands in
    `out_dir/release/`. Returns the report (also `out_dir/report.json`). Raises `GateError`
    after writing the release when a gate fails and `gates.enforce` is set.

    `part`: 'all', or one piece ('tokenizer', then 'wavlm', 't5' and 'lm' as processes side by side,
    each resumable; 'all' afterwards finds them trained and only measures and releases)."""
    if part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    from speechverse_jax.convert.decoder_lm import export_decoder_lm
    from speechverse_jax.convert.export import export_t5, export_wavlm
    from speechverse_jax.demo.corpus import held_out_fingerprint, sentence_families

    t_start = time.time()
    out_dir = os.path.abspath(out_dir or config.out)
    os.makedirs(out_dir, exist_ok=True)
    recipe = _check_recipe(config, out_dir)
    families = sentence_families(int(config.split_seed))
    timings = {}

    t = time.time()
    tokenizer = build_tokenizer(config, families, os.path.join(out_dir, "tokenizer"))
    lm_tokenizer = build_lm_tokenizer(config, families, os.path.join(out_dir, "lm_tokenizer"))
    timings["tokenizer"] = round(time.time() - t, 1)
    _say(f"tokenizers: T5 {len(tokenizer)} pieces, LM {len(lm_tokenizer)}")
    if part == "tokenizer":
        return {"part": part, "tokenizer_pieces": len(tokenizer), "lm_tokenizer_pieces": len(lm_tokenizer)}
    if part in ("all", "wavlm"):
        wavlm_params, wavlm_cfg, wavlm_report = pretrain_wavlm(config, families, os.path.join(out_dir, "wavlm"),
                                                               progress)
    if part in ("all", "t5"):
        t5_params, t5_cfg, t5_report = pretrain_t5(config, families, tokenizer, os.path.join(out_dir, "t5"), progress)
    if part in ("all", "lm"):
        lm_params, lm_cfg, lm_report = pretrain_lm(config, families, lm_tokenizer, os.path.join(out_dir, "lm"),
                                                   progress)
    if part != "all":
        return {"part": part, "report": {"wavlm": lambda: wavlm_report, "t5": lambda: t5_report,
                                         "lm": lambda: lm_report}[part]()}

    t = time.time()
    _say("measuring the gates on held-out dev data")
    model = WavLMPretrainer(wavlm_cfg, len(config.wavlm.data.accents), int(config.wavlm.aux_layer))
    measured = encoder_gates(config, families, model, wavlm_params, progress)
    measured.update(text_gates(config, families, t5_cfg, t5_params, tokenizer))
    measured.update(lm_gates(config, families, lm_cfg, lm_params, lm_tokenizer))
    gates = judge(measured, config.gates.thresholds.to_dict())
    timings["gates"] = round(time.time() - t, 1)

    release = os.path.join(out_dir, "release")
    export_wavlm(wavlm_cfg, wavlm_params["wavlm"], os.path.join(release, "wavlm"))
    export_t5(t5_cfg, t5_params, os.path.join(release, "t5"))
    for name in sorted(os.listdir(os.path.join(out_dir, "tokenizer"))):  # spiece.model and what HF wrote beside it
        shutil.copy(os.path.join(out_dir, "tokenizer", name), os.path.join(release, "t5", name))
    export_decoder_lm(lm_cfg, lm_params, os.path.join(release, "lm"))
    for name in sorted(os.listdir(os.path.join(out_dir, "lm_tokenizer"))):
        shutil.copy(os.path.join(out_dir, "lm_tokenizer", name), os.path.join(release, "lm", name))
    from speechverse_jax.demo import shipped

    # compute seconds of every part summed (the parts may have run side by side: not the wall clock)
    wall = round(wavlm_report["seconds"] + t5_report["seconds"] + lm_report["seconds"] + timings["tokenizer"]
                 + timings["gates"], 1)
    shipped.write_manifest(release, recipe=recipe, profile=config.profile, gates=gates,
                           held_out={"seed": int(config.split_seed), "fingerprint": held_out_fingerprint(int(config.split_seed))},
                           wall_seconds=wall,
                           reported={k: v for k, v in measured.items()
                                     if k not in gates and isinstance(v, (int, float)) and not k.endswith("_layer")})
    report = {"release_dir": release, "profile": config.profile, "timings": timings, "wall_seconds": wall,
              "this_call_seconds": round(time.time() - t_start, 1), "wavlm": wavlm_report, "t5": t5_report,
              "lm": lm_report,
              "measured": measured, "gates": gates, "tokenizer_pieces": len(tokenizer),
              "machine": shipped.machine_info()}
    report["plot"] = plot_training(out_dir, os.path.join(out_dir, "training.png"))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    _say("gates (held-out dev data):\n" + gate_table(gates))
    failed = [k for k, g in gates.items() if not g["passed"]]
    if failed and bool(config.gates.enforce):
        raise GateError(f"demo backbones below their gates: {', '.join(failed)} (report: {out_dir}/report.json)")
    return report
