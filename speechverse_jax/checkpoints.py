"""The converted base checkpoint: frozen WavLM + T5 weights, their configs, the tokenizer.

Layout of a folder written by `speechverse-jax convert`:

    OUT/
      model_config.json   {"wavlm": {...}, "t5": {...}, "dtype": ..., "source": {...}}
      params/             orbax checkpoint of {"wavlm": {...}, "t5": {...}}

A decoder-only base (`convert --llm`) holds `"llm"` (a `DecoderLMConfig`) instead of `"t5"` and
records `"llm_type": "decoder"`; `base_layout` / `load_base_config` read either.
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
from speechverse_jax.models.composed import LLM_KEYS
from speechverse_jax.models.decoder_lm import DecoderLMConfig
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


def _read_model_config(base_dir: str) -> Tuple[str, dict]:
    path = os.path.join(str(base_dir), MODEL_CONFIG)
    if not fs.exists(path):
        raise BaseCheckpointError(
            f"{base_dir}: no {MODEL_CONFIG}; is this a folder written by `speechverse-jax convert`?"
        )
    return path, json.loads(fs.read_text(path))


def base_layout(raw: dict) -> str:
    """'t5' or 'decoder': which LLM a model_config.json dict describes (older folders: T5)."""
    return "decoder" if raw.get("llm_type") == "decoder" or ("llm" in raw and "t5" not in raw) else "t5"


def load_base_config(base_dir: str) -> Tuple[str, WavLMConfig, Any, dict]:
    """(layout 't5' | 'decoder', WavLM config, LLM config (`T5Config` | `DecoderLMConfig`), the
    whole model_config.json dict) of a converted folder of either kind."""
    path, raw = _read_model_config(base_dir)
    layout = base_layout(raw)
    key = LLM_KEYS[layout]
    for k in ("wavlm", key):
        if k not in raw:
            raise BaseCheckpointError(f"{path}: missing the {k!r} section")
    llm_cls = DecoderLMConfig if layout == "decoder" else T5Config
    return layout, WavLMConfig.from_dict(raw["wavlm"]), llm_cls.from_dict(raw[key]), raw


def load_layout_config(base_dir: str, layout: str) -> Tuple[WavLMConfig, Any, dict]:
    """(WavLM config, LLM config, dict) of a base folder that must hold the `layout` LLM; another
    layout's folder is refused with a message naming both."""
    found, wavlm, llm, raw = load_base_config(base_dir)
    if found != layout:
        what = {"t5": "a T5 encoder-decoder (`convert --t5`)", "decoder": "a decoder-only LLM (`convert --llm`)"}
        raise BaseCheckpointError(
            f"{base_dir} holds {what[found]}, but it is being loaded as {what[layout]}: set model.layout to "
            f"'auto' (or {found!r}), or use a base folder converted for the {layout!r} layout")
    return wavlm, llm, raw


def model_config_for(model, base_checkpoint: str = ""):
    """`config.model` + the base checkpoint folder (empty: presets) -> the composed model config
    (`SpeechVerseConfig` or `SpeechVerseDecoderConfig`); the layout is `model.layout` checked
    against what the folder holds (`models.config.resolve_layout`)."""
    from speechverse_jax.models.config import build_model_config, resolve_layout

    if not base_checkpoint:
        return build_model_config(model, layout=resolve_layout(model))
    found, wavlm_cfg, llm_cfg, _ = load_base_config(base_checkpoint)
    return build_model_config(model, wavlm_cfg, llm_cfg, layout=resolve_layout(model, found))


def load_model_config(base_dir: str) -> Tuple[WavLMConfig, T5Config, dict]:
    """(WavLM config, T5 config, the whole model_config.json dict) of a T5 (`convert --t5`) folder."""
    return load_layout_config(base_dir, "t5")


def load_base_params(base_dir: str, target: Any = None) -> Dict[str, Any]:
    """The frozen params `{'wavlm', 't5' | 'llm'}`; `target` (abstract arrays with shardings) places them."""
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
