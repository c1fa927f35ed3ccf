"""SpeechVerse on a decoder-only LLM: frozen WavLM -> layer combination -> conv downsampler ->
audio embeddings placed inside a chat prompt -> frozen `DecoderLM` (+ LoRA).

The T5 layout (`models/speechverse.py`) is left as it is; this module is its decoder-only twin.

Prompt. The instruction is rendered with the tokenizer's chat template when it has one (a user
turn holding `AUDIO_PLACEHOLDER` and the instruction, then the generation prompt), else with the
plain `PLAIN_TEMPLATE` ("USER: <audio> {instruction}\\nASSISTANT:", as SLAM-LLM / SALMONN), and
split at the placeholder into `prefix` and `suffix` token ids (`prompt_parts`). Per example the
LLM sees

    [prefix tokens | audio embeddings (n valid) | suffix tokens | answer tokens + EOS]

each part packed against the previous one (`pack_segments`), with right padding for training
(`left_pad=False`) and left padding for generation (`left_pad=True`, so every row's next token
follows its last real one). Position ids count real items only, so both give the same numbers.

Loss: on the answer tokens (and EOS) only; the prefix, audio and instruction are never targets.
The LM head runs only on the positions that predict an answer token (`from_hidden_states`), so
no `[b, prompt + audio, vocab]` logits are ever made.

Gemma's sqrt(hidden) embedding normaliser applies to text tokens (through `DecoderLM.embed`) and
NOT to the audio embeddings, as HF transformers 5 treats `inputs_embeds`: the downsampler is
trained from scratch and its final LayerNorm learns whatever scale the LLM needs, while scaling
by sqrt(hidden) (48 for Gemma-2-2B) would start training with audio vectors ~48x the size of
unit-variance LayerNorm outputs.
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechverse_jax import rules, tree
from speechverse_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from speechverse_jax.models.downsampler import LAYER_COMBINATIONS, Downsampler, LayerCombination
from speechverse_jax.models.layers import LoRAConfig, constrain
from speechverse_jax.models.speechverse import (DTYPES, AudioEmbeddings, chunked_token_nll, token_cross_entropy,
                                                 token_nll)
from speechverse_jax.models.wavlm import WavLM, WavLMConfig

AUDIO_PLACEHOLDER = "<|audio|>"
PLAIN_TEMPLATE = "USER: {audio} {instruction}\nASSISTANT:"
# segment ids of `pack_segments` as used here
PREFIX, AUDIO, SUFFIX, ANSWER = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SpeechVerseDecoderConfig:
    """Everything that decides the shapes of the decoder-only composed model."""

    wavlm: WavLMConfig
    llm: DecoderLMConfig
    layer_combination: str = "last"
    downsample_strides: Tuple[int, ...] = (2, 2)
    downsample_kernel: int = 3
    lora: Optional[LoRAConfig] = None
    dtype: str = "float32"  # compute dtype
    frozen_param_dtype: str = "float32"  # storage of WavLM / LLM weights
    remat: str = "none"  # per LLM layer: none | full | dots_saveable | dots_with_no_batch_dims_saveable
    # nn.scan over the LLM's layers and WavLM's layers 1..L-1 (params on a leading `layers` axis:
    # `llm/layers/...`, `wavlm/encoder/layers/...`; `models/scan_layout.py` converts)
    scan_layers: bool = False
    # answer positions per chunk of the training loss's LM head + softmax (0: all at once); a chunk's
    # logits are recomputed in the backward pass, so `[b, answer, vocab]` float32 logits never exist
    loss_chunk: int = 0
    # queries per chunk of the LLM's self-attention (0: all at once): the float32 scores
    # `[b, heads, chunk, T]` of one chunk exist at a time instead of `[b, heads, T, T]`
    attention_chunk: int = 0

    def __post_init__(self):
        from speechverse_jax.models.layers import remat_policy

        remat_policy(self.remat)  # raises on an unknown name
        for field in ("loss_chunk", "attention_chunk"):
            if int(getattr(self, field)) < 0:
                raise ValueError(f"model.{field} must be >= 0 (0: no chunking), got {getattr(self, field)}")
        if self.layer_combination not in LAYER_COMBINATIONS:
            raise ValueError(
                f"model.layer_combination must be one of {LAYER_COMBINATIONS}, got {self.layer_combination!r}")
        if not self.downsample_strides or any(int(s) < 1 for s in self.downsample_strides):
            raise ValueError(f"model.downsampler.strides must be positive integers, got {self.downsample_strides}")
        if self.downsample_kernel < 1 or self.downsample_kernel % 2 != 1:
            raise ValueError(f"model.downsampler.kernel_size must be a positive odd number, got {self.downsample_kernel}")
        for field in ("dtype", "frozen_param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"model.{field} must be one of {sorted(DTYPES)}, got {getattr(self, field)!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def lm(self) -> DecoderLM:
        """The LLM module inside `SpeechVerseDecoder(self)`, to run with `params['llm']`."""
        return DecoderLM(self.llm, lora=self.lora, dtype=self.compute_dtype, param_dtype=DTYPES[self.frozen_param_dtype],
                         scan_layers=self.scan_layers, attention_chunk=int(self.attention_chunk))


# ---- host side: prompt text -> token ids ---------------------------------------------------------

def prompt_parts(tokenizer, instruction: str, placeholder: str = AUDIO_PLACEHOLDER,
                 use_chat_template: Optional[bool] = None) -> Tuple[List[int], List[int]]:
    """-> (prefix ids, suffix ids): the prompt around the audio for `instruction`.

    With a chat template (default when the tokenizer has one): one user message
    `"{placeholder}\\n{instruction}"`, `add_generation_prompt=True`; the template's own special
    tokens (BOS, headers) are kept as it writes them. Without: `PLAIN_TEMPLATE`, BOS first if the
    tokenizer has one.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template and not has_template:
        raise ValueError("prompt_parts: the tokenizer has no chat_template")
    if use_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{placeholder}\n{instruction}"}],
                                             tokenize=False, add_generation_prompt=True)
        bos = []
    else:
        text = PLAIN_TEMPLATE.format(audio=placeholder, instruction=instruction)
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    if text.count(placeholder) != 1:
        raise ValueError(f"prompt_parts: the rendered prompt holds {text.count(placeholder)} audio placeholders "
                         f"{placeholder!r}, expected 1: {text!r}")
    before, after = text.split(placeholder)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []  # noqa: E731
    return bos + enc(before), enc(after)


