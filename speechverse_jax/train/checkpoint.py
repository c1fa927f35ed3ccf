"""Training checkpoints: what changes during training, nothing else.

Each save holds the train state (trainable params, optimizer state, step, RNG, skip counters),
the data iterator's state and a JSON `meta` (resolved config, base checkpoint path, metrics).
The frozen backbones are referenced through `meta['base_checkpoint']`, never copied.

Two orbax managers live under the run folder: `checkpoints/` keeps the last N (async saves) and
`best/` keeps the one with the lowest validation loss.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import orbax.checkpoint as ocp

from speechverse_jax import fs


def abs_path(path: str) -> str:
    """Absolute local path; remote (gs://) paths unchanged (orbax wants absolute paths)."""
    return str(path) if "://" in str(path) else os.path.abspath(str(path))


def _json_state(data_state: Any) -> Any:
    """Grain iterator states may be bytes (JSON inside); store them as text."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"__bytes__": data_state.decode("utf-8")}
    return data_state


def _from_json_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return data_state["__bytes__"].encode("utf-8")
    return data_state


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = abs_path(workdir)
        make = lambda sub, n: ocp.CheckpointManager(  # noqa: E731
            os.path.join(self.workdir, sub),
            options=ocp.CheckpointManagerOptions(max_to_keep=n, create=True, enable_async_checkpointing=async_save),
        )
        self.latest = make("checkpoints", keep)
        self.best = make("best", 1)

    @staticmethod
    def _args(state, data_state, meta):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"state": _json_state(data_state)}),
            meta=ocp.args.JsonSave(meta),
        )

    def save(self, step: int, state: Any, data_state: Any, meta: dict, best: bool = False) -> None:
        self.latest.save(step, args=self._args(state, data_state, meta), force=True)
        if best:
            self.best.save(step, args=self._args(state, data_state, meta), force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore(self, abstract_state: Any, step: Optional[int] = None, which: str = "latest") -> Tuple[Any, Any, dict]:
        return restore(os.path.join(self.workdir, "checkpoints" if which == "latest" else "best"), abstract_state, step)

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def restore(directory: str, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, Any, dict]:
    """(state, data iterator state, meta) from a manager folder; the latest complete step by default.

    `abstract_state` (arrays or ShapeDtypeStructs with shardings) decides where the arrays land.
    """
    directory = abs_path(directory)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        try:
            out = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(_layout_hint(directory, step, abstract_state, e)) from e
    return out.state, _from_json_state(out.data["state"]), dict(out.meta)


def _layout_hint(directory: str, step: int, abstract_state: Any, error: Exception) -> str:
    """The message for a restore whose tree does not match: names the layer layout when that is the cause."""
    from flax import traverse_util

    from speechverse_jax.models.scan_layout import is_scanned

    params = getattr(abstract_state, "params", None)
    msg = f"{directory} step {step}: the checkpoint does not match this run's state ({type(error).__name__}: {error})"
    if params is None:
        return msg
    want = is_scanned(traverse_util.flatten_dict(params, sep="/"))
    saved = None
    try:
        import glob
        import json

        files = glob.glob(os.path.join(directory, str(step), "state", "_METADATA"))
        if files:
            tree = json.dumps(json.load(open(files[0])))
            saved = "/blocks" in tree or "'blocks'" in tree or '"blocks"' in tree
    except Exception:  # the hint is best-effort; the original error is chained
        saved = None
    if saved is not None and saved != want:
        return (f"{directory} step {step} was saved with model.scan_layers={saved} (layers "
                f"{'stacked' if saved else 'unrolled'}) but this run has model.scan_layers={want}: resume with "
                f"--config.model.scan_layers={saved}, or start a new stage from it with train.init_from "
                f"(which converts the layout)")
    return msg


def read_meta(directory: str, step: Optional[int] = None) -> Tuple[int, dict]:
    """(step, meta) of a checkpoint without touching its arrays."""
    directory = abs_path(directory)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, dict(meta)


def write_config(workdir: str, config) -> str:
    """The resolved config next to the checkpoints (also stored in every checkpoint's meta)."""
    path = os.path.join(abs_path(workdir), "config.json")
    fs.makedirs(abs_path(workdir))
    fs.write_text(path, config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2))
    return path
