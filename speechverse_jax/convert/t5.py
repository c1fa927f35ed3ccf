"""HF `T5ForConditionalGeneration` (T5 v1.0, v1.1, Flan-T5, mT5) -> our T5 params."""

from __future__ import annotations

from typing import List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint
from speechverse_jax.convert.name_table import Entry, convert, expected_shapes, transpose
from speechverse_jax.models.t5 import T5, T5Config

# Tied copies HF may or may not write; an old cross-attention bias HF itself ignores on load.
_ALWAYS_IGNORED = (
    r"encoder\.embed_tokens\.weight",
    r"decoder\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)


def ignore_patterns(cfg: T5Config) -> Tuple[str, ...]:
    return _ALWAYS_IGNORED + ((r"lm_head\.weight",) if cfg.tie_word_embeddings else ())


def name_table(cfg: T5Config) -> List[Entry]:
    table = [Entry("shared/embedding", ("shared.weight",))]
    for stack, n, decoder in (("encoder", cfg.num_layers, False), ("decoder", cfg.num_decoder_layers, True)):
        table.append(Entry(f"{stack}/relative_attention_bias/embedding",
                           (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}/block_{i}"
            for p in "qkvo":
                table.append(Entry(f"{ours}/self_attention/{p}/kernel", (f"{hf}.0.SelfAttention.{p}.weight",), transpose))
            table.append(Entry(f"{ours}/self_attention_norm/scale", (f"{hf}.0.layer_norm.weight",)))
            ff = 1
            if decoder:
                for p in "qkvo":
                    table.append(Entry(f"{ours}/cross_attention/{p}/kernel",
                                       (f"{hf}.1.EncDecAttention.{p}.weight",), transpose))
                table.append(Entry(f"{ours}/cross_attention_norm/scale", (f"{hf}.1.layer_norm.weight",)))
                ff = 2
            for p in (("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")):
                table.append(Entry(f"{ours}/mlp/{p}/kernel", (f"{hf}.{ff}.DenseReluDense.{p}.weight",), transpose))
            table.append(Entry(f"{ours}/mlp_norm/scale", (f"{hf}.{ff}.layer_norm.weight",)))
        table.append(Entry(f"{stack}/final_norm/scale", (f"{stack}.final_layer_norm.weight",)))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head/kernel", ("lm_head.weight",), transpose))
    return table


def abstract_params(cfg: T5Config, param_dtype=jnp.float32) -> dict:
    """Shapes/dtypes of `T5(cfg)`'s params (no LoRA), without allocating them."""
    ids = jnp.zeros((1, 2), jnp.int32)
    model = T5(cfg, param_dtype=param_dtype)
    shapes = jax.eval_shape(lambda r: model.init(r, input_ids=ids, decoder_input_ids=ids), jax.random.PRNGKey(0))
    return nn.unbox(shapes)["params"]


def convert_t5(ckpt: HFCheckpoint, dtype: Optional[np.dtype] = None) -> Tuple[T5Config, dict]:
    """-> (config, params of `T5(config)`). Raises CheckpointError naming any tensor that does not fit."""
    try:
        cfg = T5Config.from_hf(ckpt.config)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.folder}/config.json: {e}") from None
    if cfg.tie_word_embeddings and "lm_head.weight" in ckpt and "shared.weight" in ckpt:
        # A tied model's output projection is the (scaled) shared embedding; a separate, different
        # lm_head would be silently dropped.
        if ckpt.shape("lm_head.weight") != ckpt.shape("shared.weight") or not np.array_equal(
            ckpt.get("lm_head.weight"), ckpt.get("shared.weight")
        ):
            raise CheckpointError(
                f"{ckpt.folder}: config says tied embeddings (tie_word_embeddings / scale_decoder_outputs "
                "true) but lm_head.weight differs from shared.weight; a scaled untied output is not supported"
            )
    expected = expected_shapes(abstract_params(cfg))
    params = convert(ckpt, name_table(cfg), expected, ignore=ignore_patterns(cfg), dtype=dtype)
    return cfg, params
