"""Curriculum stage 1 (paper Sec. 2.3): ASR only; the conv downsampler (and layer weights) train, no LoRA.

A recipe to copy and edit: this file only re-exports the packaged config
speechverse_jax/configs/stage1.py (its docstring gives the command). `--config stage1` names the packaged
one from any folder; `--config configs/stage1.py` names this file.
"""

from speechverse_jax.configs.stage1 import get_config  # noqa: F401
