"""`speechverse-jax convert --llm DIR`: HF WavLM + decoder-only LLM folders -> one base checkpoint.

The same folder layout as the T5 path (`checkpoints.py`), with the LLM under `llm`:

    OUT/model_config.json   {"wavlm": {...}, "llm": {...DecoderLMConfig...}, "llm_type": "decoder", ...}
    OUT/params/             orbax checkpoint of {"wavlm": {...}, "llm": {...}}
    OUT/tokenizer files     carried over from the LLM folder (tokenizer.json, chat template, ...)
    OUT/verify_report.json  with --verify: every hidden state of both models and the LLM logits
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from speechverse_jax import checkpoints, fs
from speechverse_jax.convert.decoder_lm import convert_decoder_lm
from speechverse_jax.convert.hf_io import tokenizer_files
from speechverse_jax.convert.pipeline import LLMSource, convert_base
from speechverse_jax.models.decoder_lm import DecoderLMConfig
from speechverse_jax.models.wavlm import WavLMConfig

# chat templates live in tokenizer_config.json or, in newer folders, their own file
EXTRA_TOKENIZER_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer.model")


def _verify_decoder_lm():
    from speechverse_jax.convert.verify_decoder_lm import verify_decoder_lm

    return verify_decoder_lm


def _tokenizer_files(llm_dir: str):
    return tuple(tokenizer_files(llm_dir)) + tuple(
        os.path.join(llm_dir, f) for f in EXTRA_TOKENIZER_FILES if fs.exists(os.path.join(llm_dir, f)))


DECODER_SOURCE = LLMSource("llm", convert_decoder_lm, _verify_decoder_lm, _tokenizer_files,
                           ("tokenizer.json", "tokenizer.model"), {"llm_type": "decoder"})


def convert_decoder_checkpoints(wavlm_dir: str, llm_dir: str, out_dir: str, dtype: str = "float32",
                                verify: bool = False, report_path: Optional[str] = None, overwrite: bool = False,
                                tolerance: float = 1e-4) -> Dict:
    """HF WavLM + decoder-only LLM folders: convert, optionally verify against HF PyTorch in float32,
    then save in `dtype`. Returns the report dict; when verification fails nothing is written."""
    return convert_base(wavlm_dir, llm_dir, DECODER_SOURCE, out_dir, dtype, verify, report_path, overwrite, tolerance)


def load_decoder_model_config(base_dir: str) -> Tuple[WavLMConfig, DecoderLMConfig, dict]:
    """(WavLM config, LLM config, the whole model_config.json dict) of a `convert --llm` folder."""
    return checkpoints.load_layout_config(base_dir, "decoder")
