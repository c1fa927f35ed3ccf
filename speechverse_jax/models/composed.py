"""The two composed layouts behind one interface: which module, which params key, how to init.

    't5'       `SpeechVerse` (`models/speechverse.py`): audio + instruction into the T5 encoder,
               the answer from the T5 decoder. Params `{'wavlm', 'layer_weights', 'downsampler', 't5'}`.
    'decoder'  `SpeechVerseDecoder` (`models/speechverse_decoder.py`): audio embeddings inside a
               chat prompt of a decoder-only LLM. Params `{..., 'llm'}`.

Training, checkpoints, the API and evaluation ask this module instead of naming a layout, so one
code path serves both; the layout is decided by the config (`models/config.py`).
"""

from __future__ import annotations

from typing import Any, Union

import flax.linen as nn
import jax

from speechverse_jax.models import speechverse as sv
from speechverse_jax.models import speechverse_decoder as svd

LAYOUTS = ("t5", "decoder")
LLM_KEYS = {"t5": "t5", "decoder": "llm"}  # the LLM's params (and base config) key

ComposedConfig = Union[sv.SpeechVerseConfig, svd.SpeechVerseDecoderConfig]


def layout_of(cfg: ComposedConfig) -> str:
    if isinstance(cfg, svd.SpeechVerseDecoderConfig):
        return "decoder"
    if isinstance(cfg, sv.SpeechVerseConfig):
        return "t5"
    raise TypeError(f"not a composed model config: {type(cfg).__name__}")


def llm_key(cfg: ComposedConfig) -> str:
    return LLM_KEYS[layout_of(cfg)]


def frozen_prefixes(cfg: ComposedConfig):
    """Path prefixes of the frozen backbones (what a base checkpoint holds)."""
    return ("wavlm/", llm_key(cfg) + "/")


def module_for(cfg: ComposedConfig) -> nn.Module:
    return svd.SpeechVerseDecoder(cfg) if layout_of(cfg) == "decoder" else sv.SpeechVerse(cfg)


def init_params(cfg: ComposedConfig, rng: jax.Array) -> Any:
    """Random params (boxed with logical axes) of either layout."""
    return (svd.init_params if layout_of(cfg) == "decoder" else sv.init_params)(cfg, rng)


def abstract_params(cfg: ComposedConfig) -> Any:
    return sv.abstract_params(cfg, init_fn=init_params)


def init_params_subset(cfg: ComposedConfig, rng: jax.Array, keep, out_shardings=None) -> dict:
    return sv.init_params_subset(cfg, rng, keep, out_shardings, init_fn=init_params)
