"""The paper's full-size model: WavLM-Large + conv 2x[k3, s2] + Flan-T5-XL with LoRA r16 on q, v.

A recipe to copy and edit: this file only re-exports the packaged config
speechverse_jax/configs/multitask_wlm.py (its docstring gives the command). `--config multitask_wlm` names the packaged
one from any folder; `--config configs/multitask_wlm.py` names this file.
"""

from speechverse_jax.configs.multitask_wlm import get_config  # noqa: F401
