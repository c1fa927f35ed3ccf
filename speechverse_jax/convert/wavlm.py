"""HF `WavLMModel` state dict -> params of `models.wavlm.WavLM`.

Layouts: torch Linear `[out, in]` -> kernel `[in, out]`; torch Conv1d `[out, in, k]` -> `[k, in, out]`.
The positional conv's weight norm (g `(1, 1, K)`, v `(out, in/groups, K)`, norm over every dim but
the taps) is folded into a plain kernel here.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.convert.hf_io import HFCheckpoint
from speechverse_jax.convert.name_table import Entry, convert, expected_shapes, transpose
from speechverse_jax.models.wavlm import WavLM, WavLMConfig

# HF tensors we do not use: the SpecAugment mask vector, and the heads of task models
# (WavLMForCTC, ...ForSequenceClassification, ...ForAudioFrameClassification, ...ForXVector).
IGNORE = (
    r"(wavlm\.)?masked_spec_embed",
    r"lm_head\.(weight|bias)",
    r"layer_weights",
    r"(projector|classifier|feature_extractor)\.(weight|bias)",
    r"tdnn\.\d+\.kernel\.(weight|bias)",
    r"objective\.weight",
)

PREFIX = "wavlm."

_POS_CONV = "encoder.pos_conv_embed.conv."
POS_CONV_G = (_POS_CONV + "parametrizations.weight.original0", _POS_CONV + "weight_g")
POS_CONV_V = (_POS_CONV + "parametrizations.weight.original1", _POS_CONV + "weight_v")


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv1d weight `[out, in, k]` -> `[k, in, out]`."""
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)))


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight norm over dim 2 (`w = g * v / ||v||`, norm per tap) -> our kernel `[k, in, out]`."""
    v32 = v.astype(np.float32)
    norm = np.sqrt(np.sum(np.square(v32), axis=(0, 1), keepdims=True))
    return conv_kernel(v32 * (g.astype(np.float32) / norm))


def flatten_heads(c: np.ndarray) -> np.ndarray:
    """`gru_rel_pos_const` `(1, heads, 1, 1)` -> `[heads]`."""
    return c.reshape(-1)


def _linear(ours: str, hf: str) -> List[Entry]:
    return [Entry(f"{ours}/kernel", (f"{hf}.weight",), transpose), Entry(f"{ours}/bias", (f"{hf}.bias",))]


def _norm(ours: str, hf: str) -> List[Entry]:
    return [Entry(f"{ours}/scale", (f"{hf}.weight",)), Entry(f"{ours}/bias", (f"{hf}.bias",))]


def name_table(cfg: WavLMConfig) -> List[Entry]:
    """Every tensor of an HF `WavLMModel` with this config, mapped to our param paths."""
    table: List[Entry] = []
    for i in range(len(cfg.conv_dim)):
        ours, hf = f"feature_extractor/conv_layers_{i}", f"feature_extractor.conv_layers.{i}"
        table.append(Entry(f"{ours}/conv/kernel", (f"{hf}.conv.weight",), conv_kernel))
        if cfg.conv_bias:
            table.append(Entry(f"{ours}/conv/bias", (f"{hf}.conv.bias",)))
        if cfg.feat_extract_norm == "layer" or i == 0:
            table += _norm(f"{ours}/layer_norm", f"{hf}.layer_norm")
    table += _norm("feature_projection/layer_norm", "feature_projection.layer_norm")
    table += _linear("feature_projection/projection", "feature_projection.projection")
    table.append(Entry("encoder/pos_conv_embed/conv/kernel", (POS_CONV_G, POS_CONV_V), fold_weight_norm))
    table.append(Entry("encoder/pos_conv_embed/conv/bias", (_POS_CONV + "bias",)))
    table += _norm("encoder/layer_norm", "encoder.layer_norm")
    for i in range(cfg.num_hidden_layers):
        ours, hf = f"encoder/layers_{i}", f"encoder.layers.{i}"
        for o, h in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            table += _linear(f"{ours}/attention/{o}", f"{hf}.attention.{h}")
        table.append(Entry(f"{ours}/attention/gru_rel_pos_const", (f"{hf}.attention.gru_rel_pos_const",),
                           flatten_heads))
        table += _linear(f"{ours}/attention/gru_rel_pos_linear", f"{hf}.attention.gru_rel_pos_linear")
        if i == 0:
            table.append(Entry(f"{ours}/attention/rel_attn_embed", (f"{hf}.attention.rel_attn_embed.weight",)))
        table += _norm(f"{ours}/layer_norm", f"{hf}.layer_norm")
        table += _linear(f"{ours}/mlp/intermediate", f"{hf}.feed_forward.intermediate_dense")
        table += _linear(f"{ours}/mlp/output", f"{hf}.feed_forward.output_dense")
        table += _norm(f"{ours}/final_layer_norm", f"{hf}.final_layer_norm")
    return table


def _min_samples(cfg: WavLMConfig) -> int:
    """The shortest input that gives one frame."""
    n = 1
    for k, s in reversed(list(zip(cfg.conv_kernel, cfg.conv_stride))):
        n = (n - 1) * s + k
    return n


def abstract_params(cfg: WavLMConfig, param_dtype=jnp.float32) -> dict:
    """Shapes/dtypes of `WavLM(cfg).init(...)['params']`, without allocating."""
    model = WavLM(cfg, param_dtype=param_dtype)
    audio = jax.ShapeDtypeStruct((1, _min_samples(cfg)), jnp.float32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), audio))["params"]


def convert_wavlm(ckpt: HFCheckpoint, dtype: Optional[np.dtype] = None) -> Tuple[WavLMConfig, dict]:
    """(config, params of `WavLM`) from an HF WavLM folder; a `wavlm.`-prefixed task model works too.

    Raises CheckpointError listing missing / unexpected / mis-shaped tensors, and ValueError for
    config values we do not support.
    """
    cfg = WavLMConfig.from_hf(ckpt.config)
    prefix = PREFIX if any(n.startswith(PREFIX) for n in ckpt.names()) else ""
    expected = expected_shapes(abstract_params(cfg))
    params = convert(ckpt, name_table(cfg), expected, ignore=IGNORE, dtype=dtype, prefix=prefix)
    return cfg, params
