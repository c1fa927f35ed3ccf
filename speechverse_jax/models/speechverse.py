"""SpeechVerse: frozen WavLM -> layer combination -> conv downsampler -> frozen T5 (+ LoRA).

Composition only: the parts live in their own modules. The T5 encoder input is, per example,
`[valid audio frames, valid instruction tokens, padding]`: both parts are packed to the left so
an example's outputs do not depend on how much padding its batch carries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechverse_jax import rules, tree
from speechverse_jax.models.downsampler import LAYER_COMBINATIONS, Downsampler, LayerCombination
from speechverse_jax.models.layers import Dtype, LoRAConfig, constrain
from speechverse_jax.models.t5 import T5, T5Config
from speechverse_jax.models.wavlm import WavLM, WavLMConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class SpeechVerseConfig:
    """Everything that decides the shapes of the composed model."""

    wavlm: WavLMConfig
    t5: T5Config
    layer_combination: str = "last"
    downsample_strides: Tuple[int, ...] = (2, 2)
    downsample_kernel: int = 3
    lora: Optional[LoRAConfig] = None
    dtype: str = "float32"  # compute dtype
    frozen_param_dtype: str = "float32"  # storage of WavLM / T5 weights
    scan_layers: bool = False  # nn.scan over identical WavLM / T5 layers (params on a leading `layers` axis)
    remat: str = "none"  # per T5 block: none | full | dots_saveable | dots_with_no_batch_dims_saveable
    # target positions per chunk of the training loss's LM head + softmax (0: all at once); a chunk's
    # logits are recomputed in the backward pass, so `[b, target, vocab]` float32 logits never exist
    loss_chunk: int = 0

    def __post_init__(self):
        if int(self.loss_chunk) < 0:
            raise ValueError(f"model.loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        if self.layer_combination not in LAYER_COMBINATIONS:
            raise ValueError(
                f"model.layer_combination must be one of {LAYER_COMBINATIONS}, got {self.layer_combination!r}"
            )
        if not self.downsample_strides or any(int(s) < 1 for s in self.downsample_strides):
            raise ValueError(f"model.downsampler.strides must be positive integers, got {self.downsample_strides}")
        if self.downsample_kernel < 1 or self.downsample_kernel % 2 != 1:
            raise ValueError(f"model.downsampler.kernel_size must be a positive odd number, got {self.downsample_kernel}")
        from speechverse_jax.models.layers import remat_policy

        remat_policy(self.remat)  # raises on an unknown name
        for field in ("dtype", "frozen_param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"model.{field} must be one of {sorted(DTYPES)}, got {getattr(self, field)!r}")

    @property
    def compute_dtype(self) -> Dtype:
        return DTYPES[self.dtype]

    @property
    def downsample_factor(self) -> int:
        factor = 1
        for s in self.downsample_strides:
            factor *= int(s)
        return factor


def speechverse_t5(cfg: SpeechVerseConfig) -> T5:
    """The T5 of `SpeechVerse(cfg)` (same LoRA and dtypes): the one place it is built, so
    generation can run it alone on `params['t5']`."""
    return T5(cfg.t5, lora=cfg.lora, dtype=cfg.compute_dtype, param_dtype=DTYPES[cfg.frozen_param_dtype],
              scan_layers=cfg.scan_layers, remat=cfg.remat)


class AudioEmbeddings(NamedTuple):
    embeddings: jax.Array  # [batch, audio_tokens, d_model]
    mask: jax.Array  # [batch, audio_tokens] bool


def pack_left(
    first: jax.Array, first_mask: jax.Array, second: jax.Array, second_mask: jax.Array
) -> Tuple[jax.Array, jax.Array]:
    """Concatenate two padded sequences per example so valid items come first.

    first `[b, n, d]`, second `[b, m, d]` (masks `[b, n]`, `[b, m]`, valid items at the start)
    -> `[b, n + m, d]` holding `first[:len1] ++ second[:len2] ++ zeros`, and its mask.
    """
    n, m = first.shape[1], second.shape[1]
    len1 = first_mask.sum(-1, keepdims=True)  # [b, 1]
    len2 = second_mask.sum(-1, keepdims=True)
    pos = jnp.arange(n + m)[None, :]  # [1, n+m]
    from_first = pos < len1
    from_second = (pos >= len1) & (pos < len1 + len2)
    idx1 = jnp.clip(pos, 0, n - 1)
    idx2 = jnp.clip(pos - len1, 0, m - 1)
    g1 = jnp.take_along_axis(first, jnp.broadcast_to(idx1, from_first.shape)[..., None], axis=1)
    g2 = jnp.take_along_axis(second, idx2[..., None], axis=1)
    out = jnp.where(from_first[..., None], g1, jnp.where(from_second[..., None], g2, 0))
    return out.astype(first.dtype), from_first | from_second


class SpeechVerse(nn.Module):
    """The composed model. Params: `{'wavlm', 'layer_weights', 'downsampler', 't5'}`."""

    cfg: SpeechVerseConfig

    def setup(self):
        cfg = self.cfg
        dtype, frozen = cfg.compute_dtype, DTYPES[cfg.frozen_param_dtype]
        self.wavlm = WavLM(cfg.wavlm, dtype=dtype, param_dtype=frozen, scan_layers=cfg.scan_layers)
        self.layer_weights = LayerCombination(cfg.layer_combination, dtype=dtype)
        self.downsampler = Downsampler(
            features=cfg.t5.d_model, strides=tuple(cfg.downsample_strides),
            kernel_size=cfg.downsample_kernel, dtype=dtype,
        )
        self.t5 = speechverse_t5(cfg)

    def encode_audio(self, audio: jax.Array, audio_mask: jax.Array) -> Tuple[Tuple[jax.Array, ...], jax.Array]:
        """Frozen WavLM: audio `[b, samples]` -> (L+1 hidden states `[b, frames, dim]`, frame mask).

        The last entry is WavLM's final output (`last_hidden_state`, after the encoder's final
        LayerNorm in the large family), i.e. "the last layer" of the paper; transformers 5 itself
        lists the un-normalised state there in `hidden_states`.
        """
        out = self.wavlm(audio, audio_mask)
        hidden = out.hidden_states[:-1] + (out.last_hidden_state,)
        return tuple(jax.lax.stop_gradient(h) for h in hidden), out.frame_mask

    def adapt(self, hidden_states: Tuple[jax.Array, ...], frame_mask: jax.Array) -> AudioEmbeddings:
        """Layer combination + downsampler: hidden states -> audio tokens `[b, n, d_model]`.

        Takes the encoder's hidden states, so cached encoder outputs can be fed directly.
        """
        combined = self.layer_weights(hidden_states)
        emb, mask = self.downsampler(combined, frame_mask)
        return AudioEmbeddings(emb, mask)

    def encode(
        self, audio_tokens: AudioEmbeddings, instruction_ids: jax.Array, instruction_mask: jax.Array,
        deterministic: bool = True,
    ) -> Tuple[jax.Array, jax.Array]:
        """T5 encoder over `[audio tokens, instruction tokens]` -> (`[b, n + m, d_model]`, mask)."""
        text = self.t5.embed(instruction_ids)
        inputs, mask = pack_left(audio_tokens.embeddings, audio_tokens.mask, text.astype(audio_tokens.embeddings.dtype), instruction_mask.astype(bool))
        inputs = constrain(inputs, ("batch", "length", "embed"))
        hidden = self.t5.encode(inputs, mask, deterministic=deterministic)
        return hidden, mask

    def __call__(
        self,
        audio: jax.Array,
        audio_mask: jax.Array,
        instruction_ids: jax.Array,
        instruction_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_mask: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits `[b, target_len, vocab]` from raw audio `[b, samples]`."""
        hidden, frame_mask = self.encode_audio(audio, audio_mask)
        return self.from_hidden_states(
            hidden, frame_mask, instruction_ids, instruction_mask, decoder_input_ids, decoder_mask, deterministic
        )

    def from_hidden_states(
        self,
        hidden_states: Tuple[jax.Array, ...],
        frame_mask: jax.Array,
        instruction_ids: jax.Array,
        instruction_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_mask: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits from precomputed (e.g. cached) encoder hidden states."""
        audio_tokens = self.adapt(hidden_states, frame_mask)
        enc, enc_mask = self.encode(audio_tokens, instruction_ids, instruction_mask, deterministic)
        return self.t5.decode(decoder_input_ids, enc, enc_mask, decoder_mask=decoder_mask, deterministic=deterministic)

    def target_nll_from_hidden_states(self, hidden_states, frame_mask, instruction_ids, instruction_mask,
                                      decoder_input_ids, target_ids, decoder_mask=None, deterministic: bool = True):
        """Teacher-forced per-token NLL `[b, target_len]` (float32, unmasked) of `target_ids`: the
        training loss. With `cfg.loss_chunk > 0` the LM head and the softmax run that many target
        positions at a time (`chunked_token_nll`); the value is the same as from the logits."""
        audio_tokens = self.adapt(hidden_states, frame_mask)
        enc, enc_mask = self.encode(audio_tokens, instruction_ids, instruction_mask, deterministic)
        chunk = int(self.cfg.loss_chunk)
        if not chunk or chunk >= target_ids.shape[1]:
            return token_nll(self.t5.decode(decoder_input_ids, enc, enc_mask, decoder_mask=decoder_mask,
                                            deterministic=deterministic), target_ids)
        h = self.t5.decode_hidden(decoder_input_ids, enc, enc_mask, decoder_mask, deterministic)
        return chunked_token_nll(self, lambda mdl, x: mdl.t5.output_logits(x), h, target_ids, chunk)

    def target_nll(self, audio, audio_mask, instruction_ids, instruction_mask, decoder_input_ids, target_ids,
                   decoder_mask=None, deterministic: bool = True):
        """From raw audio `[b, samples]`; see `target_nll_from_hidden_states`."""
        hidden, frame_mask = self.encode_audio(audio, audio_mask)
        return self.target_nll_from_hidden_states(hidden, frame_mask, instruction_ids, instruction_mask,
                                                  decoder_input_ids, target_ids, decoder_mask, deterministic)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Cross-entropy over target tokens only.

    logits `[b, t, vocab]`, targets `[b, t]` int, mask `[b, t]` -> (mean loss over unmasked tokens,
    per-example summed loss `[b]`). Computed in float32.
    """
    nll = jnp.where(mask, token_nll(logits, targets), 0.0)
    per_example = nll.sum(-1)
    return per_example.sum() / jnp.maximum(mask.sum(), 1), per_example


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits `[..., vocab]`, int targets `[...]` -> negative log-likelihood `[...]` in float32."""
    logits = logits.astype(jnp.float32)
    # The target logit picked by a one-hot compare rather than take_along_axis, whose backward
    # scatters into a zero [b, t, vocab] buffer (measured 2-4% of a CPU train step).
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None].astype(jnp.int32)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def chunked_token_nll(module: nn.Module, head: Callable[[nn.Module, jax.Array], jax.Array], hidden: jax.Array,
                      targets: jax.Array, chunk: int) -> jax.Array:
    """Per-token NLL `[b, t]` (float32) from final hidden states `[b, t, d]`, `chunk` positions at a
    time: `head(module, h [b, chunk, d]) -> logits [b, chunk, vocab]` runs under `nn.scan` and
    `nn.remat`, so only one chunk's logits exist at once, in the forward and the backward pass
    (recomputed there), instead of `[b, t, vocab]` in float32 and its gradient. Same value as
    `token_nll(head(module, hidden), targets)`; positions past `t` (padding to a whole chunk) are dropped.
    """
    b, t, d = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    xs = (jnp.swapaxes(hidden.reshape(b, n, chunk, d), 0, 1), jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1))

    def one_chunk(mdl, carry, chunk_xs):
        h, tgt = chunk_xs
        logits = constrain(head(mdl, h), ("batch", "length", "vocab"))
        return carry, token_nll(logits, tgt)

    scan = nn.scan(nn.remat(one_chunk, prevent_cse=False), variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=0, out_axes=0, length=n)
    _, nll = scan(module, None, xs)  # [n, b, chunk]
    return jnp.swapaxes(nll, 0, 1).reshape(b, n * chunk)[:, :t]


def init_params(cfg: SpeechVerseConfig, rng: jax.Array, batch: int = 1, samples: int = 16000, text_len: int = 8) -> Any:
    """Random params (boxed with logical axes) for shape inference and tests."""
    model = SpeechVerse(cfg)
    audio = jnp.zeros((batch, samples), jnp.float32)
    ids = jnp.zeros((batch, text_len), jnp.int32)
    params = model.init(rng, audio, jnp.ones_like(audio, bool), ids, jnp.ones_like(ids, bool), ids)["params"]
    if cfg.lora is not None:  # a LoRA target regex that adapts nothing is a mistake, not a no-op
        rules.check_used([cfg.lora.target_regex], sorted({k.rsplit("/", 1)[0] for k in tree.flatten(params)}),
                         "model.lora.target_regex")
    return params


def abstract_params(cfg: SpeechVerseConfig, init_fn=None) -> Any:
    """Shape-only params (`jax.ShapeDtypeStruct` leaves, unboxed) of the composed model
    (`init_fn(cfg, rng)`: another layout's `init_params`; default this module's)."""
    init_fn = init_fn or init_params
    return nn.unbox(jax.eval_shape(lambda r: init_fn(cfg, r), jax.random.PRNGKey(0)))


def init_params_subset(cfg: SpeechVerseConfig, rng: jax.Array, keep, out_shardings=None, init_fn=None) -> dict:
    """Random init of only the leaves whose '/'-joined path satisfies `keep(path)`.

    Runs `init` under jit and returns the kept leaves only, so XLA drops the work for the rest:
    initialising the adaptor and LoRA of a 3B model does not materialise its frozen weights.
    `out_shardings` (a flat dict path -> sharding) creates the leaves directly where they belong.
    `init_fn(cfg, rng)`: another layout's `init_params` (default this module's).
    """
    init_fn = init_fn or init_params

    def fn(rng):
        return {k: v for k, v in tree.flatten(nn.unbox(init_fn(cfg, rng))).items() if keep(k)}

    return tree.unflatten(jax.jit(fn, out_shardings=out_shardings)(rng))
