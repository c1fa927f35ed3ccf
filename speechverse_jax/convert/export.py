"""Our params -> a Hugging Face folder (`config.json` + `model.safetensors`), without torch.

The inverse of the name tables: used to publish backbones trained here (the demo pretrains its
own) in the layout every HF tool reads, and to round-trip-test the converters. WavLM's positional
conv is written in weight-norm form with `g = ||v||` per tap (any such split is exact).
"""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
from safetensors.numpy import save_file

from speechverse_jax import tree as tree_lib
from speechverse_jax.convert import t5 as t5_conv
from speechverse_jax.convert import wavlm as wavlm_conv
from speechverse_jax.convert.name_table import Entry, transpose
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig


def _unfold_weight_norm(kernel: np.ndarray):
    """Our `[k, in, out]` kernel -> HF (g `(1, 1, k)`, v `(out, in, k)`) with `g = ||v||` per tap."""
    v = wavlm_conv.conv_kernel(kernel.astype(np.float32))  # the permutation is its own inverse
    return np.sqrt(np.sum(np.square(v), axis=(0, 1), keepdims=True)), v


def _inverse(entry: Entry, value: np.ndarray, cfg) -> Dict[str, np.ndarray]:
    names = [s if isinstance(s, str) else s[0] for s in entry.sources]  # the newest HF name
    t = entry.transform
    if t is None:
        return {names[0]: value}
    if t is transpose or t is wavlm_conv.conv_kernel:
        return {names[0]: t(value)}
    if t is wavlm_conv.flatten_heads:
        return {names[0]: value.reshape(1, -1, 1, 1)}
    if t is wavlm_conv.fold_weight_norm:
        g, v = _unfold_weight_norm(value)
        return {names[0]: g, names[1]: v}
    raise NotImplementedError(f"no inverse for the transform of {entry.path}")


def write_hf_folder(params: dict, table, hf_config: dict, out_dir: str, inverse) -> str:
    """`config.json` + float32 `model.safetensors` from our params through a name table;
    `inverse(entry, value)` -> {HF tensor name: array}. Every param must have an HF name."""
    from speechverse_jax.models.scan_layout import unstack_layers

    flat = unstack_layers(tree_lib.flatten(params))  # scanned params export too
    tensors = {}
    for entry in table:
        if entry.path not in flat:
            raise KeyError(f"param {entry.path} is missing from the tree being exported")
        for name, value in inverse(entry, np.asarray(flat[entry.path], np.float32)).items():
            tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
    extra = sorted(set(flat) - {e.path for e in table})
    if extra:
        raise KeyError(f"params with no HF name (merge or drop LoRA first?): {extra[:10]}")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return out_dir


def export_wavlm(cfg: WavLMConfig, params: dict, out_dir: str) -> str:
    """Write an HF `WavLMModel` folder."""
    hf = dict(cfg.to_dict(), model_type="wavlm", architectures=["WavLMModel"])
    return write_hf_folder(params, wavlm_conv.name_table(cfg), hf, out_dir, lambda e, v: _inverse(e, v, cfg))


def export_t5(cfg: T5Config, params: dict, out_dir: str) -> str:
    """Write an HF `T5ForConditionalGeneration` folder (tokenizer files are the caller's)."""
    hf = dict(cfg.to_dict(), model_type="t5", architectures=["T5ForConditionalGeneration"],
              is_encoder_decoder=True, scale_decoder_outputs=cfg.tie_word_embeddings,
              tie_word_embeddings=cfg.tie_word_embeddings, is_gated_act=cfg.is_gated,
              dense_act_fn="gelu_new" if cfg.is_gated else "relu")
    return write_hf_folder(params, t5_conv.name_table(cfg), hf, out_dir, lambda e, v: _inverse(e, v, cfg))
