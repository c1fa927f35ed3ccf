"""Batched greedy and beam search over the T5 decoder, each inside one jitted `lax.while_loop`.

The caller runs the audio encoder and the T5 encoder once per batch and passes the T5 encoder
output and its mask; the decoder then reads cross-attention keys/values from the cache made by
`T5.init_cache` and writes one position per step. No host round trip happens per token.

    from speechverse_jax.decode.generate import GenerateConfig, generate
    enc, enc_mask = ...                                        # [b, s, d_model], [b, s]
    out = generate(T5(cfg), params['t5'], enc, enc_mask, GenerateConfig(max_new_tokens=64, num_beams=4))
    out.tokens   # int32 [b, max_new_tokens]: generated ids (EOS included), pad after EOS
    out.lengths  # int32 [b]: generated tokens, EOS included
    out.scores   # float32 [b]: greedy: sum of log-probs; beam: sum of log-probs / lengths ** length_penalty
    texts(tokenizer, out)                                      # -> list of strings

Semantics follow Hugging Face `generate` (transformers 5), which the parity tests check token for
token: greedy = argmax of the (processed) logits; beam search = HF's vectorised beam search with
`early_stopping=False` (the HF default): each step keeps the top 2k continuations, finished
hypotheses (EOS, or the length cap) enter a per-row pool of k scored with the length penalty,
and a row stops once its best running beam, normalised by the current length, cannot beat the
worst pooled hypothesis. Step `t` bans EOS while `t < min_new_tokens`.

Constrained decoding (`speechverse_jax.decode.constraints`) masks the log-probs with a token
automaton carried in the loop state. Masked log-probs are not renormalised: a constrained
hypothesis keeps its model probability, so labels are ranked by how likely the model finds them.

Shapes are static: `generate` pads the batch to a power of two and the encoder length to a
multiple of `length_multiple`, so the number of compiled programs is bounded by
(#batch buckets) x (#length buckets) x (#configs). Every array is batch-major (beams of a row are
adjacent), so the batch axis can be sharded over a mesh without any change here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.decode.constraints import START, Constraint, next_states
from speechverse_jax.models.layers import activation_sharding
from speechverse_jax.models.t5 import T5, expand_cache, reorder_cache

NEG = -1.0e9  # HF's "impossible" score; finite so that sums and comparisons stay well defined

StepFn = Callable[[jax.Array, Dict[str, Any]], Tuple[jax.Array, Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings (static: each distinct config compiles once)."""

    max_new_tokens: int = 64
    num_beams: int = 1  # 1 = greedy
    length_penalty: float = 1.0  # beam score = sum_logprobs / length ** length_penalty
    min_new_tokens: int = 0  # EOS is banned before this many tokens

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")


class Generated(NamedTuple):
    tokens: jax.Array  # int32 [b, max_new_tokens], pad after EOS
    lengths: jax.Array  # int32 [b], generated tokens including EOS
    scores: jax.Array  # float32 [b]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    start: int
    eos: int
    pad: int
    extra_eos: Tuple[int, ...] = ()  # more ids that end a sequence (Llama 3 Instruct lists several)

    def is_eos(self, tokens: jax.Array) -> jax.Array:
        out = tokens == self.eos
        for e in self.extra_eos:
            out = out | (tokens == e)
        return out


def _banned(vocab: int, t: jax.Array, states: Optional[jax.Array], constraint: Optional[Constraint],
            cfg: GenerateConfig, special: SpecialTokens):
    """Tokens not allowed at step t: (bool mask broadcastable to `[n, V]` or None, next automaton
    states `[n, V]` or None)."""
    ban, nxt = None, None
    if cfg.min_new_tokens:
        ban = (special.is_eos(jnp.arange(vocab)) & (t < cfg.min_new_tokens))[None]
    if constraint is not None:
        nxt = next_states(constraint, states, vocab)
        ban = (nxt < 0) if ban is None else (ban | (nxt < 0))
    return ban, nxt


