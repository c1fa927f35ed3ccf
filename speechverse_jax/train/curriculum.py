"""Run one stage from its config, or the whole curriculum, each stage from the previous best.

A finished stage leaves `DONE.json` in its folder (its summary); running the curriculum again skips
finished stages and resumes an interrupted one from its latest checkpoint.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Optional

import jax

from speechverse_jax import fs
from speechverse_jax.train.loop import TrainData, train

DONE = "DONE.json"


def make_data(config) -> TrainData:
    """The manifest pipeline of `config.data`; the tokenizer defaults to the base checkpoint's, the
    prompt format follows the model's layout (`model.layout` and the base checkpoint)."""
    from speechverse_jax.checkpoints import model_config_for
    from speechverse_jax.data.loader import ManifestData
    from speechverse_jax.models.composed import layout_of

    if not config.data.tokenizer:
        if not config.base_checkpoint:
            raise ValueError("config.data.tokenizer is empty and there is no config.base_checkpoint to take it from")
        with config.unlocked():
            config.data.tokenizer = config.base_checkpoint
    return ManifestData(config.data, layout=layout_of(model_config_for(config.model, config.base_checkpoint)))


def check_config(config) -> None:
    """Clear errors for values that would otherwise fail deep inside the first step."""
    accum, batch = int(config.train.accum_steps), int(config.data.batch_size)
    if accum < 1 or batch % accum:
        raise ValueError(f"data.batch_size={batch} must be a positive multiple of train.accum_steps={accum}")
    if batch % jax.process_count():
        raise ValueError(f"data.batch_size={batch} must divide over the {jax.process_count()} processes")
    for field in ("max_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if int(config.train[field]) < 1:
            raise ValueError(f"train.{field} must be >= 1, got {config.train[field]}")


def run_stage(config, workdir: str, data: Optional[TrainData] = None, progress: bool = True) -> Dict[str, Any]:
    check_config(config)
    data = data if data is not None else make_data(config)
    out = train(config, workdir, data, progress=progress)
    if jax.process_index() == 0:
        fs.write_text(f"{workdir}/{DONE}", json.dumps(out["summary"], indent=2, default=str))
    return out["summary"]


def stage_configs(config) -> Dict[str, Any]:
    """Each stage's config with the shared fields filled in and `init_from` chained."""
    out = {}
    previous = None
    for name in config.order:
        stage = copy.deepcopy(config[name])
        with stage.unlocked():
            if config.base_checkpoint:
                stage.base_checkpoint = config.base_checkpoint
            for key in ("train_manifests", "eval_manifests", "tokenizer"):
                if config.data[key]:
                    stage.data[key] = config.data[key]
            if previous is not None and not stage.train.init_from:
                stage.train.init_from = previous
        out[name] = stage
        previous = name
    return out


def run_curriculum(config, workdir: str, progress: bool = True, data_factory=make_data) -> Dict[str, Any]:
    summaries = {}
    for name, stage in stage_configs(config).items():
        stage_dir = f"{workdir.rstrip('/')}/{name}"
        if stage.train.init_from in config.order:
            with stage.unlocked():
                stage.train.init_from = f"{workdir.rstrip('/')}/{stage.train.init_from}"
        done = f"{stage_dir}/{DONE}"
        if fs.exists(done):
            summaries[name] = json.loads(fs.read_text(done))
            print(f"[curriculum] {name}: already finished ({summaries[name].get('stop_reason')}), skipped")
            continue
        print(f"[curriculum] {name}: starting in {stage_dir}"
              + (f" from {stage.train.init_from}" if stage.train.init_from else ""))
        summaries[name] = run_stage(stage, stage_dir, data_factory(stage), progress=progress)
    return summaries
