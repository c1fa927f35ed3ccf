"""The converted base checkpoint: frozen WavLM + T5 weights, their configs, the tokenizer.

Layout of a folder written by `speechverse-jax convert`:

    OUT/
      model_config.json   {"wavlm": {...}, "t5": {...}, "dtype": ..., "source": {...}}
      params/             orbax checkpoint of {"wavlm": {...}, "t5": {...}}
      spiece.model ...    tokenizer files carried over from the HF T5 folder
      verify_report.json  when converted with --verify

Training checkpoints reference this folder instead of copying the frozen weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp

from speechverse_jax import fs, tree
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig

MODEL_CONFIG = "model_config.json"
PARAMS = "params"


class BaseCheckpointError(ValueError):
    pass


def save_base(
    out_dir: str,
    wavlm_cfg: WavLMConfig,
    t5_cfg: T5Config,
    params: Dict[str, Any],
    extra_files: Tuple[str, ...] = (),
    metadata: Optional[dict] = None,
    overwrite: bool = False,
    llm_key: str = "t5",
) -> None:
    """Write the folder all at once: into a temporary sibling that is renamed when complete.

    `llm_key` names the LLM's config section ("t5"; "llm" for a decoder-only `DecoderLMConfig`).

    On a remote filesystem (gs://) the folder is written in place and removed if writing fails.
    """
    out_dir = fs.abs_path(out_dir)
    if fs.exists(out_dir) and not overwrite:
        raise BaseCheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    remote = fs.is_remote(out_dir)
    work = out_dir if remote else f"{out_dir.rstrip('/')}.partial-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(work)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(work, PARAMS), params)
        ckptr.wait_until_finished()
        for f in extra_files:
            fs.copy(f, os.path.join(work, os.path.basename(f)))
        config = {"wavlm": wavlm_cfg.to_dict(), llm_key: t5_cfg.to_dict(), **(metadata or {})}
        fs.write_text(os.path.join(work, MODEL_CONFIG), json.dumps(config, indent=2, sort_keys=True))
    except BaseException:
        if remote:
            fs.path(work).rmtree(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not remote:
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(work, out_dir)


def load_model_config(base_dir: str) -> Tuple[WavLMConfig, T5Config, dict]:
    """(WavLM config, T5 config, the whole model_config.json dict) of a converted folder."""
    path = os.path.join(str(base_dir), MODEL_CONFIG)
    if not fs.exists(path):
        raise BaseCheckpointError(
            f"{base_dir}: no {MODEL_CONFIG}; is this a folder written by `speechverse-jax convert`?"
        )
    raw = json.loads(fs.read_text(path))
    for key in ("wavlm", "t5"):
        if key not in raw:
            raise BaseCheckpointError(f"{path}: missing the {key!r} section")
    return WavLMConfig.from_dict(raw["wavlm"]), T5Config.from_dict(raw["t5"]), raw


def load_base_params(base_dir: str, target: Any = None) -> Dict[str, Any]:
    """The frozen params `{'wavlm', 't5'}`; `target` (abstract arrays with shardings) places them."""
    path = os.path.join(fs.abs_path(base_dir), PARAMS)
    if not fs.exists(path):
        raise BaseCheckpointError(f"{base_dir}: no {PARAMS}/ checkpoint")
    ckptr = ocp.StandardCheckpointer()
    if target is None:
        return ckptr.restore(path)
    from speechverse_jax.models import scan_layout

    flat_target = tree.flatten(target)
    if not scan_layout.is_scanned(flat_target):
        return ckptr.restore(path, target)
    # The folder holds the unrolled layout (one entry per layer); a scanned model wants the layers
    # stacked: restore each layer where its slice of the stacked array will live, then stack.
    return tree.unflatten(scan_layout.restore_stacked(lambda t: ckptr.restore(path, t), flat_target))
