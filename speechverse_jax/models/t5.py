"""T5 encoder-decoder (T5 v1.0 and v1.1 / Flan-T5) in flax.linen, numerically matching HF.

Params (a plain nested dict; LoRA adapters sit inside the projections they adapt):

    shared/embedding                                   [vocab, d_model]
    {encoder,decoder}/relative_attention_bias/embedding [buckets, heads]
    {encoder,decoder}/block_{i}/self_attention/{q,k,v,o}/kernel
    {encoder,decoder}/block_{i}/self_attention_norm/scale
    decoder/block_{i}/cross_attention/{q,k,v,o}/kernel, decoder/block_{i}/cross_attention_norm/scale
    {encoder,decoder}/block_{i}/mlp/{wi | wi_0, wi_1, wo}/kernel, .../mlp_norm/scale
    {encoder,decoder}/final_norm/scale
    lm_head/kernel                                     [d_model, vocab]   (untied models only)

Incremental decoding uses an explicit cache pytree (see `T5.init_cache`), every leaf batch-major,
so a `lax.while_loop` can carry it. Keys/values are stored head-major (`[b, heads, L, d_kv]`), the
layout in which a one-token step reads them without transposes. Beam search expands the cache
with `expand_cache` (beams share the cross-attention keys/values) and moves hypotheses with
`reorder_cache`, which gathers a small `slots` table instead of the keys/values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechverse_jax.models.layers import Dense, Dtype, LoRAConfig, constrain, layer_class

FEED_FORWARD_PROJ = ("relu", "gated-gelu")
ACT = ("batch", "length", "embed")
CACHE_AXES = ("batch", "heads", "length", None)


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True  # True: output = shared^T with d_model**-0.5 scaling (T5 v1.0)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dropout_rate: float = 0.1

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_max_distance"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"t5 config: {f} must be a positive integer, got {v!r}")
        b = self.relative_attention_num_buckets
        if not isinstance(b, int) or b < 4:
            raise ValueError(f"t5 config: relative_attention_num_buckets must be an integer >= 4, got {b!r}")
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(
                f"t5 config: feed_forward_proj must be one of {FEED_FORWARD_PROJ}, got {self.feed_forward_proj!r}"
            )
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"t5 config: dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not float(self.layer_norm_epsilon) > 0:
            raise ValueError(f"t5 config: layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        for f in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ValueError(f"t5 config: {f} must be a token id in [0, {self.vocab_size}), got {v!r}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_hf(cls, d: Dict[str, Any]) -> "T5Config":
        """From an HF `config.json` dict (T5, mT5, Flan-T5).

        Tied vs untied output: transformers 5 always writes `tie_word_embeddings: true` and
        records the real switch as `scale_decoder_outputs` (False for v1.1 / Flan-T5), so that key
        wins when present; older configs say `tie_word_embeddings: false` for untied models.
        """
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"t5 config: model_type must be 't5' or 'mt5', got {model_type!r}")
        if d.get("is_encoder_decoder", True) is not True:
            raise ValueError(f"t5 config: is_encoder_decoder must be true, got {d.get('is_encoder_decoder')!r}")
        if d.get("is_decoder", False):
            raise ValueError("t5 config: is_decoder must be false for an encoder-decoder checkpoint")
        if "scale_decoder_outputs" in d:
            tied = bool(d["scale_decoder_outputs"])
        else:
            tied = bool(d.get("tie_word_embeddings", True))
        num_layers = d.get("num_layers", 6)
        num_dec = d.get("num_decoder_layers")
        pad = d.get("pad_token_id", 0)
        start = d.get("decoder_start_token_id")
        return cls(
            vocab_size=d.get("vocab_size", 32128),
            d_model=d.get("d_model", 512),
            d_kv=d.get("d_kv", 64),
            d_ff=d.get("d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=num_layers if num_dec is None else num_dec,
            num_heads=d.get("num_heads", 8),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=d.get("feed_forward_proj", "relu"),
            tie_word_embeddings=tied,
            pad_token_id=pad,
            eos_token_id=d.get("eos_token_id", 1),
            decoder_start_token_id=pad if start is None else start,  # T5 starts decoding from pad
            dropout_rate=float(d.get("dropout_rate", 0.1)),
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "T5Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"t5 config: unknown fields {unknown}")
        return cls(**d)


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """HF `_shift_right`: `[start, labels[:-1]]`, with -100 (ignored labels) replaced by pad."""
    if decoder_start_token_id is None:
        raise ValueError("t5 config: decoder_start_token_id must be set to shift labels")
    if pad_token_id is None:
        raise ValueError("t5 config: pad_token_id must be set to shift labels")
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Mesh-TF / HF T5 bucketing of `memory_position - query_position` (int32 in [0, num_buckets))."""
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # Same float32 op order as HF, so the buckets agree exactly at the boundaries.
    scaled = (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scaling (T5 folds it into the init)."""

    cfg: T5Config
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        inner = self.cfg.num_heads * self.cfg.d_kv
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q = Dense(inner, ("embed", "heads"), **kw)
        self.k = Dense(inner, ("embed", "heads"), **kw)
        self.v = Dense(inner, ("embed", "heads"), **kw)
        self.o = Dense(self.cfg.d_model, ("heads", "embed"), **kw)
        self.attn_dropout = nn.Dropout(self.cfg.dropout_rate)

    def kv(self, x: jax.Array, deterministic: bool = True):
        """Keys and values `[b, s, heads*d_kv]` of `x`."""
        return self.k(x, deterministic), self.v(x, deterministic)

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array], mask: jax.Array,
               deterministic: bool = True) -> jax.Array:
        """x `[b, t, d]` attends to k, v `[b, s, heads*d_kv]`; bias broadcasts to `[b, h, t, s]`, mask too (bool)."""
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        q = self.q(x, deterministic)
        b, t, _ = q.shape
        s = k.shape[1]
        q = q.reshape(b, t, h, dk)
        k = k.astype(self.dtype).reshape(b, s, h, dk)
        v = v.astype(self.dtype).reshape(b, s, h, dk)
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = self.attn_dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bhts,bshd->bthd", weights.astype(self.dtype), v).reshape(b, t, h * dk)
        return self.o(out, deterministic)

    def kv_heads(self, x: jax.Array, deterministic: bool = True):
        """Keys and values of `x` `[b, s, d]` head-major, `[b, heads, s, d_kv]` (the decoding cache layout)."""
        b, s, _ = x.shape
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        k, v = self.kv(x, deterministic)
        return (jnp.transpose(k.reshape(b, s, h, dk), (0, 2, 1, 3)),
                jnp.transpose(v.reshape(b, s, h, dk), (0, 2, 1, 3)))

    def attend_step(self, x: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array], mask: jax.Array,
                    deterministic: bool = True) -> jax.Array:
        """One query per row (incremental decoding) against a head-major cache.

        x `[g * r, 1, d]`: g groups of r adjacent rows (r = beams of an example); k, v
        `[g, heads, s, d_kv]`, read by all r rows of a group; bias `[g, heads, r, s]` or None;
        mask (bool) broadcastable to `[g, heads, r, s]`. Both contractions are batched over
        (group, head) with the cache's minor axes as the contracted / free ones, so a step never
        transposes or copies the cache (only the small query and output).
        """
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        q = self.q(x, deterministic)
        n = q.shape[0]
        g = k.shape[0]
        r = n // g
        q = jnp.transpose(q.reshape(g, r, h, dk), (0, 2, 1, 3))  # [g, h, r, dk]
        scores = jnp.einsum("ghrd,ghsd->ghrs", q, k.astype(self.dtype), preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = self.attn_dropout(weights, deterministic=deterministic)
        out = jnp.einsum("ghrs,ghsd->ghrd", weights.astype(self.dtype), v.astype(self.dtype))
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(n, 1, h * dk)
        return self.o(out, deterministic)

    def __call__(self, x, kv_input, bias, mask, deterministic: bool = True):
        k, v = self.kv(kv_input, deterministic)
        return self.attend(x, k, v, bias, mask, deterministic)


class MLP(nn.Module):
    cfg: T5Config
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cfg.is_gated:
            self.wi_0 = Dense(self.cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = Dense(self.cfg.d_ff, ("embed", "mlp"), **kw)
        else:
            self.wi = Dense(self.cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = Dense(self.cfg.d_model, ("mlp", "embed"), **kw)
        self.dropout = nn.Dropout(self.cfg.dropout_rate)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.cfg.is_gated:  # gated-gelu = gelu_new (tanh approximation)
            h = jax.nn.gelu(self.wi_0(x, deterministic), approximate=True) * self.wi_1(x, deterministic)
        else:
            h = jax.nn.relu(self.wi(x, deterministic))
        h = constrain(h, ("batch", "length", "mlp"))
        h = self.dropout(h, deterministic=deterministic)
        return self.wo(h, deterministic)


def _write_step(cache: jax.Array, new: jax.Array, index: jax.Array, length: int) -> jax.Array:
    """Write one position per decoder row into a head-major cache.

    cache `[g, heads, r * length, d_kv]`, new `[g * r, 1, heads * d_kv]`, index `[g * r]`: row
    (i, j) (beam j of group i) writes at `[i, :, j * length + index]`.
    """
    g, h, _, dk = cache.shape
    n = new.shape[0]
    r = n // g
    rows = jnp.arange(n, dtype=jnp.int32)
    return cache.at[rows // r, :, (rows % r) * length + index, :].set(new.reshape(n, h, dk).astype(cache.dtype))


def expand_cache(cache: Dict[str, Any], num_beams: int) -> Dict[str, Any]:
    """A fresh `T5.init_cache` cache for b examples -> one for b * num_beams decoder rows (the
    beams of an example adjacent).

    Cross-attention keys/values and the encoder mask stay at b rows, shared by the beams. The
    self-attention keys/values become `[b, heads, num_beams * L, d_kv]`: beam j of an example
    writes its positions at `j * L + t`. `slots` (int32 `[b * num_beams, L]`) says, for each
    row and position t, which beam's block holds the keys/values that row's hypothesis saw at
    t. Beam search moves hypotheses between rows with `reorder_cache`, which gathers `slots`
    and `index` only; the keys/values never move.
    """
    if num_beams == 1:
        return cache
    b, length = cache["index"].shape[0], cache_length(cache)
    out = dict(cache, index=jnp.repeat(cache["index"], num_beams, axis=0),
               slots=jnp.zeros((b * num_beams, length), jnp.int32))
    for name, layer in cache.items():
        if name.startswith("block_") or name == "blocks":  # scanned: [layers, b, heads, L, d_kv]
            reps = (1,) * (layer["self_k"].ndim - 2) + (num_beams, 1)
            out[name] = dict(layer, self_k=jnp.tile(layer["self_k"], reps), self_v=jnp.tile(layer["self_v"], reps))
    return out


def cache_length(cache: Dict[str, Any]) -> int:
    """Positions per decoder row block of a cache (its self-attention keys' length axis)."""
    layer = cache["blocks"] if "blocks" in cache else cache["block_0"]
    return layer["self_k"].shape[-2]


def reorder_cache(cache: Dict[str, Any], rows: jax.Array) -> Dict[str, Any]:
    """Row i of the result continues the hypothesis of row `rows[i]` (int `[n]`).

    For an `expand_cache` cache the source row must be a beam of the same example; only `slots`
    and `index` are gathered. For a cache with one row per example every leaf is gathered.
    """
    def take(x, axis=0):
        return jnp.take(x, rows, axis=axis)

    if "slots" not in cache:
        out = jax.tree_util.tree_map(take, {k: v for k, v in cache.items() if k != "blocks"})
        if "blocks" in cache:  # scanned layout: the layer axis first, then the batch
            out["blocks"] = jax.tree_util.tree_map(lambda x: take(x, 1), cache["blocks"])
        return out
    return dict(cache, slots=take(cache["slots"]), index=take(cache["index"]))


class Block(nn.Module):
    cfg: T5Config
    is_decoder: bool = False
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        nkw = dict(epsilon=self.cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        self.self_attention = Attention(self.cfg, **kw)
        self.self_attention_norm = RMSNorm(**nkw)
        if self.is_decoder:
            self.cross_attention = Attention(self.cfg, **kw)
            self.cross_attention_norm = RMSNorm(**nkw)
        self.mlp = MLP(self.cfg, **kw)
        self.mlp_norm = RMSNorm(**nkw)
        self.dropout = nn.Dropout(self.cfg.dropout_rate)

    def _cross_and_mlp(self, x, cross_k, cross_v, cross_mask, deterministic):
        if self.is_decoder:
            h = self.cross_attention_norm(x)
            y = self.cross_attention.attend(h, cross_k, cross_v, None, cross_mask, deterministic)
            x = x + self.dropout(y, deterministic=deterministic)
        y = self.mlp(self.mlp_norm(x), deterministic)
        x = x + self.dropout(y, deterministic=deterministic)
        return constrain(x, ACT)

    def __call__(self, x, self_bias, self_mask, enc=None, cross_mask=None, deterministic: bool = True):
        h = self.self_attention_norm(x)
        x = x + self.dropout(self.self_attention(h, h, self_bias, self_mask, deterministic),
                             deterministic=deterministic)
        cross_k = cross_v = None
        if self.is_decoder:
            cross_k, cross_v = self.cross_attention.kv(enc, deterministic)
        return self._cross_and_mlp(x, cross_k, cross_v, cross_mask, deterministic)

    def cross_kv(self, enc: jax.Array):
        """Cross-attention keys/values of the encoder output, head-major `[b, heads, s, d_kv]`."""
        return self.cross_attention.kv_heads(enc, True)

    def step(self, x, layer_cache, index, length, self_bias, self_mask, cross_mask, deterministic: bool = True):
        """One decoder position: x `[n, 1, d]`; the new key/value go into the cache at `index`."""
        h = self.self_attention_norm(x)
        k_new, v_new = self.self_attention.kv(h, deterministic)
        k = _write_step(layer_cache["self_k"], k_new, index, length)
        v = _write_step(layer_cache["self_v"], v_new, index, length)
        y = self.self_attention.attend_step(h, k, v, self_bias, self_mask, deterministic)
        x = x + self.dropout(y, deterministic=deterministic)
        h = self.cross_attention_norm(x)
        y = self.cross_attention.attend_step(h, layer_cache["cross_k"], layer_cache["cross_v"], None, cross_mask,
                                             deterministic)
        x = x + self.dropout(y, deterministic=deterministic)
        y = self.mlp(self.mlp_norm(x), deterministic)
        x = x + self.dropout(y, deterministic=deterministic)
        return constrain(x, ACT), dict(layer_cache, self_k=k, self_v=v)


class LayerBlock(Block):
    """A `Block` behind one signature for `nn.scan` / `nn.remat`:
    `(carry, xs, consts, mode, deterministic) -> (carry, ys)`, `mode` a static tuple:

      ("full",):        carry x `[b, t, d]`; consts (self_bias, self_mask, enc, cross_mask); ys None
      ("cross_kv",):    carry unused; consts (enc,); ys the head-major cross keys/values
      ("step", length): carry x `[n, 1, d]`; xs the layer's cache; consts (index, self_bias,
                        self_mask, cross_mask); ys the layer's updated cache
    """

    def __call__(self, x, xs, consts, mode, deterministic: bool = True):
        if mode[0] == "full":
            return super().__call__(x, *consts, deterministic=deterministic), None
        if mode[0] == "cross_kv":
            return x, self.cross_kv(consts[0])
        if mode[0] == "step":
            index, self_bias, self_mask, cross_mask = consts
            return self.step(x, xs, index, mode[1], self_bias, self_mask, cross_mask, deterministic)
        raise ValueError(f"t5 block: unknown mode {mode!r}")


class Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention) stack.

    `scan_layers`: the blocks run under `nn.scan`, params stacked on a leading `layers` axis
    (`blocks/...` instead of `block_{i}/...`; `models/scan_layout.py` converts between the two).
    The relative-position bias lives in the stack, not in block 0, so every block is identical.
    `remat`: a `model.remat` policy name applied to each block.
    """

    cfg: T5Config
    is_decoder: bool = False
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @property
    def num_blocks(self) -> int:
        return self.cfg.num_decoder_layers if self.is_decoder else self.cfg.num_layers

    def setup(self):
        cfg = self.cfg
        self.relative_attention_bias = nn.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", None)),
            dtype=jnp.float32, param_dtype=self.param_dtype,
        )
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        cls = layer_class(LayerBlock, self.remat, static_argnums=(4, 5), scanned=self.scan_layers)
        if self.scan_layers:
            self.blocks = nn.scan(
                cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.is_decoder, **kw)
        else:
            for i in range(self.num_blocks):
                setattr(self, f"block_{i}", cls(cfg, self.is_decoder, **kw))
        self.final_norm = RMSNorm(cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def block_list(self):
        return [getattr(self, f"block_{i}") for i in range(self.num_blocks)]

    def _run(self, x, caches, consts, mode, deterministic):
        """Every block in turn (scanned or unrolled); caches / ys: stacked, or a list per block."""
        if self.scan_layers:
            return self.blocks(x, caches, consts, mode, deterministic)
        ys = []
        for i, block in enumerate(self.block_list()):
            x, y = block(x, None if caches is None else caches[i], consts, mode, deterministic)
            ys.append(y)
        return x, ys

    def _bias(self, relative_position: jax.Array) -> jax.Array:
        """relative positions `[..., q, k]` -> bias `[..., heads, q, k]` (float32)."""
        buckets = relative_position_bucket(relative_position, not self.is_decoder,
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return jnp.moveaxis(self.relative_attention_bias(buckets), -1, -3)

    def __call__(self, x, mask=None, enc=None, enc_mask=None, deterministic: bool = True):
        """Whole sequence. x `[b, t, d]` (embeddings), mask `[b, t]`; decoder: enc `[b, s, d]`, enc_mask `[b, s]`."""
        b, t, _ = x.shape
        x = constrain(self.dropout(x.astype(self.dtype), deterministic=deterministic), ACT)
        pos = jnp.arange(t)
        bias = self._bias(pos[None, :] - pos[:, None])[None]  # [1, h, t, t]
        keep = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        self_mask = keep[:, None, None, :]
        cross_mask = None
        if self.is_decoder:
            self_mask = self_mask & (pos[None, :] <= pos[:, None])[None, None]
            cross_mask = enc_mask.astype(bool)[:, None, None, :]
        x, _ = self._run(x, None, (bias, self_mask, enc, cross_mask), ("full",), deterministic)
        x = self.final_norm(x)
        return constrain(self.dropout(x, deterministic=deterministic), ACT)

    def init_cache(self, enc: jax.Array, enc_mask: jax.Array, max_length: int) -> Dict[str, Any]:
        b = enc.shape[0]
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        cache: Dict[str, Any] = {"index": jnp.zeros((b,), jnp.int32), "encoder_mask": enc_mask.astype(bool)}
        _, kv = self._run(jnp.zeros((), self.dtype), None, (enc.astype(self.dtype),), ("cross_kv",), True)
        if self.scan_layers:  # every leaf [layers, b, heads, length, d_kv]
            axes = ("layers",) + CACHE_AXES
            zeros = jnp.zeros((self.num_blocks, b, h, max_length, dk), self.dtype)
            cache["blocks"] = {"self_k": constrain(zeros, axes), "self_v": constrain(zeros, axes),
                               "cross_k": constrain(kv[0], axes), "cross_v": constrain(kv[1], axes)}
            return cache
        for i, (ck, cv) in enumerate(kv):
            zeros = jnp.zeros((b, h, max_length, dk), self.dtype)
            cache[f"block_{i}"] = {
                "self_k": constrain(zeros, CACHE_AXES),
                "self_v": constrain(zeros, CACHE_AXES),
                "cross_k": constrain(ck, CACHE_AXES),
                "cross_v": constrain(cv, CACHE_AXES),
            }
        return cache

    def step(self, x: jax.Array, cache: Dict[str, Any], deterministic: bool = True):
        """x `[n, 1, d]` (embedding of the current token) -> (hidden `[n, 1, d]`, new cache).

        n = g * r decoder rows for a cache of g examples: r = 1, or r beams per example after
        `expand_cache` (then the cache has `slots`).
        """
        index = cache["index"]
        n = index.shape[0]
        g = cache["encoder_mask"].shape[0]
        r = n // g
        if r * g != n or (r > 1) != ("slots" in cache):
            raise ValueError(f"t5 decode_step: {n} rows for a cache of {g} examples needs expand_cache")
        length = cache_length(cache) // r
        x = self.dropout(x.astype(self.dtype), deterministic=deterministic)
        keys = jnp.arange(length)
        # the relative-position bias of the single new query row only
        buckets = relative_position_bucket(keys[None, :] - index[:, None], False,
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        bias = self.relative_attention_bias(buckets)  # [n, L, heads]
        bias = jnp.transpose(bias.reshape(g, r, length, -1), (0, 3, 1, 2))  # [g, heads, r, L]
        causal = (keys[None, :] <= index[:, None]).reshape(g, 1, r, length)
        new_cache = dict(cache, index=index + 1)
        if r == 1:
            self_mask = causal
        else:  # key position j * L + t is visible to a row iff its hypothesis took position t from beam j
            slots = cache["slots"].at[jnp.arange(n), index].set(jnp.arange(n, dtype=jnp.int32) % r)
            new_cache["slots"] = slots
            own = slots.reshape(g, 1, r, 1, length) == jnp.arange(r, dtype=jnp.int32)[None, None, None, :, None]
            self_mask = (own & causal[:, :, :, None, :]).reshape(g, 1, r, r * length)
            bias = jnp.tile(bias, (1, 1, 1, r))
        cross_mask = cache["encoder_mask"][:, None, None, :]
        consts = (index, bias, self_mask, cross_mask)
        if self.scan_layers:
            x, new_cache["blocks"] = self.blocks(x, cache["blocks"], consts, ("step", length), deterministic)
        else:
            x, layers = self._run(x, [cache[f"block_{i}"] for i in range(self.num_blocks)], consts,
                                  ("step", length), deterministic)
            new_cache.update({f"block_{i}": layer for i, layer in enumerate(layers)})
        x = self.final_norm(x)
        return self.dropout(x, deterministic=deterministic), new_cache


class T5(nn.Module):
    """T5ForConditionalGeneration. Call `embed`, `encode`, `decode`, `init_cache`, `decode_step` via
    `apply(..., method=...)`; `__call__` runs everything (and is what `init` uses)."""

    cfg: T5Config
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False  # see `Stack`
    remat: str = "none"

    def setup(self):
        cfg = self.cfg
        self.shared = nn.Embed(
            cfg.vocab_size, cfg.d_model,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        stack_kw = dict(kw, scan_layers=self.scan_layers, remat=self.remat)
        self.encoder = Stack(cfg, is_decoder=False, **stack_kw)
        self.decoder = Stack(cfg, is_decoder=True, **stack_kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids `[b, s]` -> shared embeddings `[b, s, d_model]`."""
        return constrain(self.shared(input_ids.astype(jnp.int32)), ACT)

    def encode(self, inputs_embeds: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Encoder over embeddings `[b, s, d]` with mask `[b, s]` -> `[b, s, d]`."""
        return self.encoder(inputs_embeds, attention_mask, deterministic=deterministic)

    def output_logits(self, hidden: jax.Array) -> jax.Array:
        """Final decoder states `[..., d_model]` -> logits `[..., vocab]`."""
        if self.cfg.tie_word_embeddings:
            return self.shared.attend(hidden * (self.cfg.d_model ** -0.5))
        return self.lm_head(hidden)

    def decode_hidden(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array, encoder_mask: jax.Array,
                      decoder_mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        """Teacher-forced causal decoder -> final states `[b, t, d_model]` (before the LM head)."""
        x = self.embed(decoder_input_ids)
        return self.decoder(x, decoder_mask, encoder_hidden, encoder_mask, deterministic=deterministic)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array, encoder_mask: jax.Array,
               decoder_mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        """Teacher-forced causal decoder -> logits `[b, t, vocab]`."""
        h = self.decode_hidden(decoder_input_ids, encoder_hidden, encoder_mask, decoder_mask, deterministic)
        return constrain(self.output_logits(h), ("batch", "length", "vocab"))

    def __call__(self, inputs_embeds: Optional[jax.Array] = None, input_ids: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, decoder_input_ids: Optional[jax.Array] = None,
                 decoder_mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        if (inputs_embeds is None) == (input_ids is None):
            raise ValueError("T5: pass exactly one of inputs_embeds and input_ids")
        if decoder_input_ids is None:
            raise ValueError("T5: decoder_input_ids is required")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(inputs_embeds.shape[:2], bool)
        enc = self.encode(inputs_embeds, attention_mask, deterministic)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_mask, deterministic)

    def init_cache(self, encoder_hidden: jax.Array, encoder_mask: jax.Array, max_length: int) -> Dict[str, Any]:
        """The decoding cache for up to `max_length` decoder positions (a static int).

        Cross-attention keys/values of `encoder_hidden` are computed here, once. Every leaf has
        the batch first; keys/values are head-major:

            {'index': int32 [b]            (positions already decoded = position of the next token),
             'encoder_mask': bool [b, s],
             'block_{i}': {'self_k', 'self_v': [b, heads, max_length, d_kv] (zeros),
                           'cross_k', 'cross_v': [b, heads, s, d_kv]}}

        For beam search, `expand_cache(cache, num_beams)` (see there).
        """
        return self.decoder.init_cache(encoder_hidden, encoder_mask, max_length)

    def output_embedding(self) -> Optional[jax.Array]:
        """The untied output projection as `[vocab, d_model]`, for `decode_step(output_embedding=...)`.

        A decoding loop computes this once and passes it to every step: XLA:CPU multiplies a few
        rows by the `[vocab, d_model]` matrix in about 30% less time than by the `[d_model, vocab]`
        kernel (8 to 32 rows, d_model 512, vocab 32k, 2-core Xeon). None for tied embeddings
        (already in that order) and for an output projection with LoRA adapters.
        """
        if self.cfg.tie_word_embeddings:
            return None
        head = self.lm_head.variables["params"]
        if "lora_a" in head:
            return None
        return jnp.transpose(head["kernel"]).astype(self.dtype)

    def decode_step(self, tokens: jax.Array, cache: Dict[str, Any], deterministic: bool = True,
                    output_embedding: Optional[jax.Array] = None):
        """Feed one token per row (`[n]` or `[n, 1]`) at position `cache['index']`.

        Returns (logits `[n, vocab]` for the next token, the updated cache with index + 1).
        `output_embedding`: `T5.output_embedding()` (same params), computed once per loop, or None.
        """
        tokens = tokens.reshape(tokens.shape[0], 1)
        x = self.shared(tokens.astype(jnp.int32))
        h, cache = self.decoder.step(x, cache, deterministic=deterministic)
        if output_embedding is not None:
            logits = jnp.einsum("nd,vd->nv", h[:, 0].astype(self.dtype), output_embedding)
            return constrain(logits, ("batch", "vocab")), cache
        return self.output_logits(h)[:, 0], cache
