"""The paper's Multitask-BRQ layout on WavLM-Large: learnable weighted sum of all layers (Eq. 1).

The Best-RQ encoder itself is in-house and not public; this config keeps the BRQ recipe's
layer combination and LoRA and uses WavLM-Large's 50 Hz frames with strides [2, 2].
"""

import ml_collections

from speechverse_jax import config_lib


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.model = config_lib.model_config(wavlm="wavlm-large", t5="flan-t5-xl", layer_combination="weighted",
                                           strides=(2, 2), lora_rank=16)
    config.model.dtype = "bfloat16"
    config.model.frozen_param_dtype = "bfloat16"
    config.base_checkpoint = ""
    return config
