"""Python API: load a converted checkpoint once, then run the encoder or the whole model.

    from speechverse_jax.api import SpeechVerseModel
    model = SpeechVerseModel.from_base("checkpoints/base")          # written by `speechverse-jax convert`
    states = model.encode(["clip.wav"])                               # [L+1, frames, dim] per clip
    nll = model.score(["clip.wav"], ["Transcribe the preceding audio."], ["turn on the radio"])

Audio is a path (any format soundfile/librosa reads; resampled to 16 kHz) or a 16 kHz float array.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from speechverse_jax import checkpoints
from speechverse_jax.data.audio import SAMPLE_RATE, load_audio
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax.models.speechverse import SpeechVerse, SpeechVerseConfig, init_params_subset, token_cross_entropy
from speechverse_jax.models.t5 import shift_right
from speechverse_jax.models.wavlm import feature_lengths

Audio = Union[str, np.ndarray]


def load_tokenizer(folder: str):
    """The T5 tokenizer carried into a converted folder (spiece.model / tokenizer.json)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception:
        return transformers.T5Tokenizer.from_pretrained(folder, legacy=False)


class SpeechVerseModel:
    """A SpeechVerse model with its params and tokenizer; methods take and return numpy."""

    def __init__(self, cfg: SpeechVerseConfig, params: dict, tokenizer=None):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.module = SpeechVerse(cfg)

    @classmethod
    def from_base(
        cls,
        base_dir: str,
        layer_combination: str = "last",
        downsample_strides: Tuple[int, ...] = (2, 2),
        lora: Optional[LoRAConfig] = None,
        dtype: str = "float32",
        seed: int = 0,
    ) -> "SpeechVerseModel":
        """Frozen backbones from `base_dir` plus freshly initialised adaptor (and LoRA, b = 0)."""
        wavlm_cfg, t5_cfg, _ = checkpoints.load_model_config(base_dir)
        cfg = SpeechVerseConfig(wavlm=wavlm_cfg, t5=t5_cfg, layer_combination=layer_combination,
                                downsample_strides=tuple(downsample_strides), lora=lora, dtype=dtype)
        base = checkpoints.load_base_params(base_dir)
        fresh = init_params_subset(cfg, jax.random.PRNGKey(seed),
                                   keep=lambda p: not p.startswith(("wavlm/", "t5/")) or "/lora_" in p)
        params = _merge(base, fresh)
        try:
            tokenizer = load_tokenizer(base_dir)
        except Exception:  # a base folder without tokenizer files still runs `encode`
            tokenizer = None
        return cls(cfg, params, tokenizer)

    # -- batching -------------------------------------------------------------------------------
    @staticmethod
    def _audio_batch(audio: Sequence[Audio]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        clips = [load_audio(a) if isinstance(a, str) else np.asarray(a, np.float32) for a in audio]
        for i, c in enumerate(clips):
            if c.ndim != 1 or c.size == 0:
                raise ValueError(f"audio[{i}]: expected a non-empty 1-D array at {SAMPLE_RATE} Hz, got shape {c.shape}")
        lengths = np.array([c.size for c in clips])
        batch = np.zeros((len(clips), lengths.max()), np.float32)
        mask = np.zeros_like(batch, dtype=bool)
        for i, c in enumerate(clips):
            batch[i, : c.size] = c
            mask[i, : c.size] = True
        return batch, mask, lengths

    def _text_batch(self, texts: Sequence[str], what: str) -> Tuple[np.ndarray, np.ndarray]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files (spiece.model / tokenizer.json)")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what}[{i}] is empty")
        ids = [self.tokenizer(t).input_ids for t in texts]
        arr = np.zeros((len(ids), max(map(len, ids))), np.int32)
        mask = np.zeros_like(arr, dtype=bool)
        for i, x in enumerate(ids):
            arr[i, : len(x)] = x
            mask[i, : len(x)] = True
        return arr, mask

    # -- jitted pieces --------------------------------------------------------------------------
    @functools.cached_property
    def _encode_fn(self):
        return jax.jit(lambda p, a, m: self.module.apply({"params": p}, a, m, method=SpeechVerse.encode_audio))

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, *args: self.module.apply({"params": p}, *args))

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
        ins, ins_mask = self._text_batch(instructions, "instruction")
        tgt, tgt_mask = self._text_batch(targets, "target")
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


def _merge(base: dict, extra: dict) -> dict:
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(extra))
    return traverse_util.unflatten_dict(flat)
