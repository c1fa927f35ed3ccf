"""Curriculum stage 2b: all tasks mixed by `data.mix_weights`; downsampler + layer weights + LoRA train.

A recipe to copy and edit: this file only re-exports the packaged config
speechverse_jax/configs/stage2_multitask.py (its docstring gives the command). `--config stage2_multitask` names the packaged
one from any folder; `--config configs/stage2_multitask.py` names this file.
"""

from speechverse_jax.configs.stage2_multitask import get_config  # noqa: F401
