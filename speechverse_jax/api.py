"""Python API: load a converted checkpoint once, then run the encoder or the whole model.

    from speechverse_jax.api import SpeechVerseModel
    model = SpeechVerseModel.from_base("checkpoints/base")          # written by `speechverse-jax convert`
    states = model.encode(["clip.wav"])                               # [L+1, frames, dim] per clip
    nll = model.score(["clip.wav"], ["Transcribe the preceding audio."], ["turn on the radio"])

Audio is a path (any format soundfile/librosa reads; resampled to 16 kHz) or a 16 kHz float array.
Both layouts (T5, and the decoder-only LLM of a `convert --llm` base; models/composed.py) load and
run through this one class: the layout comes from the base checkpoint and `model.layout`.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax import checkpoints, tree
from speechverse_jax.errors import CheckpointMismatchError
from speechverse_jax.data.audio import SAMPLE_RATE, load_audio
from speechverse_jax.data.batching import pad_rows
from speechverse_jax.data.tokenizer import TextEncoder, load_tokenizer
from speechverse_jax.models import composed
from speechverse_jax.models.composed import ComposedConfig, abstract_params, init_params_subset
from speechverse_jax.models.speechverse import SpeechVerse, speechverse_t5, token_cross_entropy
from speechverse_jax.models.speechverse_decoder import SpeechVerseDecoder
from speechverse_jax.models.t5 import shift_right
from speechverse_jax.models.wavlm import feature_lengths

Audio = Union[str, np.ndarray]


class SpeechVerseModel:
    """A SpeechVerse model with its params and tokenizer; methods take and return numpy.

    `max_audio_seconds`: longer clips are refused (ValueError), never truncated; a trained run's
    limit is its `data.max_audio_seconds`, a base checkpoint's 30 s.
    """

    max_audio_seconds: float = 30.0

    def __init__(self, cfg: ComposedConfig, params: dict, tokenizer=None):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.layout = composed.layout_of(cfg)  # 't5' or 'decoder'
        self.text = TextEncoder(tokenizer=tokenizer, layout=self.layout) if tokenizer is not None else None
        self.module = composed.module_for(cfg)

    @classmethod
    def from_base(cls, base_dir: str, model=None, seed: int = 0) -> "SpeechVerseModel":
        """Frozen backbones from `base_dir` plus freshly initialised adaptor (and LoRA, b = 0).

        `model` is a `config.model` section (`models.config.model_config(...)`, the training
        configs' own); by default the paper's layout without LoRA."""
        from speechverse_jax.models.config import model_config

        cfg = checkpoints.model_config_for(model if model is not None else model_config(lora_rank=0), base_dir)
        base = checkpoints.load_base_params(base_dir)
        frozen = composed.frozen_prefixes(cfg)
        fresh = init_params_subset(cfg, jax.random.PRNGKey(seed),
                                   keep=lambda p: not p.startswith(frozen) or "/lora_" in p)
        # the base folder is unrolled; lay the whole tree out the way the model runs (model.scan_layers)
        from speechverse_jax.models.scan_layout import tree_to_layout

        params = tree_to_layout(tree.merge(base, fresh), bool(getattr(cfg, "scan_layers", False)))
        try:
            tokenizer = load_tokenizer(base_dir)
        except Exception:  # a base folder without tokenizer files still runs `encode`
            tokenizer = None
        return cls(cfg, params, tokenizer)

    @classmethod
    def from_run(cls, run_dir: str, which: str = "best") -> "SpeechVerseModel":
        """A trained model: the run's resolved config, its base checkpoint and its trainable params
        (`which`: 'best' by validation loss, falling back to the latest; or 'latest')."""
        import json
        import os

        import ml_collections

        from speechverse_jax.train.checkpoint import load_trainable_params

        config_path = os.path.join(run_dir, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{run_dir}: no config.json (is this a training run folder?)")
        with open(config_path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        base_dir = config.base_checkpoint
        if "layout" not in config.model:  # a run written before model.layout existed: T5, or what its base holds
            config.model.layout = "auto"
        cfg = checkpoints.model_config_for(config.model, base_dir)
        trained, meta = load_trainable_params(run_dir, prefer=which, with_meta=True)
        if meta.get("layout", "t5") != composed.layout_of(cfg):
            raise CheckpointMismatchError(
                f"{run_dir}: its checkpoint was trained with model.layout={meta.get('layout', 't5')!r}, but its "
                f"config.json and base checkpoint {base_dir} make a {composed.layout_of(cfg)!r} model")
        base = checkpoints.load_base_params(base_dir)
        # the base folder is unrolled; the run may be scanned (model.scan_layers): merge unrolled,
        # then lay the whole tree out the way this model config runs it
        from speechverse_jax.models.scan_layout import tree_to_layout, unstack_layers

        params = tree.merge(base, tree.unflatten(unstack_layers(trained)))
        params = tree_to_layout(params, bool(getattr(cfg, "scan_layers", False)))
        want = tree.flatten(abstract_params(cfg))
        have = tree.flatten(params)
        missing = set(want) - set(have)
        if missing:
            raise CheckpointMismatchError(f"{run_dir}: the checkpoint lacks params the model needs: {sorted(missing)[:10]}")
        wrong = [f"{k} {tuple(np.shape(have[k]))} (model: {tuple(want[k].shape)})" for k in sorted(want)
                 if tuple(np.shape(have[k])) != tuple(want[k].shape)]
        unused = sorted(set(have) - set(want))
        if wrong or unused:
            raise CheckpointMismatchError(
                f"{run_dir}: the checkpoint is of another architecture than its config.json describes: "
                + "; ".join(wrong[:3] + [f"not in the model: {unused[:3]}"] * bool(unused)))
        model = cls(cfg, params, load_tokenizer(base_dir))
        model.max_audio_seconds = float(config.data.max_audio_seconds)
        return model

    # -- batching -------------------------------------------------------------------------------
    def _audio_batch(self, audio: Sequence[Audio], multiple: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (audio `[b, samples]`, mask, lengths `[b]`); samples rounded up to `multiple`. Clips over
        `max_audio_seconds` are refused, never truncated."""
        clips = [load_audio(a) if isinstance(a, str) else np.asarray(a, np.float32) for a in audio]
        for i, c in enumerate(clips):
            if c.ndim != 1 or c.size == 0:
                raise ValueError(f"audio[{i}]: expected a non-empty 1-D array at {SAMPLE_RATE} Hz, got shape {c.shape}")
            if c.size > self.max_audio_seconds * SAMPLE_RATE + 1:
                name = audio[i] if isinstance(audio[i], str) else f"audio[{i}]"
                raise ValueError(f"{name}: {c.size / SAMPLE_RATE:.2f}s is longer than the model's limit of "
                                 f"{self.max_audio_seconds:g}s (split it into shorter clips)")
        batch, mask = pad_rows(clips, multiple, np.float32)
        return batch, mask, np.array([c.size for c in clips])

    def _text_batch(self, texts: Sequence[str], what: str, multiple: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """-> (ids `[b, n]` ending with EOS, mask), through the training's tokenization."""
        if self.text is None:
            raise ValueError("this checkpoint has no tokenizer files (spiece.model / tokenizer.json)")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what}[{i}] is empty")
        return self.text.encode_padded(texts, multiple)

    # -- jitted pieces --------------------------------------------------------------------------
    @functools.cached_property
    def _encode_fn(self):
        return jax.jit(lambda p, a, m: self.module.apply({"params": p}, a, m, method=type(self.module).encode_audio))

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, *args: self.module.apply({"params": p}, *args))

    @functools.cached_property
    def _t5_encode_fn(self):
        """(params, audio-or-states, mask, instruction ids, mask) -> T5 encoder output and mask."""
        def from_audio(p, audio, audio_mask, ins, ins_mask):
            hidden, frame_mask = self.module.apply({"params": p}, audio, audio_mask, method=SpeechVerse.encode_audio)
            return from_states(p, hidden, frame_mask, ins, ins_mask)

        def from_states(p, hidden, frame_mask, ins, ins_mask):
            tokens = self.module.apply({"params": p}, tuple(hidden), frame_mask, method=SpeechVerse.adapt)
            return self.module.apply({"params": p}, tokens, ins, ins_mask, method=SpeechVerse.encode)

        return {"audio": jax.jit(from_audio), "states": jax.jit(from_states)}

    @functools.cached_property
    def _decoder_prompt_fn(self):
        """(params, audio-or-states, mask, prefix ids, mask, suffix ids, mask) -> left-padded `Packed` prompt."""
        def from_audio(p, audio, audio_mask, *prompt):
            return self.module.apply({"params": p}, audio, audio_mask, *prompt, method=SpeechVerseDecoder.prompt)

        def from_states(p, hidden, frame_mask, *prompt):
            return self.module.apply({"params": p}, tuple(hidden), frame_mask, *prompt,
                                     method=SpeechVerseDecoder.prompt_from_hidden_states)

        return {"audio": jax.jit(from_audio), "states": jax.jit(from_states)}

    @property
    def eos_token_ids(self) -> List[int]:
        """Decoder layout: the ids that end an answer (the tokenizer's EOS, which training appends,
        and the LLM config's)."""
        ids = [int(self.tokenizer.eos_token_id)] if self.tokenizer is not None and \
            self.tokenizer.eos_token_id is not None else []
        return ids + [int(e) for e in self.cfg.llm.eos_token_ids if int(e) not in ids]

    def generate_ids(self, inputs: Tuple[np.ndarray, np.ndarray], instruction_ids: np.ndarray,
                     instruction_mask: np.ndarray, gen=None, constraint=None, from_states: bool = False,
                     prefix_ids: Optional[np.ndarray] = None, prefix_mask: Optional[np.ndarray] = None):
        """Batched generation from padded arrays: audio `[b, samples]` + mask, or cached encoder
        states `[b, L+1, frames, dim]` + frame mask (`from_states`), and the prompt arrays of
        `self.text.encode_prompts_padded` (the decoder layout needs `prefix_ids` / `prefix_mask`).
        Returns `decode.generate.Generated`."""
        from speechverse_jax.decode.generate import GenerateConfig, generate

        x, mask = inputs
        if from_states:
            x = np.moveaxis(x, 1, 0)
        gen = gen or GenerateConfig()
        if self.layout == "decoder":
            from speechverse_jax.decode.generate_decoder import generate_lm

            if prefix_ids is None or prefix_mask is None:
                raise ValueError("generate_ids: the decoder-only layout needs prefix_ids and prefix_mask "
                                 "(model.text.encode_prompts_padded)")
            packed = self._decoder_prompt_fn["states" if from_states else "audio"](
                self.params, x, mask, prefix_ids, prefix_mask, instruction_ids, instruction_mask)
            return generate_lm(self.cfg.lm(), self.params["llm"], packed.embeddings, packed.mask, gen,
                               constraint=constraint, eos_token_id=self.eos_token_ids)
        enc, enc_mask = self._t5_encode_fn["states" if from_states else "audio"](
            self.params, x, mask, instruction_ids, instruction_mask)
        return generate(speechverse_t5(self.cfg), self.params["t5"], enc, enc_mask, gen, constraint=constraint)

    def decode_text(self, generated) -> List[str]:
        tokens, lengths = np.asarray(generated.tokens), np.asarray(generated.lengths)
        return [self.text.decode(t[:n]) for t, n in zip(tokens, lengths)]

    def generate(self, audio: Sequence[Audio], instructions: Sequence[str], num_beams: int = 1,
                 max_new_tokens: int = 64, length_penalty: float = 1.0, labels: Optional[Sequence[str]] = None,
                 task: Optional[str] = None) -> List[str]:
        """Answers for (audio, instruction) pairs. `labels` (or a classification `task`'s label set)
        restricts the outputs to those labels (constrained decoding)."""
        from speechverse_jax.decode.constraints import (check_labels_writable, constraint_for_task, label_constraint,
                                                        tokenizer_fns)
        from speechverse_jax.decode.generate import GenerateConfig

        if len(audio) != len(instructions):
            raise ValueError(f"{len(audio)} audio inputs but {len(instructions)} instructions")
        batch, mask, _ = self._audio_batch(audio, SAMPLE_RATE)
        self._text_batch(instructions, "instruction")  # refuses empty instructions
        prompt = self.text.encode_prompts_padded(instructions, 16)
        constraint = None
        if task:
            constraint = constraint_for_task(task, self.tokenizer, labels=labels)
        elif labels:
            encode = tokenizer_fns(self.tokenizer)[0]
            check_labels_writable("custom labels", labels, encode, self.tokenizer)
            constraint = label_constraint(list(labels), encode, self.tokenizer.eos_token_id)
        gen = GenerateConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty)
        return self.decode_text(self.generate_ids((batch, mask), gen=gen, constraint=constraint, **prompt))

    # -- public ---------------------------------------------------------------------------------
    def encode(self, audio: Sequence[Audio]) -> List[np.ndarray]:
        """WavLM hidden states per clip: `[num_layers + 1, frames, dim]` (padding removed)."""
        batch, mask, lengths = self._audio_batch(audio)
        hidden, _ = self._encode_fn(self.params, batch, mask)
        frames = np.asarray(feature_lengths(self.cfg.wavlm, lengths))
        stacked = np.stack([np.asarray(h) for h in hidden], axis=1)  # [b, L+1, frames, dim]
        return [stacked[i, :, : frames[i]] for i in range(len(lengths))]

    def logits(self, audio: Sequence[Audio], instructions: Sequence[str], targets: Sequence[str]):
        """Teacher-forced logits `[target_tokens, vocab]` per example, and the target ids."""
        batch, mask, _ = self._audio_batch(audio)
        tgt, tgt_mask = self._text_batch(targets, "target")
        if self.layout == "decoder":
            self._text_batch(instructions, "instruction")
            prompt = self.text.encode_prompts_padded(instructions)
            out, ids, on = self._logits_fn(self.params, batch, mask, prompt["prefix_ids"], prompt["prefix_mask"],
                                           prompt["instruction_ids"], prompt["instruction_mask"], tgt,
                                           jnp.asarray(tgt_mask))
            out, ids, on = np.asarray(out), np.asarray(ids), np.asarray(on)
            return [(out[i][on[i]], ids[i][on[i]]) for i in range(len(targets))]
        ins, ins_mask = self._text_batch(instructions, "instruction")
        dec_in = shift_right(jnp.asarray(tgt), self.cfg.t5.decoder_start_token_id, self.cfg.t5.pad_token_id)
        out = self._logits_fn(self.params, batch, mask, ins, ins_mask, dec_in, jnp.asarray(tgt_mask))
        out = np.asarray(out)
        return [(out[i, : tgt_mask[i].sum()], tgt[i, : tgt_mask[i].sum()]) for i in range(len(targets))]

    def score(self, audio: Sequence[Audio], instructions: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Negative log-likelihood (nats, summed over target tokens) of each target."""
        out = []
        for logits, ids in self.logits(audio, instructions, targets):
            _, per_example = token_cross_entropy(logits[None], ids[None], np.ones((1, ids.size), bool))
            out.append(float(per_example[0]))
        return np.array(out)
