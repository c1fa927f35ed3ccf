"""HF causal LMs (Llama, Qwen2, Gemma 2, Gemma 3 text) <-> our `DecoderLM` params, without torch.

The name table is explicit (one entry per param); `convert_decoder_lm` refuses a checkpoint whose
tensors are missing, unexpected or mis-shaped, naming each one; `export_decoder_lm` writes the
HF layout back (`config.json` + `model.safetensors`), which `transformers` loads.
HF Linear weights are `[out, in]`; our kernels are `[in, out]`. RoPE needs no permutation: both
sides use rotate-half.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import numpy as np

from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint
from speechverse_jax.convert.name_table import Entry, convert, expected_shapes, transpose
from speechverse_jax.models.decoder_lm import DecoderLMConfig, abstract_params

# HF may write rotary buffers; a multimodal Gemma 3 checkpoint also holds its vision tower.
_ALWAYS_IGNORED = (r".*rotary_emb\.inv_freq",)
_VISION = (r"(model\.)?(vision_tower|multi_modal_projector)\..*",)
# Where the text model's tensors live: `*ForCausalLM` checkpoints, and multimodal Gemma 3
# (`Gemma3ForConditionalGeneration`: the hub layout `language_model.model.*`, and the
# transformers-5 module layout `model.language_model.*`).
TEXT_LAYOUT = (("model.",), ("lm_head.weight",))
GEMMA3_MULTIMODAL_LAYOUT = (("language_model.model.", "model.language_model."),
                            ("language_model.lm_head.weight", "lm_head.weight"))


def layout(hf_config: dict):
    """(body prefixes, lm_head names) of a checkpoint with this `config.json`."""
    return GEMMA3_MULTIMODAL_LAYOUT if hf_config.get("model_type") == "gemma3" else TEXT_LAYOUT


def name_table(cfg: DecoderLMConfig, hf_layout=TEXT_LAYOUT) -> List[Entry]:
    """Our param path <- HF tensor name (alternatives: the first present is used; export writes the
    first), for every param of `DecoderLM(cfg)` (no LoRA)."""
    bodies, heads = hf_layout

    def src(name: str):
        return (tuple(b + name for b in bodies),)

    table = [Entry("embed_tokens/embedding", src("embed_tokens.weight"))]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        for p in "qkvo":
            table.append(Entry(f"{ours}/self_attention/{p}/kernel", src(f"{hf}.self_attn.{p}_proj.weight"), transpose))
            bias = cfg.attention_out_bias if p == "o" else cfg.attention_bias
            if bias:
                table.append(Entry(f"{ours}/self_attention/{p}/bias", src(f"{hf}.self_attn.{p}_proj.bias")))
        if cfg.qk_norm:
            for p in "qk":
                table.append(Entry(f"{ours}/self_attention/{p}_norm/scale", src(f"{hf}.self_attn.{p}_norm.weight")))
        table.append(Entry(f"{ours}/input_norm/scale", src(f"{hf}.input_layernorm.weight")))
        table.append(Entry(f"{ours}/post_attention_norm/scale", src(f"{hf}.post_attention_layernorm.weight")))
        if cfg.is_gemma:
            table.append(Entry(f"{ours}/pre_mlp_norm/scale", src(f"{hf}.pre_feedforward_layernorm.weight")))
            table.append(Entry(f"{ours}/post_mlp_norm/scale", src(f"{hf}.post_feedforward_layernorm.weight")))
        for p in ("gate", "up", "down"):
            table.append(Entry(f"{ours}/mlp/{p}/kernel", src(f"{hf}.mlp.{p}_proj.weight"), transpose))
            if cfg.mlp_bias:
                table.append(Entry(f"{ours}/mlp/{p}/bias", src(f"{hf}.mlp.{p}_proj.bias")))
    table.append(Entry("final_norm/scale", src("norm.weight")))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head/kernel", (tuple(heads),), transpose))
    return table


def config_from_checkpoint(ckpt: HFCheckpoint) -> DecoderLMConfig:
    try:
        return DecoderLMConfig.from_hf(ckpt.config)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.folder}/config.json: {e}") from None


def _first(ckpt: HFCheckpoint, names) -> Optional[str]:
    return next((n for n in names if n in ckpt), None)


def convert_decoder_lm(ckpt: HFCheckpoint, dtype: Optional[np.dtype] = None) -> Tuple[DecoderLMConfig, dict]:
    """-> (config, params of `DecoderLM(config)`). Raises CheckpointError naming every tensor that does not fit.

    A multimodal Gemma 3 folder gives its text model (the vision tower is ignored)."""
    cfg = config_from_checkpoint(ckpt)
    hf_layout = layout(ckpt.config)
    bodies, heads = hf_layout
    ignore = list(_ALWAYS_IGNORED) + (list(_VISION) if hf_layout is GEMMA3_MULTIMODAL_LAYOUT else [])
    head = _first(ckpt, heads)
    if cfg.tie_word_embeddings and head is not None:
        # tied: the output projection is the embedding; a different lm_head would be silently dropped
        emb = _first(ckpt, [b + "embed_tokens.weight" for b in bodies])
        if emb is not None and (ckpt.shape(head) != ckpt.shape(emb) or not np.array_equal(ckpt.get(head), ckpt.get(emb))):
            raise CheckpointError(f"{ckpt.folder}: config says tie_word_embeddings but {head} differs "
                                  f"from {emb}; fix tie_word_embeddings in config.json")
        ignore.append(re.escape(head))
    expected = expected_shapes(abstract_params(cfg))
    params = convert(ckpt, name_table(cfg, hf_layout), expected, ignore=ignore, dtype=dtype)
    return cfg, params


def export_decoder_lm(cfg: DecoderLMConfig, params: dict, out_dir: str) -> str:
    """Write an HF `*ForCausalLM` folder (`config.json` + `model.safetensors`, float32); a Gemma 3
    converted from a multimodal folder is written as the text-only `Gemma3ForCausalLM`.

    Tokenizer files are the caller's. Params with LoRA adapters must be merged first
    (`models.lora.merge_lora`).
    """
    from speechverse_jax.convert.export import write_hf_folder

    def inverse(entry, value):
        name = entry.sources[0] if isinstance(entry.sources[0], str) else entry.sources[0][0]
        return {name: transpose(value) if entry.transform is transpose else value}

    return write_hf_folder(params, name_table(cfg), dict(cfg.to_hf(), torch_dtype="float32"), out_dir, inverse)
