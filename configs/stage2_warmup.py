"""Curriculum stage 2a: LoRA (r16 on q, v) grafted onto the stage-1 model with b = 0; ASR only.

A recipe to copy and edit: this file only re-exports the packaged config
speechverse_jax/configs/stage2_warmup.py (its docstring gives the command). `--config stage2_warmup` names the packaged
one from any folder; `--config configs/stage2_warmup.py` names this file.
"""

from speechverse_jax.configs.stage2_warmup import get_config  # noqa: F401
