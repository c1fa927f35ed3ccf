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
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from speechverse_jax import fs, tree


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
        self.workdir = fs.abs_path(workdir)
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
    directory = fs.abs_path(directory)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
    return out.state, _from_json_state(out.data["state"]), dict(out.meta)


def read_meta(directory: str, step: Optional[int] = None) -> Tuple[int, dict]:
    """(step, meta) of a checkpoint without touching its arrays."""
    directory = fs.abs_path(directory)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, dict(meta)


def write_config(workdir: str, config) -> str:
    """The resolved config next to the checkpoints (also stored in every checkpoint's meta)."""
    path = os.path.join(fs.abs_path(workdir), "config.json")
    fs.makedirs(fs.abs_path(workdir))
    fs.write_text(path, config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2))
    return path


def load_trainable_params(path: str, prefer: str = "best") -> Dict[str, np.ndarray]:
    """Trainable params (flat) of a run folder: its best checkpoint, else its latest (or the
    reverse with prefer='latest'); a checkpoint-manager folder works too."""
    order = ("best", "checkpoints") if prefer == "best" else ("checkpoints", "best")
    candidates = [os.path.join(path, sub) for sub in order] + [path]
    for c in candidates:
        try:
            step, _ = read_meta(c)
        except (FileNotFoundError, ValueError, OSError):
            continue
        directory = fs.abs_path(c)
        # Restore replicated onto this run's devices (whatever mesh or process count wrote it), so
        # every process holds the whole (small) trainable tree and can re-shard it.
        everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                                jax.sharding.PartitionSpec())
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                   item_handlers=handlers) as mgr:
            metadata = mgr.item_metadata(step)["state"]
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=everywhere),
                                            metadata.tree if hasattr(metadata, "tree") else metadata)
            state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        return {k: np.asarray(v) for k, v in tree.flatten(state["params"]).items()}
    raise FileNotFoundError(f"{path}: no checkpoint under {candidates}")
