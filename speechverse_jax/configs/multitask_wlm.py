"""The paper's full-size model: WavLM-Large + conv 2x[k3, s2] + Flan-T5-XL with LoRA r16 on q, v.

`arg` picks the layer combination: "wlm" (default, Multitask-WLM: the last layer) or "weighted"
(the Best-RQ recipe's learnable weighted sum of all layers, Eq. 1). Used for shape checks and
compile-only runs (Table 11: 28.3M trainable); the curriculum's stage configs share this model.

    speechverse-jax train --config multitask_wlm:wlm,v5e-16 --compile-only --workdir /tmp/aot
"""

from speechverse_jax.configs import common


def get_config(arg=None):
    return common.paper_stage_config("stage2_multitask", arg)