def _log_probs(logits: jax.Array, t: jax.Array, states: Optional[jax.Array], constraint: Optional[Constraint],
               cfg: GenerateConfig, special: SpecialTokens):
    """logits `[n, V]` at step t -> (masked log-probs `[n, V]` float32, next automaton states `[n, V]` or None)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ban, nxt = _banned(logp.shape[-1], t, states, constraint, cfg, special)
    if ban is not None:
        logp = jnp.where(ban, -jnp.inf, logp)
    return logp, nxt


def _greedy_pick(logits: jax.Array, ban: Optional[jax.Array]):
    """(argmax token `[n]` of the logits outside `ban`, its masked log-prob `[n]`), without
    materialising the `[n, V]` log-probs: the same values as `log_softmax` + mask + argmax (the
    first maximum), in two plain reductions instead of XLA:CPU's slower arg-reduction."""
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    log_norm = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1))  # log_softmax's, from the unmasked logits
    allowed = x if ban is None else jnp.where(ban, -jnp.inf, x)
    best = jnp.max(allowed, axis=-1, keepdims=True)
    tok = jnp.min(jnp.where(allowed == best, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    tok = jnp.minimum(tok, vocab - 1)  # NaN logits: no maximum found
    picked = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
    logp = (picked - top[:, 0]) - log_norm
    if ban is not None:
        logp = jnp.where(jnp.take_along_axis(jnp.broadcast_to(ban, x.shape), tok[:, None], axis=-1)[:, 0],
                         -jnp.inf, logp)
    return tok, logp


def greedy_search(step: StepFn, cache: Dict[str, Any], cfg: GenerateConfig, special: SpecialTokens,
                  constraint: Optional[Constraint] = None) -> Generated:
    """Greedy decoding. `cache` (batch b) comes from `T5.init_cache(..., max_length=max_new_tokens)`."""
    b = cache["index"].shape[0]
    steps = cfg.max_new_tokens
    start_state = 0 if constraint is None else START
    init = dict(
        t=jnp.zeros((), jnp.int32),
        tokens=jnp.full((b, steps), special.pad, jnp.int32),
        last=jnp.full((b,), special.start, jnp.int32),
        done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32),
        scores=jnp.zeros((b,), jnp.float32),
        states=jnp.full((b,), start_state, jnp.int32),
        cache=cache,
    )

    def cond(s):
        return (s["t"] < steps) & ~jnp.all(s["done"])

    def body(s):
        logits, cache = step(s["last"], s["cache"])
        ban, nxt = _banned(logits.shape[-1], s["t"], s["states"], constraint, cfg, special)
        # argmax of the logits themselves (as HF), outside the banned tokens
        tok, tok_logp = _greedy_pick(logits, ban)
        tok = jnp.where(s["done"], special.pad, tok).astype(jnp.int32)
        states = s["states"] if nxt is None else jnp.take_along_axis(nxt, tok[:, None], axis=-1)[:, 0]
        live = ~s["done"]
        return dict(
            t=s["t"] + 1,
            tokens=s["tokens"].at[:, s["t"]].set(tok),
            last=tok,
            done=s["done"] | special.is_eos(tok),
            lengths=s["lengths"] + live,
            scores=s["scores"] + jnp.where(live, tok_logp, 0.0),
            states=jnp.where(live, states, s["states"]),
            cache=cache,
        )

    out = jax.lax.while_loop(cond, body, init)
    return Generated(out["tokens"], out["lengths"], out["scores"])


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x `[b, n, ...]`, idx `[b, m]` -> `[b, m, ...]` (per-row gather along axis 1)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(step: StepFn, cache: Dict[str, Any], cfg: GenerateConfig, special: SpecialTokens,
                constraint: Optional[Constraint] = None) -> Generated:
    """Beam search with k = cfg.num_beams. `cache` is `expand_cache(init_cache(...), k)`: b * k decoder
    rows (the beams of an example adjacent); moving a hypothesis to another row moves only the
    cache's small `slots` table (`reorder_cache`), never the keys/values."""
    k, steps = cfg.num_beams, cfg.max_new_tokens
    b = cache["index"].shape[0] // k
    wide = 2 * k  # candidates kept per step: enough that k of them are unfinished
    # lengths ** length_penalty in float64 on the host, as HF computes it in Python.
    denom = jnp.asarray(np.maximum(np.arange(steps + 1, dtype=np.float64), 1.0) ** cfg.length_penalty,
                        jnp.float32)
    start_state = 0 if constraint is None else START
    init = dict(
        t=jnp.zeros((), jnp.int32),
        # running beams: only beam 0 is live at first, so step 0 does not pick k copies of one token
        seqs=jnp.full((b, k, steps), special.pad, jnp.int32),
        scores=jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None].repeat(b, 0).astype(jnp.float32),
        last=jnp.full((b, k), special.start, jnp.int32),
        states=jnp.full((b, k), start_state, jnp.int32),
        # finished pool: the k best hypotheses that ended, scored with the length penalty
        fin_seqs=jnp.full((b, k, steps), special.pad, jnp.int32),
        fin_scores=jnp.full((b, k), NEG, jnp.float32),
        fin_lengths=jnp.zeros((b, k), jnp.int32),
        fin_flags=jnp.zeros((b, k), bool),
        open=jnp.ones((b,), bool),  # the row's pool can still improve (HF's early-stop heuristic)
        cache=cache,
    )

    def cond(s):
        return (s["t"] < steps) & jnp.any(s["open"])

    def body(s):
        t = s["t"]
        logits, cache = step(s["last"].reshape(b * k), s["cache"])
        logp, nxt = _log_probs(logits, t, s["states"].reshape(b * k), constraint, cfg, special)
        vocab = logp.shape[-1]
        total = (logp.reshape(b, k, vocab) + s["scores"][..., None]).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(total, wide)  # [b, 2k], sorted
        src = top_idx // vocab
        tok = (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather(s["seqs"], src).at[:, :, t].set(tok)
        top_states = (jnp.zeros_like(top_idx) if nxt is None
                      else jnp.take_along_axis(nxt.reshape(b, k * vocab), top_idx, axis=1))
        ended = special.is_eos(tok) | (t + 1 >= steps)

        # Running beams for the next step: the k best continuations that did not end.
        run_scores, run_idx = jax.lax.top_k(jnp.where(ended, top_scores + NEG, top_scores), k)
        beam_src = _gather(src, run_idx)
        flat_src = (jnp.arange(b)[:, None] * k + beam_src).reshape(b * k)
        cache = reorder_cache(cache, flat_src)

        # Finished pool: only the top k candidates may enter, and only while the row is open.
        enters = ended & (jnp.arange(wide) < k)[None] & s["open"][:, None]
        cand = jnp.where(enters, top_scores / denom[t + 1], NEG)
        pool_scores, pool_idx = jax.lax.top_k(jnp.concatenate([s["fin_scores"], cand], axis=1), k)
        pool_seqs = _gather(jnp.concatenate([s["fin_seqs"], top_seqs], axis=1), pool_idx)
        pool_lengths = _gather(jnp.concatenate([s["fin_lengths"], jnp.full((b, wide), t + 1)], axis=1), pool_idx)
        pool_flags = _gather(jnp.concatenate([s["fin_flags"], enters], axis=1), pool_idx)

        # HF early_stopping=False: stop a row once its best running beam, normalised by the
        # current length, is no better than the worst of a full pool.
        best_running = run_scores[:, 0] / denom[t + 1]
        worst_pooled = jnp.where(pool_flags, jnp.min(pool_scores, axis=1, keepdims=True), NEG)
        still_open = s["open"] & jnp.any(best_running[:, None] > worst_pooled, axis=1)
        return dict(
            t=t + 1,
            seqs=_gather(top_seqs, run_idx),
            scores=run_scores,
            last=_gather(tok, run_idx),
            states=_gather(top_states, run_idx),
            fin_seqs=pool_seqs,
            fin_scores=pool_scores,
            fin_lengths=pool_lengths,
            fin_flags=pool_flags,
            open=still_open,
            cache=cache,
        )

    out = jax.lax.while_loop(cond, body, init)
    return Generated(out["fin_seqs"][:, 0], out["fin_lengths"][:, 0], out["fin_scores"][:, 0])


@functools.partial(jax.jit, static_argnames=("model", "cfg", "sharding"))
def _generate(model: T5, params: Any, encoder_hidden: jax.Array, encoder_mask: jax.Array, cfg: GenerateConfig,
              constraint: Optional[Constraint], sharding=None) -> Generated:
    if sharding is not None:  # (mesh, rules): the activation / KV-cache constraints take effect in this trace
        with activation_sharding(*sharding):
            return _generate_body(model, params, encoder_hidden, encoder_mask, cfg, constraint)
    return _generate_body(model, params, encoder_hidden, encoder_mask, cfg, constraint)


def _generate_body(model, params, encoder_hidden, encoder_mask, cfg, constraint) -> Generated:
    t5 = model.cfg
    special = SpecialTokens(t5.decoder_start_token_id, t5.eos_token_id, t5.pad_token_id)
    variables = {"params": params}
    cache = model.apply(variables, encoder_hidden, encoder_mask, cfg.max_new_tokens, method=T5.init_cache)
    out_emb = model.apply(variables, method=T5.output_embedding)  # once, outside the loop

    def step(tokens, cache):
        return model.apply(variables, tokens, cache, output_embedding=out_emb, method=T5.decode_step)

    if cfg.num_beams == 1:
        return greedy_search(step, cache, cfg, special, constraint)
    cache = expand_cache(cache, cfg.num_beams)
    return beam_search(step, cache, cfg, special, constraint)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_bucket(n: int) -> int:
    """The padded batch size for n examples: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


def generate(model: T5, params: Any, encoder_hidden: jax.Array, encoder_mask: jax.Array,
             cfg: GenerateConfig = GenerateConfig(), constraint: Optional[Constraint] = None,
             bucket: bool = True, length_multiple: int = 16, sharding=None) -> Generated:
    """Decode from the T5 encoder output `[b, s, d_model]` (mask `[b, s]`) with `T5` params.

    The batch is padded to `batch_bucket(b)` and the encoder length to a multiple of
    `length_multiple` (masked, so results do not depend on it beyond float rounding) unless
    `bucket=False`; outputs are cut back to b rows. For a SpeechVerse model pass
    `models.speechverse.speechverse_t5(cfg)` and `params['t5']`. `sharding`: `(mesh, logical-axis rules)` when the
    inputs live on a mesh, so the activations and the KV cache are laid out by the rules.
    """
    b, s = encoder_mask.shape
    if bucket:
        pb, ps = batch_bucket(b) - b, _round_up(s, length_multiple) - s
        encoder_hidden = jnp.pad(encoder_hidden, ((0, pb), (0, ps), (0, 0)))
        encoder_mask = jnp.pad(encoder_mask.astype(bool), ((0, pb), (0, ps)))
    if sharding is not None:
        sharding = (sharding[0], tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in sharding[1]))
    out = _generate(model, params, encoder_hidden, encoder_mask.astype(bool), cfg, constraint, sharding)
    return Generated(*(x[:b] for x in out))


def texts(tokenizer, out: Generated) -> List[str]:
    """Generated ids -> strings (special tokens dropped) with a Hugging Face tokenizer."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)], skip_special_tokens=True)
