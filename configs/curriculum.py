"""The whole curriculum: stage1 -> stage2_warmup -> stage2_multitask, each from the previous best.

A recipe to copy and edit: this file only re-exports the packaged config
speechverse_jax/configs/curriculum.py (its docstring gives the command). `--config curriculum` names the packaged
one from any folder; `--config configs/curriculum.py` names this file.
"""

from speechverse_jax.configs.curriculum import get_config  # noqa: F401
