"""The `config.model` section (its defaults live here) and ConfigDict -> `SpeechVerseConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections

from speechverse_jax.models import presets
from speechverse_jax.models.composed import LAYOUTS, ComposedConfig
from speechverse_jax.models.decoder_lm import DecoderLMConfig
from speechverse_jax.models.layers import DEFAULT_LORA_TARGETS, LoRAConfig
from speechverse_jax.models.speechverse import SpeechVerseConfig
from speechverse_jax.models.speechverse_decoder import SpeechVerseDecoderConfig
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig


def model_config(
    wavlm: str = "wavlm-large",
    t5: str = "flan-t5-xl",
    layer_combination: str = "last",
    strides=(2, 2),
    lora_rank: int = 16,
) -> ml_collections.ConfigDict:
    """The `config.model` section. `*_preset` only matter when no base checkpoint is given
    (shape checks, compile-only runs): a converted checkpoint carries its own architecture."""
    return ml_collections.ConfigDict(
        dict(
            # which LLM: 'auto' = the one the base checkpoint holds (`convert --t5` -> 't5',
            # `convert --llm` -> 'decoder'; 't5' without a base checkpoint), or 't5' / 'decoder'
            # to insist (a base of the other kind is then refused).
            layout="auto",
            wavlm_preset=wavlm,
            t5_preset=t5,
            llm_preset="llama-3.2-1b",  # decoder layout without a base checkpoint (presets.DECODER_LM)
            layer_combination=layer_combination,
            downsampler=dict(strides=tuple(strides), kernel_size=3),
            # rank 0 = no LoRA in the model (curriculum stage 1). target_regex: module paths,
            # matched with re.fullmatch (speechverse_jax/rules.py).
            lora=dict(rank=lora_rank, alpha=2.0 * max(lora_rank, 1), dropout=0.05, target_regex=DEFAULT_LORA_TARGETS),
            dtype="float32",
            frozen_param_dtype="float32",
            t5_dropout_rate=-1.0,  # dropout inside the frozen T5 while training; -1 = the checkpoint's (0.1 for Flan-T5)
            # nn.scan over identical layers (T5 blocks, WavLM layers 1..L-1): one compiled layer per
            # stack; params stacked on a leading `layers` axis (converted checkpoints load either way).
            scan_layers=False,
            remat="none",  # per T5 block / LLM layer: none | full | dots_saveable | dots_with_no_batch_dims_saveable
            # target (answer) positions per chunk of the training loss's LM head + softmax; 0 = all at
            # once. Chunks are recomputed in the backward pass: [b, target, vocab] float32 logits never exist.
            loss_chunk=0,
            # decoder-only LLM: queries per chunk of self-attention (0: all at once); one chunk's float32
            # scores [b, heads, chunk, T] exist at a time instead of [b, heads, T, T]. The T5 ignores it.
            attention_chunk=0,
        )
    )


def resolve_layout(model: ml_collections.ConfigDict, base_layout: Optional[str] = None) -> str:
    """'t5' or 'decoder' from `model.layout` and the base checkpoint's own (None: no base)."""
    want = str(model.layout)
    if want not in ("auto",) + LAYOUTS:
        raise ValueError(f"model.layout must be one of {('auto',) + LAYOUTS}, got {want!r}")
    if want == "auto":
        return base_layout or "t5"
    if base_layout is not None and base_layout != want:
        raise ValueError(f"model.layout={want!r} but the base checkpoint holds the {base_layout!r} layout's LLM; "
                         f"set model.layout='auto' or {base_layout!r}, or convert a base for {want!r}")
    return want


def _lora(model: ml_collections.ConfigDict) -> Optional[LoRAConfig]:
    if model.lora.rank < 0:
        raise ValueError(f"model.lora.rank must be >= 0, got {model.lora.rank}")
    if model.lora.rank == 0:
        return None
    return LoRAConfig(rank=int(model.lora.rank), alpha=float(model.lora.alpha),
                      dropout=float(model.lora.dropout), target_regex=str(model.lora.target_regex))


def build_model_config(
    model: ml_collections.ConfigDict,
    wavlm_cfg: Optional[WavLMConfig] = None,
    llm_cfg: Optional[Any] = None,
    layout: Optional[str] = None,
) -> ComposedConfig:
    """`config.model` (+ architectures from a converted checkpoint, else presets) -> the composed
    model config of `layout` (default: `resolve_layout(model)`; a `DecoderLMConfig` as `llm_cfg`
    implies 'decoder'): `SpeechVerseConfig` or `SpeechVerseDecoderConfig`."""
    if layout is None:
        layout = resolve_layout(model, "decoder" if isinstance(llm_cfg, DecoderLMConfig) else
                                ("t5" if llm_cfg is not None else None))
    if wavlm_cfg is None:
        if model.wavlm_preset not in presets.WAVLM:
            raise ValueError(f"model.wavlm_preset must be one of {sorted(presets.WAVLM)}, got {model.wavlm_preset!r}")
        wavlm_cfg = WavLMConfig.from_hf(presets.WAVLM[model.wavlm_preset])
    shared = dict(layer_combination=model.layer_combination,
                  downsample_strides=tuple(int(s) for s in model.downsampler.strides),
                  downsample_kernel=int(model.downsampler.kernel_size), lora=_lora(model), dtype=model.dtype,
                  frozen_param_dtype=model.frozen_param_dtype, loss_chunk=int(model.loss_chunk))
    if layout == "decoder":
        if llm_cfg is None:
            preset = str(model.llm_preset)
            if preset not in presets.DECODER_LM:
                raise ValueError(f"model.llm_preset must be one of {sorted(presets.DECODER_LM)}, got {preset!r}")
            llm_cfg = DecoderLMConfig.from_hf(presets.DECODER_LM[preset])
        # `model.scan_layers` scans the LLM's layers and WavLM's; `model.remat` applies to each LLM layer
        return SpeechVerseDecoderConfig(wavlm=wavlm_cfg, llm=llm_cfg, remat=str(model.remat),
                                        scan_layers=bool(model.scan_layers),
                                        attention_chunk=int(model.attention_chunk), **shared)
    t5_cfg = llm_cfg
    if t5_cfg is None:
        if model.t5_preset not in presets.T5:
            raise ValueError(f"model.t5_preset must be one of {sorted(presets.T5)}, got {model.t5_preset!r}")
        t5_cfg = T5Config.from_hf(presets.T5[model.t5_preset])
    dropout = float(model.t5_dropout_rate)
    if dropout >= 1.0:
        raise ValueError(f"model.t5_dropout_rate must be < 1 (or -1 for the checkpoint's), got {dropout}")
    if dropout >= 0:
        t5_cfg = dataclasses.replace(t5_cfg, dropout_rate=dropout)
    return SpeechVerseConfig(wavlm=wavlm_cfg, t5=t5_cfg, scan_layers=bool(model.scan_layers), remat=str(model.remat),
                             **shared)

