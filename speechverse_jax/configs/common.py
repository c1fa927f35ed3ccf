"""Builders shared by the config modules: a curriculum stage, and the paper's full-size layouts.

The sections come from the layers that read them (one place per default):
`models/config.py` (model), `train/config.py` (train, optim, mesh), `data/config.py` (data).
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from speechverse_jax.data.config import default_data_config
from speechverse_jax.models.config import model_config
from speechverse_jax.train import slices
from speechverse_jax.train.config import RULES_STAGE1, RULES_STAGE2, train_config

STAGES = ("stage1", "stage2_warmup", "stage2_multitask")

# The paper's full-size layouts (Table 11), by the `arg` of the stage config modules.
PAPER_LAYOUTS = {
    # Multitask-WLM: WavLM-Large last layer, strides [2, 2] (50 Hz -> 12.5 Hz), Flan-T5-XL, LoRA r16.
    "wlm": dict(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="last", strides=(2, 2)),
    # The Best-RQ recipe's learnable weighted sum of all layers (Eq. 1), on WavLM-Large.
    "weighted": dict(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="weighted", strides=(2, 2)),
}


def stage_config(stage: str, model_kwargs: Optional[dict] = None, max_steps: int = 20000, lr: float = 1e-3,
                 warmup_steps: int = 100, batch_size: int = 768) -> ml_collections.ConfigDict:
    """A full curriculum-stage config: model, train/optim/mesh, data.

    stage1: ASR only, downsampler + layer weights train, no LoRA in the model.
    stage2_warmup: LoRA added (grafted, b = 0), ASR only, downsampler + layer weights + LoRA train.
    stage2_multitask: all tasks mixed by `data.mix_weights`, same trainable set.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    kw = dict(model_kwargs or {})
    kw["lora_rank"] = 0 if stage == "stage1" else kw.get("lora_rank", 16)
    config = train_config(max_steps=max_steps, lr=lr, warmup_steps=warmup_steps,
                          rules=RULES_STAGE1 if stage == "stage1" else RULES_STAGE2)
    config.stage = stage
    config.base_checkpoint = ""  # folder written by `speechverse-jax convert`
    config.model = model_config(**kw)
    config.data = default_data_config()
    config.data.batch_size = batch_size
    if stage != "stage2_multitask":
        config.data.mix_weights = "asr=1.0"
    return config


def parse_paper_arg(arg: Optional[str]):
    """The config-module `arg`: a layout and/or a slice preset, comma-separated, in any order
    ("wlm", "weighted", "wlm,v5e-16", "v5e-16", ""). Returns (layout, slice name or None)."""
    layout, slice_name = None, None
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item in PAPER_LAYOUTS and layout is None:
            layout = item
        elif item in slices.PRESETS and slice_name is None:
            slice_name = item
        else:
            what = "a second layout" if item in PAPER_LAYOUTS else (
                "a second slice" if item in slices.PRESETS else "unknown")
            raise ValueError(
                f"config arg {arg!r}: {item!r} is {what}; the arg is 'LAYOUT', 'SLICE' or 'LAYOUT,SLICE' "
                f"with LAYOUT one of {sorted(PAPER_LAYOUTS)} (default 'wlm') and SLICE one of "
                f"{sorted(slices.PRESETS)} (see speechverse_jax/train/slices.py)")
    return layout or "wlm", slice_name


def paper_stage_config(stage: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """A stage of the paper's recipe at full size: bf16 compute and bf16-stored frozen weights.

    `arg` is "LAYOUT", "SLICE" or "LAYOUT,SLICE" (`parse_paper_arg`): the layout picks the model
    (`PAPER_LAYOUTS`), the slice preset sets the mesh, the global batch and gradient accumulation
    (`train.slices.apply_slice`); without a slice the mesh is pure data parallel over all devices.
    """
    layout, slice_name = parse_paper_arg(arg)
    config = stage_config(stage, model_kwargs=PAPER_LAYOUTS[layout])
    config.model.dtype = "bfloat16"
    config.model.frozen_param_dtype = "bfloat16"
    # full size: one compiled layer per stack, and each T5 block's activations recomputed in the
    # backward pass from its input (docs/scale.md has the measurements)
    config.model.scan_layers = True
    config.model.remat = "full"
    # the loss's LM head + softmax 32 target positions at a time, and (decoder-only LLMs) the
    # self-attention 256 queries at a time: neither [rows, target, vocab] logits nor [rows, heads,
    # T, T] scores exist whole. Llama-3.2-3B on v5e-16 at 24 rows: 19.32G of temporaries (does not
    # fit) -> 12.47 GiB peak (docs/decoder_llms.md)
    config.model.loss_chunk = 32
    config.model.attention_chunk = 256
    if slice_name is not None:
        slices.apply_slice(config, slice_name)
    return config
