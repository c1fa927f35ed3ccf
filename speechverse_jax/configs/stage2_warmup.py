"""Curriculum stage 2a: LoRA (r16 on q, v) grafted onto the stage-1 model with b = 0; ASR only.

    speechverse-jax train --config stage2_warmup --workdir runs/wlm/stage2_warmup \\
        --config.train.init_from=runs/wlm/stage1 --config.base_checkpoint=checkpoints/base ...
"""

from speechverse_jax.configs import common


def get_config(arg=None):
    return common.paper_stage_config("stage2_warmup", arg)
