"""Curriculum stage 2b: all tasks mixed by `data.mix_weights`; downsampler + layer weights + LoRA train.

    speechverse-jax train --config stage2_multitask --workdir runs/wlm/stage2_multitask \\
        --config.train.init_from=runs/wlm/stage2_warmup --config.base_checkpoint=checkpoints/base \\
        --config.data.train_manifests=... --config.data.mix_weights="asr=0.3,st=0.15,ic=0.1,..."
"""

from speechverse_jax.configs import common


def get_config(arg=None):
    return common.paper_stage_config("stage2_multitask", arg)
