"""WavLM (the frozen speech encoder), numerically matching Hugging Face `WavLMModel` in eval mode.

Two families, picked by the config:
- base style (`feat_extract_norm="group"`, `do_stable_layer_norm=False`): GroupNorm on the first
  conv only (statistics over the whole, padded, input), post-LN transformer layers;
- large style (`"layer"`, `True`): LayerNorm after every conv, pre-LN transformer layers.

`hidden_states` are collected where transformers 5 collects them: the input to the first layer,
then each layer's output. In the pre-LN family the last one is therefore taken *before* the
encoder's final LayerNorm (transformers 4 returned it after); `last_hidden_state` is the
normalised one, and `tie_last_hidden_states` (a transformers 5 config key) puts it in the tuple.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.models.layers import Conv1D, Dense, Dtype, LayerNorm, constrain

CONV_NORM_EPS = 1e-5  # HF builds the feature extractor's norms with torch's default eps


@dataclasses.dataclass(frozen=True)
class WavLMConfig:
    """The architecture numbers of a WavLM checkpoint (defaults: HF's `WavLMConfig` defaults)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: Tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: Tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: Tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_buckets: int = 320
    max_bucket_distance: int = 800
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    feat_extract_activation: str = "gelu"
    tie_last_hidden_states: bool = False

    def __post_init__(self):
        for field in ("conv_dim", "conv_kernel", "conv_stride"):
            object.__setattr__(self, field, tuple(int(v) for v in getattr(self, field)))
        for field in ("hidden_act", "feat_extract_activation"):
            if getattr(self, field) != "gelu":
                raise ValueError(f"wavlm {field} must be 'gelu', got {getattr(self, field)!r}")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"wavlm feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0:
            raise ValueError(
                "wavlm conv_dim, conv_kernel and conv_stride must have the same (non-zero) length, got "
                f"{self.conv_dim}, {self.conv_kernel}, {self.conv_stride}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"wavlm hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"wavlm hidden_size {self.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}"
            )
        if self.num_buckets < 4 or self.max_bucket_distance <= self.num_buckets // 4:
            raise ValueError(
                f"wavlm num_buckets ({self.num_buckets}) must be >= 4 and max_bucket_distance "
                f"({self.max_bucket_distance}) > num_buckets // 4"
            )

    @property
    def num_hidden_states(self) -> int:
        return self.num_hidden_layers + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "WavLMConfig":
        """From an HF `config.json` dict; keys not given take HF's defaults."""
        if d.get("model_type", "wavlm") != "wavlm":
            raise ValueError(f"wavlm model_type must be 'wavlm', got {d['model_type']!r}")
        if d.get("add_adapter"):
            raise ValueError("wavlm add_adapter=True (the CTC adapter stack) is not supported")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "WavLMConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"wavlm config: unknown fields {unknown}")
        return cls(**d)


def feature_lengths(cfg: WavLMConfig, sample_lengths: Any) -> Any:
    """Frames the conv stack makes from `sample_lengths` samples (HF `_get_feat_extract_output_lengths`)."""
    lengths = sample_lengths
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        lengths = (lengths - k) // s + 1
    return lengths


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """`[length, length]` int32 bucket of `key - query`, log-spaced beyond `num_buckets // 4`.

    Computed in float32 the way HF does, so bucket edges fall on the same distances.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
    large = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum((np.float32(max_exact) + large).astype(np.int32), half - 1)
    return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


class WavLMOutput(NamedTuple):
    hidden_states: Tuple[jax.Array, ...]  # num_hidden_layers + 1 arrays [batch, frames, hidden]
    frame_mask: jax.Array  # [batch, frames] bool, True at real frames
    last_hidden_state: jax.Array  # [batch, frames, hidden]; after the final LayerNorm in the pre-LN family


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class TimeGroupNorm(nn.Module):
    """GroupNorm with one group per channel: each channel normalised over the time axis."""

    epsilon: float = CONV_NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[batch, time, channels]`."""
        shape = (x.shape[-1],)
        ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
        scale = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), shape, self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class FeatureExtractor(nn.Module):
    """Conv stack: audio `[batch, samples]` -> features `[batch, frames, conv_dim[-1]]`."""

    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = audio[..., None]
        for i, (dim, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            layer = _ConvLayer(dim, k, s, cfg.conv_bias, self._norm(i), name=f"conv_layers_{i}", **kw)
            x = layer(x)
        return x

    def _norm(self, i: int) -> Optional[str]:
        if self.cfg.feat_extract_norm == "layer":
            return "layer"
        return "group" if i == 0 else None


class _ConvLayer(nn.Module):
    """conv -> (GroupNorm | LayerNorm | nothing) -> gelu."""

    features: int
    kernel_size: int
    stride: int
    use_bias: bool
    norm: Optional[str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv1D(self.features, self.kernel_size, self.stride, use_bias=self.use_bias, name="conv", **kw)(x)
        if self.norm == "group":
            x = TimeGroupNorm(name="layer_norm", **kw)(x)
        elif self.norm == "layer":
            x = LayerNorm(CONV_NORM_EPS, name="layer_norm", **kw)(x)
        return _gelu(x)


class FeatureProjection(nn.Module):
    """LayerNorm + Dense: conv features `[b, frames, conv_dim[-1]]` -> `[b, frames, hidden]`."""

    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(self.cfg.layer_norm_eps, name="layer_norm", **kw)(x)
        return Dense(self.cfg.hidden_size, axes=("conv_in", "embed"), use_bias=True, name="projection", **kw)(x)


class PositionalConvEmbedding(nn.Module):
    """Grouped conv over time (weight norm folded into `kernel`), 'same' length, gelu."""

    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[batch, frames, hidden]` -> `[batch, frames, hidden]`."""
        k = self.cfg.num_conv_pos_embeddings
        y = Conv1D(
            self.cfg.hidden_size, k, padding=k // 2, groups=self.cfg.num_conv_pos_embedding_groups,
            name="conv", dtype=self.dtype, param_dtype=self.param_dtype,
        )(x)
        return _gelu(y[:, : x.shape[1]])  # an even kernel makes one frame too many: drop the last


class Attention(nn.Module):
    """Self-attention with WavLM's gated relative position bias.

    The first layer owns `rel_attn_embed` and computes the (ungated) bias `[heads, t, t]`; later
    layers receive it. Each layer gates it per query with a gate computed from its input.
    """

    cfg: WavLMConfig
    has_relative_position_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, position_bias: Optional[jax.Array]
    ) -> Tuple[jax.Array, jax.Array]:
        """x `[b, t, hidden]`, key_mask `[b, t]` bool -> (`[b, t, hidden]`, position_bias `[heads, t, t]`)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, hd = cfg.num_attention_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if position_bias is None:
            embed = self.param(
                "rel_attn_embed",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("relpos_buckets", None)),
                (cfg.num_buckets, h), self.param_dtype,
            )
            buckets = relative_position_buckets(t, cfg.num_buckets, cfg.max_bucket_distance)
            position_bias = jnp.transpose(embed.astype(jnp.float32)[buckets], (2, 0, 1))

        # Gate [b, t, h] from the input split into heads.
        gate_const = self.param(
            "gru_rel_pos_const", nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            (h,), self.param_dtype,
        )
        proj = Dense(8, axes=(None, None), use_bias=True, name="gru_rel_pos_linear", **kw)(x.reshape(b, t, h, hd))
        gates = jax.nn.sigmoid(proj.astype(jnp.float32).reshape(b, t, h, 2, 4).sum(-1))
        gate = gates[..., 0] * (gates[..., 1] * gate_const.astype(jnp.float32) - 1.0) + 2.0
        bias = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias[None]  # [b, h, t, t]

        def proj_heads(name):
            y = Dense(cfg.hidden_size, axes=("embed", "heads"), use_bias=True, name=name, **kw)(x)
            return y.reshape(b, t, h, hd)

        q, k, v = proj_heads("q") * hd**-0.5, proj_heads("k"), proj_heads("v")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        # probs @ v on heads-first operands: written as the einsum "bhqk,bkhd->bqhd", XLA:CPU lays
        # the product out as [b, h, d, q] and runs it several times slower than the score matmul of
        # the same size (bench/train_step.py: 8% of the demo-size train step; same numbers).
        out = jnp.matmul(probs, jnp.swapaxes(v, 1, 2)).transpose(0, 2, 1, 3).reshape(b, t, cfg.hidden_size)
        out = Dense(cfg.hidden_size, axes=("heads", "embed"), use_bias=True, name="o", **kw)(out)
        return out, position_bias


class FeedForward(nn.Module):
    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        y = Dense(self.cfg.intermediate_size, axes=("embed", "mlp"), name="intermediate", **kw)(x)
        return Dense(self.cfg.hidden_size, axes=("mlp", "embed"), name="output", **kw)(_gelu(y))


class EncoderLayer(nn.Module):
    """Post-LN (base family) or pre-LN (`do_stable_layer_norm`) transformer layer."""

    cfg: WavLMConfig
    has_relative_position_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_carry: bool = False  # under nn.scan: return (x, x), the hidden state as both carry and output

    @nn.compact
    def __call__(self, x, key_mask, position_bias):
        """x `[b, t, hidden]` -> (`[b, t, hidden]`, position_bias `[heads, t, t]`)."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = Attention(cfg, self.has_relative_position_bias, name="attention", **kw)
        norm = LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)
        final_norm = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)
        mlp = FeedForward(cfg, name="mlp", **kw)
        if cfg.do_stable_layer_norm:
            a, position_bias = attention(norm(x), key_mask, position_bias)
            x = x + a
            x = x + mlp(final_norm(x))
        else:
            a, position_bias = attention(x, key_mask, position_bias)
            x = norm(x + a)
            x = final_norm(x + mlp(x))
        x = constrain(x, ("batch", "length", "embed"))
        return (x, x) if self.scan_carry else (x, position_bias)


class Encoder(nn.Module):
    """Positional conv + transformer layers. Returns (hidden states, last_hidden_state).

    `scan_layers`: layer 0 (which owns `rel_attn_embed` and computes the position bias) stays
    `layers_0`; layers 1..L-1 are identical and run under `nn.scan` as `layers/...`, params stacked
    on a leading `layers` axis (`models/scan_layout.py` converts between the layouts).
    """

    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, frame_mask: jax.Array) -> Tuple[Tuple[jax.Array, ...], jax.Array]:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.where(frame_mask[..., None], x, 0).astype(self.dtype)  # padded frames feed zeros to the pos conv
        x = x + PositionalConvEmbedding(cfg, name="pos_conv_embed", **kw)(x)
        final_norm = LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)
        if not cfg.do_stable_layer_norm:
            x = final_norm(x)
        x = constrain(x, ("batch", "length", "embed"))
        states, position_bias = [x], None
        if self.scan_layers and cfg.num_hidden_layers > 1:
            x, position_bias = EncoderLayer(cfg, True, name="layers_0", **kw)(x, frame_mask, None)
            states.append(x)
            scanned = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers - 1,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, ys = scanned(cfg, False, scan_carry=True, name="layers", **kw)(x, frame_mask, position_bias)
            states.extend(ys[i] for i in range(cfg.num_hidden_layers - 1))
        else:
            for i in range(cfg.num_hidden_layers):
                x, position_bias = EncoderLayer(cfg, i == 0, name=f"layers_{i}", **kw)(x, frame_mask, position_bias)
                states.append(x)
        last = final_norm(x) if cfg.do_stable_layer_norm else x
        if cfg.tie_last_hidden_states:
            states[-1] = last
        return tuple(states), last


class WavLM(nn.Module):
    """Audio `[batch, samples]` (+ sample mask) -> `WavLMOutput` (eval mode, no dropout/masking)."""

    cfg: WavLMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False  # see `Encoder`

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: Optional[jax.Array] = None) -> WavLMOutput:
        """input_values `[b, samples]` float; attention_mask `[b, samples]` (1 = real sample) or None."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = FeatureExtractor(cfg, name="feature_extractor", **kw)(input_values)
        b, frames = features.shape[:2]
        if attention_mask is None:
            frame_mask = jnp.ones((b, frames), bool)
        else:
            lengths = feature_lengths(cfg, jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
            frame_mask = jnp.arange(frames)[None, :] < lengths[:, None]
        x = FeatureProjection(cfg, name="feature_projection", **kw)(features)
        states, last = Encoder(cfg, name="encoder", scan_layers=self.scan_layers, **kw)(x, frame_mask)
        return WavLMOutput(states, frame_mask, last)
