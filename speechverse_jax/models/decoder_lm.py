"""Decoder-only causal LMs (Llama 3.x, Qwen2/2.5, Gemma 2, Gemma 3 text) in flax.linen, matching HF.

One module covers the four families; what differs is read from the HF `config.json` by
`DecoderLMConfig.from_hf` (no per-checkpoint constants are hard-coded):

    family   norm                      extras
    llama    w * x_hat (cast first)    optional llama3 / linear RoPE scaling, optional q/k/v/o/mlp bias
    qwen2    w * x_hat (cast first)    bias on q, k, v (none on o)
    gemma2   (1 + w) * x_hat in f32    sqrt(hidden) embedding normaliser, sandwich norms,
                                       query_pre_attn_scalar, attention + final-logit soft-caps,
                                       alternating sliding-window layers, tanh GELU
    gemma3   as gemma2                 + RMSNorm on q and k per head, local/global RoPE bases

Params (a plain nested dict; LoRA adapters sit inside the projections they adapt, so the same
`LoRAConfig.target_regex` rules apply: the default `.*/(self_attention|cross_attention)/(q|v)$`
adapts q and v):

    embed_tokens/embedding                          [vocab, hidden]
    layers_{i}/input_norm/scale                     [hidden]
    layers_{i}/self_attention/{q,k,v}/kernel        [hidden, heads*head_dim] / [hidden, kv_heads*head_dim]
    layers_{i}/self_attention/{q,k,v}/bias          (qwen2; llama with attention_bias)
    layers_{i}/self_attention/o/kernel              [heads*head_dim, hidden]
    layers_{i}/self_attention/{q_norm,k_norm}/scale [head_dim]   (gemma3)
    layers_{i}/post_attention_norm/scale            [hidden]
    layers_{i}/{pre_mlp_norm,post_mlp_norm}/scale   [hidden]     (gemma2/3; llama/qwen2 use
                                                                  post_attention_norm as the pre-MLP norm)
    layers_{i}/mlp/{gate,up,down}/kernel
    final_norm/scale                                [hidden]
    lm_head/kernel                                  [hidden, vocab]  (untied models only)

Gemma's norm scales are stored zero-centred, as in the checkpoints. Masks are by array index
(causal, key padding, sliding window `q - k < window`); RoPE uses `position_ids`, which skip
pads (`positions_from_mask`), so left and right padding give the same results on real tokens.

Embedding normaliser: `embed(ids)` multiplies token embeddings by sqrt(hidden) (Gemma), cast to
the activation dtype; `__call__(inputs_embeds=...)` takes embeddings as they are, as HF
transformers 5 does (its scaling lives inside the embedding layer). Injected audio embeddings are
therefore NOT scaled: a trainable projector learns its own scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.models.layers import Dense, Dtype, LoRAConfig, constrain, layer_class

ACT = ("batch", "length", "embed")
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: base `theta` and optional `linear` / `llama3` scaling."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"decoder_lm config: rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if not float(self.theta) > 0 or not float(self.factor) > 0:
            raise ValueError(f"decoder_lm config: rope theta and factor must be positive, got {self}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("decoder_lm config: llama3 rope needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf(cls, d: Optional[Dict[str, Any]], theta: Optional[float], where: str) -> "RopeConfig":
        """From an HF rope block (`rope_parameters` or the older `rope_scaling`) and a separate theta."""
        d = dict(d or {})
        rope_type = d.get("rope_type", d.get("type", "default"))
        theta = d.get("rope_theta", theta)
        if theta is None:
            raise ValueError(f"decoder_lm config: {where} has no rope_theta")
        kw = dict(theta=float(theta), rope_type=rope_type)
        if rope_type in ("linear", "llama3"):
            if "factor" not in d:
                raise ValueError(f"decoder_lm config: {where} is {rope_type!r} RoPE but has no 'factor'")
            kw["factor"] = float(d["factor"])
        if rope_type == "llama3":
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if k not in d:
                    raise ValueError(f"decoder_lm config: {where} is llama3 RoPE but has no {k!r}")
            kw.update(low_freq_factor=float(d["low_freq_factor"]), high_freq_factor=float(d["high_freq_factor"]),
                      original_max_position_embeddings=int(d["original_max_position_embeddings"]))
        return cls(**kw)

    def to_hf(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3"):
            d["factor"] = self.factor
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return d

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies `[head_dim // 2]` (float32, computed on the host as HF does)."""
        exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv = (np.float32(1.0) / (np.float32(self.theta) ** exps)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old = float(self.original_max_position_embeddings)
            low_wl, high_wl = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = (2 * math.pi / inv).astype(np.float32)
            scaled = np.where(wavelen > low_wl, inv / np.float32(self.factor), inv).astype(np.float32)
            smooth = ((old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor))
            smooth = smooth.astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
    family: str = "llama"  # llama | qwen2 | gemma2 | gemma3
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"  # silu | gelu_tanh | gelu
    rope: RopeConfig = RopeConfig()
    rope_local: Optional[RopeConfig] = None  # sliding layers' RoPE (gemma3); None: same as `rope`
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = False  # bias on o
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    query_pre_attn_scalar: Optional[float] = None  # attention scale = this ** -0.5 (default head_dim)
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Tuple[str, ...] = ()  # per layer 'full_attention' / 'sliding_attention'; () = all full
    max_position_embeddings: int = 8192
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in set(FAMILIES.values()):
            raise ValueError(f"decoder_lm config: family must be one of {sorted(set(FAMILIES.values()))}, "
                             f"got {self.family!r}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"decoder_lm config: {f} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"decoder_lm config: num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"decoder_lm config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"decoder_lm config: hidden_act must be silu, gelu_tanh or gelu, got {self.hidden_act!r}")
        if not float(self.rms_norm_eps) > 0:
            raise ValueError(f"decoder_lm config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"decoder_lm config: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"decoder_lm config: unknown layer_types {bad} (expected {LAYER_TYPES})")
            if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
                raise ValueError("decoder_lm config: sliding_attention layers need a positive sliding_window")
        for f in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            v = getattr(self, f)
            if v is not None and not float(v) > 0:
                raise ValueError(f"decoder_lm config: {f} must be positive or null, got {v!r}")
        for f in ("pad_token_id", "bos_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"decoder_lm config: {f} must be a token id in [0, {self.vocab_size}), got {v!r}")
        if any(not 0 <= e < self.vocab_size for e in self.eos_token_ids):
            raise ValueError(f"decoder_lm config: eos_token_ids {self.eos_token_ids} outside [0, {self.vocab_size})")

    # ---- family traits -------------------------------------------------------------------------
    @property
    def is_gemma(self) -> bool:
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA): query head h reads KV head h // num_groups."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.rope_local if (self.rope_local is not None and self.is_sliding(layer)) else self.rope

    # ---- HF config.json -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Dict[str, Any]) -> "DecoderLMConfig":
        """From an HF `config.json` dict of LlamaForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM or
        Gemma3ForCausalLM (`gemma3_text`; a multimodal `gemma3` config's `text_config` is used).

        RoPE is read from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`
        (older files); Gemma 3 has one block per layer type (or `rope_local_base_freq`).
        """
        if d.get("model_type") == "gemma3" and "text_config" in d:
            d = dict(d["text_config"], model_type="gemma3_text")
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"decoder_lm config: model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
        family = FAMILIES[model_type]
        gemma = family in ("gemma2", "gemma3")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise ValueError(f"decoder_lm config: {k} is missing")
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        n = d["num_hidden_layers"]

        act_name = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act_name not in ACTIVATIONS:
            raise ValueError(f"decoder_lm config: unsupported activation {act_name!r} (known: {sorted(ACTIVATIONS)})")

        # RoPE
        params = d.get("rope_parameters")
        legacy = d.get("rope_scaling")
        rope_local = None
        if family == "gemma3":
            if isinstance(params, dict) and "full_attention" in params:
                rope = RopeConfig.from_hf(params["full_attention"], 1_000_000.0, "rope_parameters.full_attention")
                rope_local = RopeConfig.from_hf(params.get("sliding_attention"), 10_000.0,
                                                "rope_parameters.sliding_attention")
            else:
                rope = RopeConfig.from_hf(params or legacy, d.get("rope_theta", 1_000_000.0), "rope_parameters")
                rope_local = RopeConfig(theta=float(d.get("rope_local_base_freq", 10_000.0)))
        else:
            block = params if params is not None else legacy
            rope = RopeConfig.from_hf(block, d.get("rope_theta", 10000.0),
                                      "rope_parameters" if params is not None else "rope_scaling")

        # Sliding-window layers
        layer_types = d.get("layer_types")
        window = d.get("sliding_window")
        if layer_types is None:
            if family == "gemma2":
                layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
            elif family == "gemma3":
                pattern = d.get("sliding_window_pattern", 6)
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
            elif family == "qwen2" and d.get("use_sliding_window") and window:
                first = d.get("max_window_layers", n)
                layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
            else:
                layer_types = ["full_attention"] * n
        if family == "qwen2" and not d.get("use_sliding_window", False):
            layer_types = ["full_attention"] * n  # HF ignores the window unless use_sliding_window
        if "sliding_attention" not in layer_types:
            window = None

        eos = d.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        if family == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            hidden_act=ACTIVATIONS[act_name],
            rope=rope,
            rope_local=rope_local,
            attention_bias=qkv_bias,
            attention_out_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if gemma else None,
            sliding_window=window,
            layer_types=tuple(layer_types),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def to_hf(self) -> Dict[str, Any]:
        """The HF `config.json` dict (transformers 5 naming) of this model."""
        model_type = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3_text"}[self.family]
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3": "Gemma3ForCausalLM"}[self.family]
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[self.hidden_act]
        d: Dict[str, Any] = dict(
            model_type=model_type, architectures=[arch], vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
            eos_token_id=(list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0])
            if self.eos_token_ids else None,
            layer_types=list(self.layer_types) or ["full_attention"] * self.num_hidden_layers,
            sliding_window=self.sliding_window,
        )
        if self.is_gemma:
            d.update(hidden_activation=act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping, attention_bias=self.attention_bias)
        else:
            d["hidden_act"] = act
        if self.family == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.family == "qwen2":
            d.update(use_sliding_window=self.sliding_window is not None,
                     max_window_layers=next((i for i, t in enumerate(self.layer_types) if t == "sliding_attention"),
                                            self.num_hidden_layers))
        if self.family == "gemma3":
            d["rope_parameters"] = {"full_attention": self.rope.to_hf(),
                                    "sliding_attention": (self.rope_local or self.rope).to_hf()}
        else:
            d["rope_parameters"] = self.rope.to_hf()
        return d

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DecoderLMConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decoder_lm config: unknown fields {unknown}")
        for k in ("rope", "rope_local"):
            if isinstance(d.get(k), dict):
                d[k] = RopeConfig(**d[k])
        for k in ("layer_types", "eos_token_ids"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids `[b, t]` that skip pads: `cumsum(mask) - 1`, pads get 0 (never read).

    HF `generate` does the same (it gives pads 1; the value at a pad does not matter)."""
    m = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Dtype):
    """positions `[b, t]` -> (cos, sin) `[b, t, head_dim]`, computed in float32 then cast (as HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[b, t, heads, d]`, cos/sin `[b, t, d]`: HF's rotate-half RoPE (no weight permutation)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. Llama/Qwen: `w * x_hat.astype(dtype)`; Gemma: `x_hat * (1 + w)` in
    float32, then cast (w stored zero-centred, initialised to 0)."""

    epsilon: float = 1e-6
    gemma: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.gemma else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.gemma:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    """GQA self-attention with RoPE; q `[b, t, H, D]` reads KV head `h // (H / KV)`.

    `attention_chunk` > 0: queries are processed that many at a time (`jax.lax.map`, each chunk
    under `jax.checkpoint`), so the float32 scores `[b, H, chunk, s]` of one chunk exist at a time,
    in the forward and the backward pass, instead of `[b, H, t, s]`. Exact: each query's softmax
    runs over all its keys either way."""

    cfg: DecoderLMConfig
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_chunk: int = 0

    def setup(self):
        c = self.cfg
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q = Dense(c.num_attention_heads * c.head_dim, ("embed", "heads"), use_bias=c.attention_bias, **kw)
        self.k = Dense(c.num_key_value_heads * c.head_dim, ("embed", "heads"), use_bias=c.attention_bias, **kw)
        self.v = Dense(c.num_key_value_heads * c.head_dim, ("embed", "heads"), use_bias=c.attention_bias, **kw)
        self.o = Dense(c.hidden_size, ("heads", "embed"), use_bias=c.attention_out_bias, **kw)
        if c.qk_norm:
            nkw = dict(epsilon=c.rms_norm_eps, gemma=True, dtype=self.dtype, param_dtype=self.param_dtype)
            self.q_norm = RMSNorm(**nkw)
            self.k_norm = RMSNorm(**nkw)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, deterministic: bool = True):
        """x `[b, t, hidden]` -> q `[b, t, H, D]`, k and v `[b, t, KV, D]` (RoPE applied to q and k)."""
        c = self.cfg
        b, t, _ = x.shape
        q = self.q(x, deterministic).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k(x, deterministic).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v(x, deterministic).reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               deterministic: bool = True) -> jax.Array:
        """q `[b, t, H, D]`, k/v `[b, s, KV, D]`, mask bool `[b, t, s]` -> `[b, t, hidden]`."""
        c = self.cfg
        b, t, _, d = q.shape
        g = c.num_groups
        qg = q.reshape(b, t, c.num_key_value_heads, g, d)
        k, v = k.astype(self.dtype), v.astype(self.dtype)

        def core(qg, mask):  # [b, t', KV, g, D], [b, t', s] -> [b, t', KV, g, D]
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
            scores = softcap(scores * c.attention_scale, c.attn_logit_softcapping)
            scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            return jnp.einsum("bkgts,bskd->btkgd", weights, v)

        chunk = int(self.attention_chunk)
        if not chunk or t <= chunk:
            return self.o(core(qg, mask).reshape(b, t, -1), deterministic)
        n = -(-t // chunk)
        pad = n * chunk - t  # padded queries see no key (mask False): their rows are dropped below
        qc = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).reshape((b, n, chunk) + qg.shape[2:])
        mc = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, mask.shape[-1])
        out = jax.lax.map(lambda xs: jax.checkpoint(core, prevent_cse=False)(*xs),
                          (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(mc, 1, 0)))  # [n, b, chunk, KV, g, D]
        out = jnp.moveaxis(out, 0, 1).reshape((b, n * chunk) + qg.shape[2:])[:, :t]
        return self.o(out.reshape(b, t, -1), deterministic)


    def attend_beams(self, q: jax.Array, pk: jax.Array, pv: jax.Array, gk: jax.Array, gv: jax.Array,
                     prompt_mask: jax.Array, gen_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """One query per beam row against a beam cache (see `expand_for_beams`).

        q `[b * r, 1, H, D]` (r beams per example, adjacent); prompt keys/values pk, pv `[b, T, KV, D]`
        (shared by the beams); generated ones gk, gv `[b, r * N, KV, D]` (beam j's block at j * N);
        masks bool `[b * r, T]` and `[b * r, r * N]`. -> `[b * r, 1, hidden]`. Keys and values are
        read in place, never gathered per hypothesis.
        """
        c = self.cfg
        b, t = pk.shape[0], pk.shape[1]
        n, _, _, d = q.shape
        r = n // b
        qg = q.reshape(b, r, c.num_key_value_heads, c.num_groups, d)
        s1 = jnp.einsum("brkgd,btkd->bkgrt", qg, pk.astype(self.dtype), preferred_element_type=jnp.float32)
        s2 = jnp.einsum("brkgd,bskd->bkgrs", qg, gk.astype(self.dtype), preferred_element_type=jnp.float32)
        scores = softcap(jnp.concatenate([s1, s2], axis=-1) * c.attention_scale, c.attn_logit_softcapping)
        mask = jnp.concatenate([prompt_mask, gen_mask], axis=-1).reshape(b, 1, 1, r, -1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = (jnp.einsum("bkgrt,btkd->brkgd", weights[..., :t], pv.astype(self.dtype))
               + jnp.einsum("bkgrs,bskd->brkgd", weights[..., t:], gv.astype(self.dtype)))
        return self.o(out.reshape(n, 1, -1), deterministic)


class MLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`."""

    cfg: DecoderLMConfig
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.cfg
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=c.mlp_bias)
        self.gate = Dense(c.intermediate_size, ("embed", "mlp"), **kw)
        self.up = Dense(c.intermediate_size, ("embed", "mlp"), **kw)
        self.down = Dense(c.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        g = self.gate(x, deterministic)
        if self.cfg.hidden_act == "silu":
            g = jax.nn.silu(g)
        else:
            g = jax.nn.gelu(g, approximate=self.cfg.hidden_act == "gelu_tanh")
        h = constrain(g * self.up(x, deterministic), ("batch", "length", "mlp"))
        return self.down(h, deterministic)


class Layer(nn.Module):
    cfg: DecoderLMConfig
    index: int = 0
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_chunk: int = 0

    def setup(self):
        c = self.cfg
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        nkw = dict(epsilon=c.rms_norm_eps, gemma=c.is_gemma, dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_norm = RMSNorm(**nkw)
        self.self_attention = Attention(c, attention_chunk=self.attention_chunk, **kw)
        self.post_attention_norm = RMSNorm(**nkw)
        if c.is_gemma:
            self.pre_mlp_norm = RMSNorm(**nkw)
            self.post_mlp_norm = RMSNorm(**nkw)
        self.mlp = MLP(c, **kw)

    def _finish(self, x: jax.Array, attn_out: jax.Array, deterministic: bool) -> jax.Array:
        if self.cfg.is_gemma:
            x = x + self.post_attention_norm(attn_out)
            x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x), deterministic))
        else:
            x = x + attn_out
            x = x + self.mlp(self.post_attention_norm(x), deterministic)
        return constrain(x, ACT)

    def __call__(self, x, cos, sin, mask, deterministic: bool = True):
        """x `[b, t, hidden]` -> (x, (k, v) `[b, t, KV, D]` for a cache)."""
        q, k, v = self.self_attention.qkv(self.input_norm(x), cos, sin, deterministic)
        out = self.self_attention.attend(q, k, v, mask, deterministic)
        return self._finish(x, out, deterministic), (k, v)

    def step(self, x, cos, sin, layer_cache, index, mask, deterministic: bool = True):
        """One position per row: x `[n, 1, hidden]`; its k/v go to the cache at array index `index` `[n]`."""
        q, k_new, v_new = self.self_attention.qkv(self.input_norm(x), cos, sin, deterministic)
        rows = jnp.arange(x.shape[0])
        k = layer_cache["k"].at[rows, index].set(k_new[:, 0].astype(layer_cache["k"].dtype))
        v = layer_cache["v"].at[rows, index].set(v_new[:, 0].astype(layer_cache["v"].dtype))
        out = self.self_attention.attend(q, k, v, mask, deterministic)
        return self._finish(x, out, deterministic), {"k": k, "v": v}


    def step_beams(self, x, cos, sin, layer_cache, step, beams: int, prompt_mask, gen_mask,
                   deterministic: bool = True):
        """One position per beam row with a beam cache: x `[b * beams, 1, hidden]`; row (i, j) writes its
        key/value at `[i, j * N + step]` of `gk`/`gv`."""
        q, k_new, v_new = self.self_attention.qkv(self.input_norm(x), cos, sin, deterministic)
        n = x.shape[0]
        rows = jnp.arange(n)
        per_beam = layer_cache["gk"].shape[1] // beams
        ex, slot = rows // beams, (rows % beams) * per_beam + step
        gk = layer_cache["gk"].at[ex, slot].set(k_new[:, 0].astype(layer_cache["gk"].dtype))
        gv = layer_cache["gv"].at[ex, slot].set(v_new[:, 0].astype(layer_cache["gv"].dtype))
        out = self.self_attention.attend_beams(q, layer_cache["k"], layer_cache["v"], gk, gv, prompt_mask, gen_mask,
                                               deterministic)
        return self._finish(x, out, deterministic), dict(layer_cache, gk=gk, gv=gv)


class ScanLayer(Layer):
    """A `Layer` behind one signature for `nn.scan` / `nn.remat`:
    `(carry x, xs, consts, mode, deterministic) -> (carry x, ys)`, `mode` a static tuple.

    Per-layer choices (Gemma's sliding / full attention and local / global RoPE) come in as the
    scanned input `xs[0]`: None when every layer is of one type (then `consts` hold that type's
    RoPE and mask only), else a bool scalar per layer (True: sliding) that selects between the
    two RoPE tables and masks in `consts` (`pick`).

      ("full", kv, hidden): xs (flag, None); consts ((cos, sin), mask) per type; ys a dict with the
                            layer's (k, v) if `kv` and its output x if `hidden` (else None)
      ("step",):            xs (flag, the layer's cache); consts ((cos, sin), mask) per type and
                            index; ys the layer's updated cache
      ("beams", beams):     xs (flag, the layer's beam cache); consts ((cos, sin), (prompt_mask,
                            gen_mask)) per type and step; ys the layer's updated cache
    """

    def __call__(self, x, xs, consts, mode, deterministic: bool = True):
        flag, layer_cache = xs
        rope, mask = pick(flag, consts[0])
        cos, sin = rope
        if mode[0] == "full":
            x, kv = Layer.__call__(self, x, cos, sin, mask, deterministic)
            ys = {}
            if mode[1]:
                ys["kv"] = kv
            if mode[2]:
                ys["hidden"] = x
            return x, (ys or None)
        if mode[0] == "step":
            return self.step(x, cos, sin, layer_cache, consts[1], mask, deterministic)
        if mode[0] == "beams":
            pm, gm = mask
            return self.step_beams(x, cos, sin, layer_cache, consts[1], mode[1], pm, gm, deterministic)
        raise ValueError(f"decoder_lm layer: unknown mode {mode!r}")


def pick(flag, choices):
    """`choices` = (full, sliding) pytrees, or one pytree when `flag` is None (every layer alike):
    the sliding one where the traced bool `flag` is set."""
    if flag is None:
        return choices
    full, sliding = choices
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, b, a), full, sliding)


