"""The paper's Multitask-WLM model: WavLM-Large (last layer) + conv 2x[k3, s2] + Flan-T5-XL, LoRA r16 on q,v.

Shapes only for now (Table 11: 2.9B params, 28.3M trainable):
    python -c "from configs.multitask_wlm import get_config; print(get_config())"
Stage configs of the curriculum build on this model section.
"""

import ml_collections

from speechverse_jax import config_lib


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.model = config_lib.model_config(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="last",
                                           strides=(2, 2), lora_rank=16)
    config.model.dtype = "bfloat16"
    config.model.frozen_param_dtype = "bfloat16"
    config.base_checkpoint = ""  # folder written by `speechverse-jax convert`
    return config
