"""HF causal LMs (Llama, Qwen2, Gemma 2, Gemma 3 text) <-> our `DecoderLM` params, without torch.

The name table is explicit (one entry per param); `convert_decoder_lm` refuses a checkpoint whose
tensors are missing, unexpected or mis-shaped, naming each one; `export_decoder_lm` writes the
HF layout back (`config.json` + `model.safetensors`), which `transformers` loads.
HF Linear weights are `[out, in]`; our kernels are `[in, out]`. RoPE needs no permutation: both
sides use rotate-half.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint
from speechverse_jax.convert.name_table import Entry, convert, expected_shapes, transpose
from speechverse_jax.models.decoder_lm import DecoderLMConfig, abstract_params

# A multimodal Gemma 3 checkpoint nests the text model; HF may also write rotary buffers.
_ALWAYS_IGNORED = (r".*rotary_emb\.inv_freq",)


def name_table(cfg: DecoderLMConfig) -> List[Entry]:
    """Our param path <- HF tensor name, for every param of `DecoderLM(cfg)` (no LoRA)."""
    table = [Entry("embed_tokens/embedding", ("model.embed_tokens.weight",))]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        for p in "qkvo":
            table.append(Entry(f"{ours}/self_attention/{p}/kernel", (f"{hf}.self_attn.{p}_proj.weight",), transpose))
            bias = cfg.attention_out_bias if p == "o" else cfg.attention_bias
            if bias:
                table.append(Entry(f"{ours}/self_attention/{p}/bias", (f"{hf}.self_attn.{p}_proj.bias",)))
        if cfg.qk_norm:
            for p in "qk":
                table.append(Entry(f"{ours}/self_attention/{p}_norm/scale", (f"{hf}.self_attn.{p}_norm.weight",)))
        table.append(Entry(f"{ours}/input_norm/scale", (f"{hf}.input_layernorm.weight",)))
        table.append(Entry(f"{ours}/post_attention_norm/scale", (f"{hf}.post_attention_layernorm.weight",)))
        if cfg.is_gemma:
            table.append(Entry(f"{ours}/pre_mlp_norm/scale", (f"{hf}.pre_feedforward_layernorm.weight",)))
            table.append(Entry(f"{ours}/post_mlp_norm/scale", (f"{hf}.post_feedforward_layernorm.weight",)))
        for p in ("gate", "up", "down"):
            table.append(Entry(f"{ours}/mlp/{p}/kernel", (f"{hf}.mlp.{p}_proj.weight",), transpose))
            if cfg.mlp_bias:
                table.append(Entry(f"{ours}/mlp/{p}/bias", (f"{hf}.mlp.{p}_proj.bias",)))
    table.append(Entry("final_norm/scale", ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head/kernel", ("lm_head.weight",), transpose))
    return table


def config_from_checkpoint(ckpt: HFCheckpoint) -> DecoderLMConfig:
    try:
        return DecoderLMConfig.from_hf(ckpt.config)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.folder}/config.json: {e}") from None


def convert_decoder_lm(ckpt: HFCheckpoint, dtype: Optional[np.dtype] = None) -> Tuple[DecoderLMConfig, dict]:
    """-> (config, params of `DecoderLM(config)`). Raises CheckpointError naming every tensor that does not fit."""
    cfg = config_from_checkpoint(ckpt)
    ignore = list(_ALWAYS_IGNORED)
    if cfg.tie_word_embeddings and "lm_head.weight" in ckpt:
        # tied: the output projection is the embedding; a different lm_head would be silently dropped
        emb = "model.embed_tokens.weight"
        if emb in ckpt and (ckpt.shape("lm_head.weight") != ckpt.shape(emb)
                            or not np.array_equal(ckpt.get("lm_head.weight"), ckpt.get(emb))):
            raise CheckpointError(f"{ckpt.folder}: config says tie_word_embeddings but lm_head.weight differs "
                                  f"from {emb}; fix tie_word_embeddings in config.json")
        ignore.append(r"lm_head\.weight")
    expected = expected_shapes(abstract_params(cfg))
    params = convert(ckpt, name_table(cfg), expected, ignore=ignore, dtype=dtype)
    return cfg, params


def export_decoder_lm(cfg: DecoderLMConfig, params: dict, out_dir: str) -> str:
    """Write an HF `*ForCausalLM` folder (`config.json` + `model.safetensors`, float32).

    Tokenizer files are the caller's. Params with LoRA adapters must be merged first
    (`models.lora.merge_lora`).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    table = name_table(cfg)
    tensors = {}
    for entry in table:
        if entry.path not in flat:
            raise KeyError(f"param {entry.path} is missing from the tree being exported")
        value = np.asarray(flat[entry.path], np.float32)
        tensors[entry.sources[0]] = np.ascontiguousarray(transpose(value) if entry.transform is transpose else value)
    extra = sorted(set(flat) - {e.path for e in table})
    if extra:
        raise KeyError(f"params with no HF name (merge or drop LoRA first?): {extra[:10]}")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(cfg.to_hf(), torch_dtype="float32"), f, indent=2)
    return out_dir