class LMOutput(NamedTuple):
    logits: jax.Array  # [b, t, vocab] float
    hidden_states: Optional[Tuple[jax.Array, ...]]  # HF layout: input, after layers 0..n-2, final (normed)


def attention_mask(mask: jax.Array, window: Optional[int]) -> jax.Array:
    """Key-padding mask `[b, s]` -> bool `[b, s, s]`: causal by array index, within `window` if set."""
    s = mask.shape[-1]
    idx = jnp.arange(s)
    allowed = idx[None, :] <= idx[:, None]
    if window:
        allowed = allowed & (idx[None, :] > idx[:, None] - window)
    return allowed[None] & mask.astype(bool)[:, None, :]


class DecoderLM(nn.Module):
    """A causal LM. `__call__` (teacher-forced), `embed`, `prefill` and `decode_step` via `apply(..., method=)`.

    `remat`: a `model.remat` policy name (`models/layers.py: REMAT_POLICIES`) applied to each layer's
    teacher-forced `__call__` (`nn.remat`; the params keep their `layers_{i}` paths, and the cached
    decoding methods `step` / `step_beams` are not rematerialised).

    `scan_layers`: the layers run under `nn.scan` (`ScanLayer`): one compiled layer, params stacked on
    a leading `layers` axis (`layers/...` `[L, ...]` instead of `layers_{i}/...`; `models/scan_layout.py`
    converts between the two). Gemma's per-layer sliding window and local/global RoPE are scanned
    inputs. The decoding cache is then stacked too (`'layers': {'k', 'v': [L, b, ...]}`), and
    prefill / decode_step / beams run the same scan."""

    cfg: DecoderLMConfig
    lora: Optional[LoRAConfig] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    attention_chunk: int = 0  # queries per attention chunk in the layers (`Attention`); 0: all at once

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        layer_kw = dict(kw, attention_chunk=self.attention_chunk)
        # Layer.__call__(self, x, cos, sin, mask, deterministic): `deterministic` (5) is static
        if self.scan_layers:
            # ScanLayer.__call__(self, x, xs, consts, mode, deterministic): mode and deterministic static
            layer = layer_class(ScanLayer, self.remat, static_argnums=(4, 5), scanned=True)
            self.layers = nn.scan(
                layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, 0, **layer_kw)
        else:
            layer = layer_class(Layer, self.remat, static_argnums=(5,))
            self.layers = [layer(c, i, **layer_kw) for i in range(c.num_hidden_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps, gemma=c.is_gemma, dtype=self.dtype, param_dtype=self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), **kw)
        inv_freq = {"global": c.rope.inv_freq(c.head_dim)}
        if c.rope_local is not None:
            inv_freq["local"] = c.rope_local.inv_freq(c.head_dim)
        self._inv_freq = inv_freq

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids `[b, t]` -> `[b, t, hidden]` (times sqrt(hidden) in the activation dtype for Gemma)."""
        x = self.embed_tokens(input_ids.astype(jnp.int32))
        if self.cfg.is_gemma:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, self.dtype)
        return constrain(x, ACT)

    def _rope(self, positions: jax.Array):
        """-> {'global': (cos, sin), 'local': (cos, sin)} for `positions` `[b, t]`."""
        return {k: rope_cos_sin(positions, f, self.dtype) for k, f in self._inv_freq.items()}

    def _layer_rope(self, ropes, i: int):
        c = self.cfg
        return ropes["local"] if ("local" in ropes and c.is_sliding(i)) else ropes["global"]

    def _per_type(self, full, sliding):
        """`ScanLayer`'s per-type consts and scanned flags: (`full` or `sliding` alone, None) when every
        layer is of one type, else ((full, sliding), bool `[L]`: which layers slide)."""
        c = self.cfg
        flags = [c.is_sliding(i) for i in range(c.num_hidden_layers)]
        if all(flags):
            return sliding, None
        if not any(flags):
            return full, None
        return (full, sliding), jnp.asarray(flags)

    def _scan_ropes(self, ropes):
        """(full layers' (cos, sin), sliding layers' (cos, sin))."""
        return ropes["global"], ropes.get("local", ropes["global"])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states `[..., hidden]` -> logits `[..., vocab]` (soft-capped for Gemma)."""
        if self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden.astype(self.dtype))
        else:
            out = self.lm_head(hidden)
        return softcap(out, self.cfg.final_logit_softcapping)

    def _forward(self, inputs_embeds, mask, position_ids, deterministic, output_hidden_states, want_kv=False):
        """-> (final normed x, hidden states or None, per-layer (k, v): a list, or stacked `[L, ...]`
        when scanning (None unless `want_kv`))."""
        c = self.cfg
        b, t, _ = inputs_embeds.shape
        mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        if position_ids is None:
            position_ids = positions_from_mask(mask)
        ropes = self._rope(position_ids)
        full = attention_mask(mask, None)
        sliding = attention_mask(mask, c.sliding_window) if c.sliding_window else full
        x = constrain(inputs_embeds.astype(self.dtype), ACT)
        hidden = [x]
        kvs = []
        if self.scan_layers:
            rope_full, rope_sliding = self._scan_ropes(ropes)
            choices, flags = self._per_type((rope_full, full), (rope_sliding, sliding))
            x, ys = self.layers(x, (flags, None), (choices,), ("full", want_kv, output_hidden_states), deterministic)
            if output_hidden_states:
                hidden += [ys["hidden"][i] for i in range(c.num_hidden_layers)]
            x = self.final_norm(x)
            hidden[-1] = x
            return x, (tuple(hidden) if output_hidden_states else None), (ys["kv"] if want_kv else None)
        for i, layer in enumerate(self.layers):
            cos, sin = self._layer_rope(ropes, i)
            x, kv = layer(x, cos, sin, sliding if c.is_sliding(i) else full, deterministic)
            kvs.append(kv)
            hidden.append(x)
        x = self.final_norm(x)
        hidden[-1] = x
        return x, (tuple(hidden) if output_hidden_states else None), kvs

    def __call__(self, input_ids: Optional[jax.Array] = None, inputs_embeds: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, position_ids: Optional[jax.Array] = None,
                 deterministic: bool = True, output_hidden_states: bool = False) -> LMOutput:
        """Teacher-forced forward. ids `[b, t]` or embeddings `[b, t, hidden]`; mask `[b, t]` (1 = token);
        position ids `[b, t]` default to `positions_from_mask(mask)`. -> logits `[b, t, vocab]`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DecoderLM: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        x, hidden, _ = self._forward(inputs_embeds, attention_mask, position_ids, deterministic,
                                     output_hidden_states)
        return LMOutput(constrain(self.logits(x), ("batch", "length", "vocab")), hidden)

    def final_hidden(self, inputs_embeds: jax.Array, attention_mask: Optional[jax.Array] = None,
                     position_ids: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        """Teacher-forced final (normed) hidden states `[b, t, hidden]`, without the LM head: pick the
        positions that need logits first, then `logits(...)` on those only (the vocabulary projection
        of a 128k-vocabulary LLM over every prompt and audio position is the largest activation)."""
        return self._forward(inputs_embeds, attention_mask, position_ids, deterministic, False)[0]

    def prefill(self, inputs_embeds: jax.Array, attention_mask: jax.Array, max_length: int,
                deterministic: bool = True) -> Tuple[jax.Array, Dict[str, Any]]:
        """Run the prompt `[b, t, hidden]` (mask `[b, t]`) and build the decoding cache.

        Returns (logits `[b, vocab]` of the last array position, cache) with the cache:

            {'index': int32 [b]   (array index of the next token, = t),
             'position': int32 [b] (its position id: the prompt's real-token count),
             'mask': bool [b, max_length] (keys visible: real prompt tokens and decoded ones),
             'layers_{i}': {'k', 'v': [b, max_length, KV, D]}}

        (with `scan_layers`: 'layers': {'k', 'v': [L, b, max_length, KV, D]} instead of 'layers_{i}').
        Every per-layer leaf has the batch first (after the layer axis when scanned). `max_length` (static)
        must cover the prompt plus the new tokens. Left-pad prompts so the last array position is
        a real token for every row.
        """
        b, t, _ = inputs_embeds.shape
        if max_length < t:
            raise ValueError(f"DecoderLM.prefill: max_length {max_length} < prompt length {t}")
        mask = attention_mask.astype(bool)
        x, _, kvs = self._forward(inputs_embeds, mask, None, deterministic, False, want_kv=True)
        logits = self.logits(x[:, -1])
        pad = ((0, 0), (0, max_length - t), (0, 0), (0, 0))
        cache: Dict[str, Any] = {
            "index": jnp.full((b,), t, jnp.int32),
            "position": jnp.sum(mask, axis=-1).astype(jnp.int32),
            "mask": jnp.pad(mask, ((0, 0), (0, max_length - t))),
        }
        if self.scan_layers:
            k, v = kvs
            pad = ((0, 0),) + pad
            cache["layers"] = {"k": jnp.pad(k.astype(self.dtype), pad), "v": jnp.pad(v.astype(self.dtype), pad)}
            return logits, cache
        for i, (k, v) in enumerate(kvs):
            cache[f"layers_{i}"] = {"k": jnp.pad(k.astype(self.dtype), pad), "v": jnp.pad(v.astype(self.dtype), pad)}
        return logits, cache

    def decode_step(self, tokens: jax.Array, cache: Dict[str, Any], deterministic: bool = True):
        """Feed one token per row (`[n]`) -> (logits `[n, vocab]` for the next token, updated cache).

        Works on a `prefill` cache (one row per sequence) and on an `expand_for_beams` cache."""
        if "slots" in cache:
            return self._decode_step_beams(tokens, cache, deterministic)
        c = self.cfg
        n = tokens.shape[0]
        index, position = cache["index"], cache["position"]
        x = self.embed(tokens.reshape(n, 1))
        ropes = self._rope(position[:, None])
        length = cache["mask"].shape[1]
        keys = jnp.arange(length)
        rows = jnp.arange(n)
        kmask = cache["mask"].at[rows, index].set(True)
        causal = keys[None, :] <= index[:, None]
        full = (kmask & causal)[:, None, :]  # [n, 1, L]
        sliding = full
        if c.sliding_window:
            sliding = (kmask & causal & (keys[None, :] > index[:, None] - c.sliding_window))[:, None, :]
        new_cache = dict(cache, index=index + 1, position=position + 1, mask=kmask)
        if self.scan_layers:
            rope_full, rope_sliding = self._scan_ropes(ropes)
            choices, flags = self._per_type((rope_full, full), (rope_sliding, sliding))
            x, new_cache["layers"] = self.layers(x, (flags, cache["layers"]), (choices, index), ("step",),
                                                 deterministic)
            x = self.final_norm(x)
            return self.logits(x[:, 0]), new_cache
        for i, layer in enumerate(self.layers):
            cos, sin = self._layer_rope(ropes, i)
            x, new_cache[f"layers_{i}"] = layer.step(x, cos, sin, cache[f"layers_{i}"], index,
                                                     sliding if c.is_sliding(i) else full, deterministic)
        x = self.final_norm(x)
        return self.logits(x[:, 0]), new_cache

    def _decode_step_beams(self, tokens: jax.Array, cache: Dict[str, Any], deterministic: bool = True):
        c = self.cfg
        n = tokens.shape[0]
        b, t = cache["mask"].shape
        beams = n // b
        per_beam = cache["slots"].shape[1]
        step, position = cache["index"], cache["position"]
        rows = jnp.arange(n)
        slots = cache["slots"].at[rows, step].set(rows % beams)
        x = self.embed(tokens.reshape(n, 1))
        ropes = self._rope(position[:, None])
        here = t + step  # array index of the new token (prompt length + step)
        prompt_keys = jnp.arange(t)
        prompt_mask = jnp.repeat(cache["mask"], beams, axis=0)  # [n, T]
        gen_steps = jnp.arange(per_beam)
        seen = gen_steps[None, :] <= step[:, None]  # [n, N]
        own = slots[:, None, :] == jnp.arange(beams)[None, :, None]  # [n, beams, N]
        gen_mask = (own & seen[:, None, :]).reshape(n, beams * per_beam)
        masks = {"full": (prompt_mask, gen_mask)}
        if c.sliding_window:
            w = c.sliding_window
            p_win = prompt_mask & (prompt_keys[None, :] > here[:, None] - w)
            g_win = (own & (seen & (t + gen_steps[None, :] > here[:, None] - w))[:, None, :]).reshape(n, -1)
            masks["sliding"] = (p_win, g_win)
        new_cache = dict(cache, index=step + 1, position=position + 1, slots=slots)
        if self.scan_layers:
            rope_full, rope_sliding = self._scan_ropes(ropes)
            choices, flags = self._per_type((rope_full, masks["full"]), (rope_sliding, masks.get("sliding")))
            x, new_cache["layers"] = self.layers(x, (flags, cache["layers"]), (choices, step), ("beams", beams),
                                                 deterministic)
            x = self.final_norm(x)
            return self.logits(x[:, 0]), new_cache
        for i, layer in enumerate(self.layers):
            cos, sin = self._layer_rope(ropes, i)
            pm, gm = masks["sliding" if c.is_sliding(i) else "full"]
            x, new_cache[f"layers_{i}"] = layer.step_beams(x, cos, sin, cache[f"layers_{i}"], step, beams, pm, gm,
                                                           deterministic)
        x = self.final_norm(x)
        return self.logits(x[:, 0]), new_cache


def expand_for_beams(cache: Dict[str, Any], beams: int, max_new_tokens: int) -> Dict[str, Any]:
    """A `prefill` cache of b prompts (made with `max_length` = prompt length T) -> a beam cache
    for b * beams rows (the beams of an example adjacent):

        {'index': int32 [b * beams]    (tokens generated so far, the step s),
         'position': int32 [b * beams], 'mask': bool [b, T] (the prompt's),
         'slots': int32 [b * beams, N]  (beam block holding the key/value a row's hypothesis saw at step s),
         'layers_{i}': {'k', 'v': [b, T, KV, D] (the prompt, shared by the beams),
                        'gk', 'gv': [b, beams * N, KV, D] (generated; beam j writes at j * N + s)}}

    (a scanned model's cache: 'layers' holding the same four with a leading layer axis).

    Beam search moves a hypothesis between rows by gathering `slots` and `index` only
    (`models.t5.reorder_cache`); the keys/values never move.
    """
    b, t = cache["mask"].shape
    out: Dict[str, Any] = {
        "index": jnp.zeros((b * beams,), jnp.int32),
        "position": jnp.repeat(cache["position"], beams, axis=0),
        "mask": cache["mask"],
        "slots": jnp.zeros((b * beams, max_new_tokens), jnp.int32),
    }
    if "layers" in cache:  # scanned: [L, b, ...]
        k, v = cache["layers"]["k"][:, :, :t], cache["layers"]["v"][:, :, :t]
        shape = k.shape[:2] + (beams * max_new_tokens,) + k.shape[3:]
        out["layers"] = {"k": k, "v": v, "gk": jnp.zeros(shape, k.dtype), "gv": jnp.zeros(shape, v.dtype)}
    for name, layer in cache.items():
        if name.startswith("layers_"):
            k, v = layer["k"][:, :t], layer["v"][:, :t]
            shape = (b, beams * max_new_tokens) + k.shape[2:]
            out[name] = {"k": k, "v": v, "gk": jnp.zeros(shape, k.dtype), "gv": jnp.zeros(shape, v.dtype)}
    return out


def abstract_params(cfg: DecoderLMConfig, lora: Optional[LoRAConfig] = None, param_dtype=jnp.float32,
                    scan_layers: bool = False) -> dict:
    """Shapes/dtypes of `DecoderLM(cfg)`'s params, without allocating them (`jax.eval_shape`)."""
    model = DecoderLM(cfg, lora=lora, param_dtype=param_dtype, scan_layers=scan_layers)
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda r: model.init(r, input_ids=ids), jax.random.PRNGKey(0))
    return nn.unbox(shapes)["params"]
