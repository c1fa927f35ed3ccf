"""Builders shared by the config modules in configs/, and ConfigDict -> model config.

The config modules (`configs/*.py`, `get_config(arg)`) stay short: they call these builders and
override what differs. `model_config` returns the `config.model` section.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from speechverse_jax.models import presets
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax.models.speechverse import SpeechVerseConfig
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig

DEFAULT_LORA_TARGETS = r".*/(self_attention|cross_attention)/(q|v)$"


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
            wavlm_preset=wavlm,
            t5_preset=t5,
            layer_combination=layer_combination,
            downsampler=dict(strides=tuple(strides), kernel_size=3),
            # rank 0 = no LoRA in the model (curriculum stage 1).
            lora=dict(rank=lora_rank, alpha=2.0 * max(lora_rank, 1), dropout=0.05, target_regex=DEFAULT_LORA_TARGETS),
            dtype="float32",
            frozen_param_dtype="float32",
            t5_dropout_rate=-1.0,  # dropout inside the frozen T5 while training; -1 = the checkpoint's (0.1 for Flan-T5)
            # nn.scan over identical layers (T5 blocks, WavLM layers 1..L-1): one compiled layer per
            # stack; params stacked on a leading `layers` axis (converted checkpoints load either way).
            scan_layers=False,
            remat="none",  # per T5 block: none | full | dots_saveable | dots_with_no_batch_dims_saveable
        )
    )


def build_model_config(
    model: ml_collections.ConfigDict,
    wavlm_cfg: Optional[WavLMConfig] = None,
    t5_cfg: Optional[T5Config] = None,
) -> SpeechVerseConfig:
    """`config.model` (+ architectures from a converted checkpoint, else presets) -> SpeechVerseConfig."""
    if wavlm_cfg is None:
        if model.wavlm_preset not in presets.WAVLM:
            raise ValueError(f"model.wavlm_preset must be one of {sorted(presets.WAVLM)}, got {model.wavlm_preset!r}")
        wavlm_cfg = WavLMConfig.from_hf(presets.WAVLM[model.wavlm_preset])
    if t5_cfg is None:
        if model.t5_preset not in presets.T5:
            raise ValueError(f"model.t5_preset must be one of {sorted(presets.T5)}, got {model.t5_preset!r}")
        t5_cfg = T5Config.from_hf(presets.T5[model.t5_preset])
    dropout = float(model.get("t5_dropout_rate", -1.0))
    if dropout >= 1.0:
        raise ValueError(f"model.t5_dropout_rate must be < 1 (or -1 for the checkpoint's), got {dropout}")
    if dropout >= 0:
        t5_cfg = dataclasses.replace(t5_cfg, dropout_rate=dropout)
    lora = None
    if model.lora.rank < 0:
        raise ValueError(f"model.lora.rank must be >= 0, got {model.lora.rank}")
    if model.lora.rank > 0:
        lora = LoRAConfig(rank=int(model.lora.rank), alpha=float(model.lora.alpha),
                          dropout=float(model.lora.dropout), target_regex=str(model.lora.target_regex))
    return SpeechVerseConfig(
        wavlm=wavlm_cfg,
        t5=t5_cfg,
        layer_combination=model.layer_combination,
        downsample_strides=tuple(int(s) for s in model.downsampler.strides),
        downsample_kernel=int(model.downsampler.kernel_size),
        lora=lora,
        dtype=model.dtype,
        frozen_param_dtype=model.frozen_param_dtype,
        scan_layers=bool(model.get("scan_layers", False)),
        remat=str(model.get("remat", "none")),
    )


# Which params train, per curriculum stage (ordered; first match wins; every param must match).
RULES_STAGE1 = (
    (r"^downsampler/", "train"),
    (r"^layer_weights/", "train"),
    (r"^wavlm/", "freeze"),
    (r"^t5/", "freeze"),
)
RULES_STAGE2 = (
    (r"^t5/.*/lora_[ab]$", "train"),
    (r"^downsampler/", "train"),
    (r"^layer_weights/", "train"),
    (r"^wavlm/", "freeze"),
    (r"^t5/", "freeze"),
)


def train_config(max_steps: int = 10000, lr: float = 1e-3, warmup_steps: int = 100,
                 rules=RULES_STAGE1) -> ml_collections.ConfigDict:
    """`config.train`, `config.optim` and `config.mesh` sections with the paper's defaults
    (AdamW, peak 1e-3, 100 warm-up steps for the WavLM model). The batch size is `data.batch_size`."""
    from speechverse_jax.train.partitioning import DEFAULT_RULES

    return ml_collections.ConfigDict(dict(
        train=dict(
            seed=0,
            accum_steps=1,  # micro-batches per update (data.batch_size must divide by it)
            max_steps=max_steps,
            param_rules=[list(r) for r in rules],
            init_from="",  # previous stage run folder: its best checkpoint's trainable params
            log_every=10,
            eval_every=500,
            checkpoint_every=500,
            keep_checkpoints=3,
            early_stopping_patience=5,  # evaluations without val improvement (paper: 5 epochs); 0 = off
            max_consecutive_skips=10,  # non-finite steps in a row before the run stops
            tensorboard=True,
        ),
        optim=dict(lr=lr, warmup_steps=warmup_steps, total_steps=max_steps, decay="cosine", final_lr_fraction=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0),
        # topology: the TPU topology a slice preset targets (compile-only checks), e.g. "v5e:4x4".
        mesh=dict(data=-1, fsdp=1, tensor=1, rules=[list(r) for r in DEFAULT_RULES], topology=""),
    ))


def stage_config(stage: str, model_kwargs: Optional[dict] = None, max_steps: int = 20000, lr: float = 1e-3,
                 warmup_steps: int = 100, batch_size: int = 768) -> ml_collections.ConfigDict:
    """A full curriculum-stage config: model, train/optim/mesh, data.

    stage1: ASR only, downsampler + layer weights train, no LoRA in the model.
    stage2_warmup: LoRA added (grafted, b = 0), ASR only, downsampler + layer weights + LoRA train.
    stage2_multitask: all tasks mixed by `data.mix_weights`, same trainable set.
    """
    from speechverse_jax.data.pipeline import default_data_config

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


STAGES = ("stage1", "stage2_warmup", "stage2_multitask")

# The paper's full-size layouts (Table 11), by the `arg` of the stage config modules.
PAPER_LAYOUTS = {
    # Multitask-WLM: WavLM-Large last layer, strides [2, 2] (50 Hz -> 12.5 Hz), Flan-T5-XL, LoRA r16.
    "wlm": dict(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="last", strides=(2, 2)),
    # The Best-RQ recipe's learnable weighted sum of all layers (Eq. 1), on WavLM-Large.
    "weighted": dict(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="weighted", strides=(2, 2)),
}


def parse_paper_arg(arg: Optional[str]):
    """The config-module `arg`: a layout and/or a slice preset, comma-separated, in any order
    ("wlm", "weighted", "wlm,v5e-16", "v5e-16", ""). Returns (layout, slice name or None)."""
    from speechverse_jax.train import slices

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
    from speechverse_jax.train import slices

    layout, slice_name = parse_paper_arg(arg)
    config = stage_config(stage, model_kwargs=PAPER_LAYOUTS[layout])
    config.model.dtype = "bfloat16"
    config.model.frozen_param_dtype = "bfloat16"
    # full size: one compiled layer per stack, and each T5 block's activations recomputed in the
    # backward pass from its input (docs/scale.md has the measurements)
    config.model.scan_layers = True
    config.model.remat = "full"
    if slice_name is not None:
        slices.apply_slice(config, slice_name)
    return config


def load_config_file(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config module given by path (as ml_collections config_flags does)."""
    import importlib.util
    import os

    name = "_svj_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
