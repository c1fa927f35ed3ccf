"""Curriculum stage 1 (paper Sec. 2.3): ASR only; the conv downsampler (and layer weights) train, no LoRA.

    speechverse-jax train --config stage1 --workdir runs/wlm/stage1 \\
        --config.base_checkpoint=checkpoints/base \\
        --config.data.train_manifests=data/librispeech/train.jsonl,data/cv/asr_train.jsonl \\
        --config.data.eval_manifests=data/librispeech/dev.jsonl

`arg` (optional) picks the model layout: "wlm" (default: WavLM-Large last layer, strides [2, 2])
or "weighted" (the weighted sum of all layers, the paper's Best-RQ setting).
"""

from speechverse_jax.configs import common


def get_config(arg=None):
    return common.paper_stage_config("stage1", arg)
