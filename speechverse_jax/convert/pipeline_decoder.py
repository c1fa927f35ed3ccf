"""`speechverse-jax convert --llm DIR`: HF WavLM + decoder-only LLM folders -> one base checkpoint.

The same folder layout as the T5 path (`checkpoints.py`), with the LLM under `llm`:

    OUT/model_config.json   {"wavlm": {...}, "llm": {...DecoderLMConfig...}, "llm_type": "decoder", ...}
    OUT/params/             orbax checkpoint of {"wavlm": {...}, "llm": {...}}
    OUT/tokenizer files     carried over from the LLM folder (tokenizer.json, chat template, ...)
    OUT/verify_report.json  with --verify: every hidden state of both models and the LLM logits
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from speechverse_jax import checkpoints, fs
from speechverse_jax.convert.decoder_lm import convert_decoder_lm
from speechverse_jax.convert.hf_io import HFCheckpoint, tokenizer_files
from speechverse_jax.convert.pipeline import STORAGE_DTYPES, _count, _print_verify_table
from speechverse_jax.convert.wavlm import convert_wavlm
from speechverse_jax.models.decoder_lm import DecoderLMConfig
from speechverse_jax.models.wavlm import WavLMConfig

# chat templates live in tokenizer_config.json or, in newer folders, their own file
EXTRA_TOKENIZER_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer.model")


def convert_decoder_checkpoints(wavlm_dir: str, llm_dir: str, out_dir: str, dtype: str = "float32",
                                verify: bool = False, report_path: Optional[str] = None, overwrite: bool = False,
                                tolerance: float = 1e-4) -> Dict:
    """Convert, optionally verify against HF PyTorch in float32, then save in `dtype`.

    Returns the report dict; when verification fails nothing is written to `out_dir`.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if fs.exists(out_dir) and not overwrite:
        raise checkpoints.BaseCheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    t0 = time.time()
    report: Dict = {"out": str(out_dir), "dtype": dtype}
    parts = {}
    for name, folder, fn in (("wavlm", wavlm_dir, convert_wavlm), ("llm", llm_dir, convert_decoder_lm)):
        ckpt = HFCheckpoint(folder)
        cfg, params = fn(ckpt, dtype=np.float32)
        parts[name] = (cfg, params)
        report[name] = {"source": str(folder), "format": ckpt.weights_format, "params": _count(params)}
        print(f"converted {name}: {folder} ({ckpt.weights_format}), {_count(params):,} params")
    report["llm"]["family"] = parts["llm"][0].family

    if verify:
        from speechverse_jax.convert import verify as verify_lib
        from speechverse_jax.convert.verify_decoder_lm import verify_decoder_lm

        results = verify_lib.verify_wavlm(wavlm_dir, *parts["wavlm"], tolerance=tolerance)
        results += verify_decoder_lm(llm_dir, *parts["llm"], tolerance=tolerance)
        report["verify"] = {"tolerance": tolerance, "compared_in": "float32",
                            "passed": all(r["ok"] for r in results), "results": results}
        _print_verify_table(results)

    if report_path:
        fs.write_text(report_path, json.dumps(report, indent=2))
    if verify and not report["verify"]["passed"]:
        return report

    storage = STORAGE_DTYPES[dtype]
    params = {name: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(storage), p) for name, (_, p) in parts.items()}
    extra = tuple(tokenizer_files(llm_dir)) + tuple(
        os.path.join(llm_dir, f) for f in EXTRA_TOKENIZER_FILES if fs.exists(os.path.join(llm_dir, f)))
    if not any(f.endswith(("tokenizer.json", "tokenizer.model")) for f in extra):
        print(f"note: no tokenizer files in {llm_dir}; training and inference need one in {out_dir}")
    metadata = {"dtype": dtype, "llm_type": "decoder", "source": {"wavlm": str(wavlm_dir), "llm": str(llm_dir)}}
    checkpoints.save_base(out_dir, parts["wavlm"][0], parts["llm"][0], params, extra, metadata, overwrite,
                          llm_key="llm")
    if verify:
        fs.write_text(f"{out_dir}/verify_report.json", json.dumps(report, indent=2))
    print(f"wrote {out_dir} in {time.time() - t0:.1f}s")
    return report


def load_decoder_model_config(base_dir: str) -> Tuple[WavLMConfig, DecoderLMConfig, dict]:
    """(WavLM config, LLM config, the whole model_config.json dict) of a `convert --llm` folder."""
    path = os.path.join(str(base_dir), checkpoints.MODEL_CONFIG)
    if not fs.exists(path):
        raise checkpoints.BaseCheckpointError(f"{base_dir}: no {checkpoints.MODEL_CONFIG}")
    raw = json.loads(fs.read_text(path))
    for key in ("wavlm", "llm"):
        if key not in raw:
            raise checkpoints.BaseCheckpointError(f"{path}: missing the {key!r} section (not a `convert --llm` folder?)")
    return WavLMConfig.from_dict(raw["wavlm"]), DecoderLMConfig.from_dict(raw["llm"]), raw
