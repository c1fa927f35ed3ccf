"""Greedy and beam search for a decoder-only `DecoderLM`, with a KV cache, in one jitted loop.

The prompt (token or audio+text embeddings, LEFT-padded, mask `[b, t]`) is run once by
`DecoderLM.prefill`, which fills a `[b, t + max_new_tokens, kv_heads, head_dim]` cache per layer;
each later step feeds one token. The search itself is `decode/generate.py`'s (the same HF
semantics, min-new-tokens ban and token-automaton constraints from `decode/constraints.py`); the
only difference is that the first "step" returns the prefill's logits instead of feeding a start
token.

    from speechverse_jax.decode.generate_decoder import generate_lm
    out = generate_lm(DecoderLM(cfg), params, embeds, mask, GenerateConfig(max_new_tokens=32, num_beams=4))
    out.tokens   # int32 [b, max_new_tokens], pad after EOS;  out.lengths, out.scores as in generate.py

Checked token for token against HF `generate(inputs_embeds=..., attention_mask=...)` with
greedy and beam search on tiny random Llama / Qwen2 / Gemma 2 / Gemma 3 models
(tests/test_decoder_lm.py). Beam search keeps the prompt's keys/values once per example and each
beam's generated ones in its own block (`expand_for_beams`); moving a hypothesis to another row
gathers the small `slots` table only (`models.t5.reorder_cache`), never the keys/values.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from speechverse_jax.decode.constraints import Constraint
from speechverse_jax.decode.generate import (GenerateConfig, Generated, SpecialTokens, _round_up, batch_bucket,
                                             beam_search, greedy_search)
from speechverse_jax.models.decoder_lm import DecoderLM, expand_for_beams
from speechverse_jax.models.speechverse_decoder import Packed, SpeechVerseDecoder, SpeechVerseDecoderConfig


def special_tokens(model: DecoderLM, eos_token_id=None, pad_token_id: Optional[int] = None) -> SpecialTokens:
    """EOS: `eos_token_id` (an id or a list of ids, any of which ends a sequence) or the config's ids;
    pad: `pad_token_id`, the config's, or the first EOS."""
    c = model.cfg
    if eos_token_id is None:
        eos = tuple(c.eos_token_ids)
    elif isinstance(eos_token_id, (list, tuple)):
        eos = tuple(int(e) for e in eos_token_id)
    else:
        eos = (int(eos_token_id),)
    if not eos:
        raise ValueError("generate_lm: the model config has no eos_token_id; pass eos_token_id")
    pad = pad_token_id if pad_token_id is not None else (c.pad_token_id if c.pad_token_id is not None else eos[0])
    return SpecialTokens(start=int(pad), eos=eos[0], pad=int(pad), extra_eos=eos[1:])


@functools.partial(jax.jit, static_argnames=("model", "cfg", "special"))
def _generate(model: DecoderLM, params: Any, inputs_embeds: jax.Array, mask: jax.Array, cfg: GenerateConfig,
              special: SpecialTokens, constraint: Optional[Constraint]) -> Generated:
    variables = {"params": params}
    k = cfg.num_beams
    if k == 1:
        max_length = inputs_embeds.shape[1] + cfg.max_new_tokens
        first, cache = model.apply(variables, inputs_embeds, mask, max_length, method=DecoderLM.prefill)
    else:
        first, cache = model.apply(variables, inputs_embeds, mask, inputs_embeds.shape[1], method=DecoderLM.prefill)
        cache = expand_for_beams(cache, k, cfg.max_new_tokens)
        first = jnp.repeat(first, k, axis=0)
    cache = dict(cache, first_logits=first, started=jnp.zeros(first.shape[:1], bool))

    def step(tokens, cache):
        core = {k: v for k, v in cache.items() if k not in ("first_logits", "started")}

        def run(_):
            logits, new = model.apply(variables, tokens, core, method=DecoderLM.decode_step)
            return logits.astype(jnp.float32), new

        def prefilled(_):  # the first token comes from the prompt's last position
            return cache["first_logits"].astype(jnp.float32), core

        logits, new = jax.lax.cond(cache["started"][0], run, prefilled, None)
        return logits, dict(new, first_logits=cache["first_logits"], started=jnp.ones_like(cache["started"]))

    if k == 1:
        return greedy_search(step, cache, cfg, special, constraint)
    return beam_search(step, cache, cfg, special, constraint)


def generate_lm(model: DecoderLM, params: Any, inputs_embeds: jax.Array, attention_mask: jax.Array,
                cfg: GenerateConfig = GenerateConfig(), constraint: Optional[Constraint] = None,
                eos_token_id=None, pad_token_id: Optional[int] = None,
                bucket: bool = True, length_multiple: int = 16) -> Generated:
    """Decode after a left-padded prompt `[b, t, hidden]` (mask `[b, t]`, 1 = real).

    With `bucket`, the batch is padded to a power of two and the prompt on the left to a
    multiple of `length_multiple` (masked), bounding recompiles; outputs are cut back to b rows.
    Right-padded prompts are refused (the next token would follow a pad). `eos_token_id`: an id or
    a list (any ends a sequence, as HF); default the config's `eos_token_id`(s).
    """
    mask = jnp.asarray(attention_mask).astype(bool)
    b, t = mask.shape
    if not bool(jnp.all(mask[:, -1] | ~jnp.any(mask, axis=1))):
        raise ValueError("generate_lm: prompts must be left-padded (the last position of every row is a pad)")
    if bucket:
        pb, pt = batch_bucket(b) - b, _round_up(t, length_multiple) - t
        inputs_embeds = jnp.pad(inputs_embeds, ((0, pb), (pt, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, pb), (pt, 0)))
    special = special_tokens(model, eos_token_id, pad_token_id)
    out = _generate(model, params, inputs_embeds, mask, cfg, special, constraint)
    return Generated(*(x[:b] for x in out))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prompt(cfg, params, *arrays) -> Packed:
    return SpeechVerseDecoder(cfg).apply({"params": params}, *arrays, method=SpeechVerseDecoder.prompt)


def generate_from_audio(cfg: SpeechVerseDecoderConfig, params: Any, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids,
             suffix_mask, gen_cfg=None, constraint=None, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None):
    """Audio + prompt parts -> `Generated` (KV-cache greedy / beam search, optional constraint)."""
    packed = _prompt(cfg, params, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask)
    return generate_lm(cfg.lm(), params["llm"], packed.embeddings, packed.mask, gen_cfg or GenerateConfig(),
                       constraint=constraint, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
