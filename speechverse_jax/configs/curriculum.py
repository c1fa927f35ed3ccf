"""The whole curriculum: stage1 -> stage2_warmup -> stage2_multitask, each from the previous best.

    speechverse-jax curriculum --config curriculum --workdir runs/wlm \
        --config.base_checkpoint=checkpoints/base \
        --config.data.train_manifests=... --config.data.eval_manifests=... \
        --config.stage1.train.max_steps=5000

Shared settings (`base_checkpoint`, `data.*` paths and tokenizer) are set once here and copied into
every stage; per-stage settings live under `stage1`, `stage2_warmup`, `stage2_multitask`.
"""

import ml_collections

from speechverse_jax import configs
from speechverse_jax.configs import common


def get_config(arg="wlm"):
    config = ml_collections.ConfigDict()
    config.order = list(common.STAGES)
    config.base_checkpoint = ""
    config.data = ml_collections.ConfigDict(dict(train_manifests="", eval_manifests="", tokenizer=""))
    for stage in common.STAGES:
        config[stage] = configs.load(stage, arg)
    return config