def answer_ids(tokenizer, answer: str, eos_token_id: Optional[int] = None) -> List[int]:
    """Target token ids of `answer`, EOS appended (the turn end for chat models: pass it)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("answer_ids: the tokenizer has no eos_token_id; pass eos_token_id")
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [int(eos)]


# ---- device side ---------------------------------------------------------------------------------

class Packed(NamedTuple):
    embeddings: jax.Array  # [b, T, d]
    ids: jax.Array  # int32 [b, T]: token ids, -1 at audio and pads
    segments: jax.Array  # int32 [b, T]: index of the part each position came from, -1 at pads
    mask: jax.Array  # bool [b, T]


def pack_segments(parts: Sequence[Tuple[jax.Array, jax.Array, jax.Array]], left_pad: bool = False) -> Packed:
    """Concatenate padded parts per example with no gaps between their valid items.

    parts: (embeddings `[b, n_i, d]`, ids `[b, n_i]`, mask `[b, n_i]`), valid items first in each.
    Right padding puts the pads after the last part; left padding puts them all in front.
    """
    total = sum(p[0].shape[1] for p in parts)
    lens = [p[2].astype(jnp.int32).sum(-1) for p in parts]  # [b] each
    used = sum(lens)
    pos = jnp.arange(total)[None, :]
    if left_pad:
        pos = pos - (total - used)[:, None]
    b, d = parts[0][0].shape[0], parts[0][0].shape[2]
    emb = jnp.zeros((b, total, d), parts[0][0].dtype)
    ids = jnp.full((b, total), -1, jnp.int32)
    seg = jnp.full((b, total), -1, jnp.int32)
    start = jnp.zeros((b,), jnp.int32)
    for i, ((e, t, _), n) in enumerate(zip(parts, lens)):
        inside = (pos >= start[:, None]) & (pos < (start + n)[:, None])
        idx = jnp.clip(pos - start[:, None], 0, e.shape[1] - 1)
        emb = jnp.where(inside[..., None], jnp.take_along_axis(e.astype(emb.dtype), idx[..., None], axis=1), emb)
        ids = jnp.where(inside, jnp.take_along_axis(t.astype(jnp.int32), idx, axis=1), ids)
        seg = jnp.where(inside, i, seg)
        start = start + n
    return Packed(emb, ids, seg, seg >= 0)


class SpeechVerseDecoder(nn.Module):
    """The decoder-only composed model. Params: `{'wavlm', 'layer_weights', 'downsampler', 'llm'}`."""

    cfg: SpeechVerseDecoderConfig

    def setup(self):
        cfg = self.cfg
        dtype, frozen = cfg.compute_dtype, DTYPES[cfg.frozen_param_dtype]
        self.wavlm = WavLM(cfg.wavlm, dtype=dtype, param_dtype=frozen, scan_layers=cfg.scan_layers)
        self.layer_weights = LayerCombination(cfg.layer_combination, dtype=dtype)
        self.downsampler = Downsampler(features=cfg.llm.hidden_size, strides=tuple(cfg.downsample_strides),
                                       kernel_size=cfg.downsample_kernel, dtype=dtype)
        self.llm = DecoderLM(cfg.llm, lora=cfg.lora, dtype=dtype, param_dtype=frozen, remat=cfg.remat,
                             scan_layers=cfg.scan_layers, attention_chunk=int(cfg.attention_chunk))

    def encode_audio(self, audio: jax.Array, audio_mask: jax.Array):
        """Frozen WavLM: audio `[b, samples]` -> (L+1 hidden states `[b, frames, dim]`, frame mask)."""
        out = self.wavlm(audio, audio_mask)
        hidden = out.hidden_states[:-1] + (out.last_hidden_state,)
        return tuple(jax.lax.stop_gradient(h) for h in hidden), out.frame_mask

    def adapt(self, hidden_states, frame_mask) -> AudioEmbeddings:
        """Layer combination + downsampler -> audio embeddings `[b, n, hidden]` (not Gemma-scaled)."""
        emb, mask = self.downsampler(self.layer_weights(hidden_states), frame_mask)
        return AudioEmbeddings(emb, mask)

    def pack(self, audio: AudioEmbeddings, prefix_ids, prefix_mask, suffix_ids, suffix_mask,
             answer_ids=None, answer_mask=None, left_pad: bool = False) -> Packed:
        """[prefix, audio, suffix(, answer)] -> packed LLM input (token parts through `DecoderLM.embed`)."""
        dt = audio.embeddings.dtype
        parts = [(self.llm.embed(prefix_ids).astype(dt), prefix_ids, prefix_mask),
                 (audio.embeddings, jnp.full(audio.mask.shape, -1, jnp.int32), audio.mask),
                 (self.llm.embed(suffix_ids).astype(dt), suffix_ids, suffix_mask)]
        if answer_ids is not None:
            parts.append((self.llm.embed(answer_ids).astype(dt), answer_ids, answer_mask))
        packed = pack_segments(parts, left_pad=left_pad)
        return packed._replace(embeddings=constrain(packed.embeddings, ("batch", "length", "embed")))

    def from_hidden_states(self, hidden_states, frame_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask,
                           answer_ids, answer_mask, left_pad: bool = False, deterministic: bool = True,
                           logits_at: str = "answer"):
        """Teacher-forced -> (logits, targets, loss mask) for the answer-only loss.

        `logits_at='answer'` (default, what training and eval use): logits `[b, A, vocab]` only at the
        positions that predict answer token j = 0..A-1 (A = `answer_ids.shape[1]`), targets
        `answer_ids`, mask `answer_mask`. The final hidden states of those positions are gathered
        before the LM head, so the vocabulary projection and softmax never run over the prefix, audio
        and instruction positions.

        `logits_at='all'`: logits `[b, T, vocab]` over the whole packed sequence, targets `[b, T]` the
        next token, the mask on where that token is an answer token (the same loss, computed the long way).
        """
        if logits_at not in ("answer", "all"):
            raise ValueError(f"logits_at must be 'answer' or 'all', got {logits_at!r}")
        packed = self.pack(self.adapt(hidden_states, frame_mask), prefix_ids, prefix_mask, suffix_ids, suffix_mask,
                           answer_ids, answer_mask, left_pad)
        if logits_at == "all":
            logits = self.llm(inputs_embeds=packed.embeddings, attention_mask=packed.mask,
                              deterministic=deterministic).logits
            targets = jnp.concatenate([packed.ids[:, 1:], jnp.zeros_like(packed.ids[:, :1])], axis=1)
            next_is_answer = jnp.concatenate([packed.segments[:, 1:] == ANSWER,
                                              jnp.zeros_like(packed.mask[:, :1])], axis=1)
            return logits, jnp.maximum(targets, 0), next_is_answer
        picked, targets, mask = self._answer_hidden(packed, answer_ids, answer_mask, left_pad, deterministic)
        return constrain(self.llm.logits(picked), ("batch", "length", "vocab")), targets, mask

    def _answer_hidden(self, packed: Packed, answer_ids, answer_mask, left_pad: bool, deterministic: bool):
        """-> (final hidden states `[b, A, d]` of the positions that predict answer token j, targets
        `[b, A]`, loss mask `[b, A]`)."""
        x = self.llm.final_hidden(packed.embeddings, packed.mask, deterministic=deterministic)  # [b, T, d]
        total = x.shape[1]
        # array index of the first answer token: pads (left padding only) + prefix, audio, suffix items
        before = jnp.sum((packed.segments >= 0) & (packed.segments < ANSWER), axis=-1)
        if left_pad:
            before = before + total - jnp.sum(packed.mask, axis=-1)
        # answer token j sits at before + j; the position before it predicts it
        where = before[:, None] - 1 + jnp.arange(answer_ids.shape[1])[None, :]  # [b, A]
        picked = jnp.take_along_axis(x, jnp.clip(where, 0, total - 1)[..., None], axis=1)
        mask = answer_mask.astype(bool) & (where >= 0)
        return picked, jnp.where(mask, answer_ids.astype(jnp.int32), 0), mask

    def answer_nll_from_hidden_states(self, hidden_states, frame_mask, prefix_ids, prefix_mask, suffix_ids,
                                      suffix_mask, answer_ids, answer_mask, left_pad: bool = False,
                                      deterministic: bool = True):
        """Teacher-forced -> (per-token NLL `[b, A]` float32, loss mask `[b, A]`) of the answer
        tokens: the training loss. With `cfg.loss_chunk > 0` the LM head and the softmax run that
        many answer positions at a time (`chunked_token_nll`); the value is the same."""
        packed = self.pack(self.adapt(hidden_states, frame_mask), prefix_ids, prefix_mask, suffix_ids, suffix_mask,
                           answer_ids, answer_mask, left_pad)
        picked, targets, mask = self._answer_hidden(packed, answer_ids, answer_mask, left_pad, deterministic)
        if self.cfg.loss_chunk and self.cfg.loss_chunk < picked.shape[1]:
            nll = chunked_token_nll(self, lambda mdl, h: mdl.llm.logits(h), picked, targets, int(self.cfg.loss_chunk))
        else:
            nll = token_nll(constrain(self.llm.logits(picked), ("batch", "length", "vocab")), targets)
        return jnp.where(mask, nll, 0.0), mask

    def answer_nll(self, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask, answer_ids,
                   answer_mask, left_pad: bool = False, deterministic: bool = True):
        """From raw audio `[b, samples]`; see `answer_nll_from_hidden_states`."""
        hidden, frame_mask = self.encode_audio(audio, audio_mask)
        return self.answer_nll_from_hidden_states(hidden, frame_mask, prefix_ids, prefix_mask, suffix_ids,
                                                  suffix_mask, answer_ids, answer_mask, left_pad, deterministic)

    def __call__(self, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask, answer_ids, answer_mask,
                 left_pad: bool = False, deterministic: bool = True, logits_at: str = "answer"):
        """From raw audio `[b, samples]`; see `from_hidden_states`."""
        hidden, frame_mask = self.encode_audio(audio, audio_mask)
        return self.from_hidden_states(hidden, frame_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask,
                                       answer_ids, answer_mask, left_pad, deterministic, logits_at)

    def prompt(self, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask) -> Packed:
        """The left-padded generation prompt (no answer) from raw audio."""
        hidden, frame_mask = self.encode_audio(audio, audio_mask)
        return self.prompt_from_hidden_states(hidden, frame_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask)

    def prompt_from_hidden_states(self, hidden_states, frame_mask, prefix_ids, prefix_mask, suffix_ids,
                                  suffix_mask) -> Packed:
        """The left-padded generation prompt from (e.g. cached) encoder hidden states."""
        return self.pack(self.adapt(hidden_states, frame_mask), prefix_ids, prefix_mask, suffix_ids, suffix_mask,
                         left_pad=True)


def answer_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean cross-entropy over answer tokens (and per-example sums), as `token_cross_entropy`."""
    return token_cross_entropy(logits, targets, loss_mask)


def init_params(cfg: SpeechVerseDecoderConfig, rng: jax.Array, batch: int = 1, samples: int = 16000,
                text_len: int = 4):
    """Random params (boxed with logical axes) for shape inference and tests."""
    audio = jnp.zeros((batch, samples), jnp.float32)
    ids = jnp.zeros((batch, text_len), jnp.int32)
    mask = jnp.ones_like(ids, bool)
    params = SpeechVerseDecoder(cfg).init(rng, audio, jnp.ones_like(audio, bool), ids, mask, ids, mask, ids,
                                          mask)["params"]
    if cfg.lora is not None:  # a LoRA target regex that adapts nothing is a mistake, not a no-op
        rules.check_used([cfg.lora.target_regex], sorted({k.rsplit("/", 1)[0] for k in tree.flatten(params)}),
                         "model.lora.target_regex")
    return params
