"""Training checkpoints: what changes during training, nothing else.

Each save holds the train state (trainable params, optimizer state, step, RNG, skip counters),
the data iterator's state and a JSON `meta` (resolved config, base checkpoint path, metrics, and
the SHA-256 of every train / eval manifest). The frozen backbones are referenced through
`meta['base_checkpoint']`, never copied.

Two orbax managers live under the run folder: `checkpoints/` keeps the last N (async saves) and
`best/` keeps the one with the lowest validation loss.

Reliability (tests/test_faults.py):
- Atomic: orbax writes a step into a temporary folder and renames it when complete; a step killed
  half-written is never listed. Once complete, each step is *sealed* (when the next save starts,
  or when the run closes): `svj_integrity.json` records the size and CRC-32 of every file in it.
- Restore takes the newest step that passes its seal (and restores cleanly); a step with a missing,
  truncated or altered file is moved aside to `<manager>/corrupt-<step>` with a warning naming the
  file, and the previous complete step is used. A step without a seal (killed between the rename
  and the seal, or written before seals existed) is restored if orbax can read it.
- A checkpoint whose arrays do not match the model (another architecture) is refused with
  `CheckpointMismatchError`, never loaded partly.
- The manifests are hashed into every checkpoint; resuming after one changed raises
  `ManifestChangedError` (the data order would silently mix two datasets). To go on with new data
  on purpose, start a new run folder with `train.init_from=<old run>`.
- A full disk during a save raises a `UserError` that says so; the previous checkpoint is intact
  (orbax deletes old steps only after a new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from speechverse_jax import tree as tree_lib
from speechverse_jax import fs, tree
from speechverse_jax.errors import CheckpointMismatchError, ManifestChangedError, UserError, is_disk_full

log = logging.getLogger(__name__)
SEAL = "svj_integrity.json"



def _json_state(data_state: Any) -> Any:
    """Grain iterator states may be bytes (JSON inside); store them as text."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"__bytes__": data_state.decode("utf-8")}
    return data_state


def _from_json_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return data_state["__bytes__"].encode("utf-8")
    return data_state


# -- integrity seals ------------------------------------------------------------------------------
def _crc(path: str) -> int:
    value = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            value = zlib.crc32(block, value)
    return value


def seal_step(step_dir: str) -> bool:
    """Write `svj_integrity.json` (size + CRC-32 of every file) into a complete local step folder.
    Returns False for remote folders (object stores check their own objects) or when sealed."""
    if "://" in step_dir or os.path.exists(os.path.join(step_dir, SEAL)):
        return False
    files = {}
    for root, _, names in os.walk(step_dir):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, step_dir)
            if rel != SEAL:
                files[rel] = [os.path.getsize(p), _crc(p)]
    tmp = os.path.join(step_dir, SEAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, SEAL))
    return True


def check_step(step_dir: str) -> Optional[str]:
    """None if the step folder matches its seal (or has none); else what is wrong, naming the file."""
    seal = os.path.join(step_dir, SEAL)
    if "://" in step_dir or not os.path.exists(seal):
        return None
    try:
        with open(seal) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{seal}: unreadable seal ({e})"
    for rel, (size, crc) in sorted(files.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.exists(p):
            return f"{p} is missing"
        actual = os.path.getsize(p)
        if actual != size:
            return f"{p} has {actual} bytes, {size} were written"
        if _crc(p) != crc:
            return f"{p} does not match its checksum"
    return None


def _step_dirs(directory: str) -> Dict[int, str]:
    """Complete (orbax-committed) step folders of a manager folder, by step."""
    if "://" in directory or not os.path.isdir(directory):
        return {}
    out = {}
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(p) and os.path.exists(os.path.join(p, "_CHECKPOINT_METADATA")):
            out[int(name)] = p
    return out


def _set_aside(directory: str, step: int, why: str) -> None:
    src = os.path.join(directory, str(step))
    dst = os.path.join(directory, f"corrupt-{step}")
    n = 1
    while os.path.exists(dst):
        n += 1
        dst = os.path.join(directory, f"corrupt-{step}.{n}")
    if jax.process_index() == 0:
        os.rename(src, dst)
    msg = f"warning: checkpoint step {step} in {directory} is unusable ({why}); moved to {dst}, using an earlier step"
    log.warning(msg)
    print(msg, flush=True)


# -- manifests ------------------------------------------------------------------------------------
_HASHES: Dict[Tuple[str, float, int], str] = {}


def manifest_hashes(config_dict: Any) -> Dict[str, str]:
    """{path: sha256} of the config's train and eval manifests (unreadable ones: 'missing')."""
    from speechverse_jax.data.manifest import split_paths

    data = (config_dict or {}).get("data") or {}
    out = {}
    for key in ("train_manifests", "eval_manifests"):
        for p in split_paths(data.get(key)):
            out[p] = _file_hash(p)
    return out


def _file_hash(p: str) -> str:
    try:
        if "://" in p:
            return hashlib.sha256(fs.read_text(p).encode()).hexdigest()
        st = os.stat(p)
        key = (os.path.abspath(p), st.st_mtime, st.st_size)
        if key not in _HASHES:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _HASHES[key] = h.hexdigest()
        return _HASHES[key]
    except OSError:
        return "missing"


def check_manifests(meta: dict, where: str) -> None:
    """ManifestChangedError if a manifest hashed into `meta` has other contents now."""
    saved = meta.get("manifests_sha256") or {}
    changed = [p for p, h in saved.items() if _file_hash(p) != h]
    if changed:
        raise ManifestChangedError(
            f"{where}: the manifest {changed[0]} changed since this checkpoint was written"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; resuming would mix two data orders. Restore the manifest, or start a new run folder with "
              "--config.train.init_from=<this run> to continue training on the new data")


# -- the checkpointer -----------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = fs.abs_path(workdir)
        self.dirs = {"latest": os.path.join(self.workdir, "checkpoints"), "best": os.path.join(self.workdir, "best")}
        make = lambda which, n: ocp.CheckpointManager(  # noqa: E731
            self.dirs[which],
            options=ocp.CheckpointManagerOptions(max_to_keep=n, create=True, enable_async_checkpointing=async_save),
        )
        self.latest = make("latest", keep)
        self.best = make("best", 1)
        self._saving: Dict[str, Optional[int]] = {"latest": None, "best": None}

    def _seal(self, which: str) -> None:
        """Seal every complete, unsealed step (when the next save starts, and on wait / close)."""
        if jax.process_index() != 0:
            return
        for step, d in _step_dirs(self.dirs[which]).items():
            try:
                seal_step(d)
            except OSError as e:  # a full disk: the step stays unsealed (still restorable), say so
                log.warning("could not seal %s: %s", d, e)

    @staticmethod
    def _args(state, data_state, meta):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"state": _json_state(data_state)}),
            meta=ocp.args.JsonSave(meta),
        )

    def _guard(self, fn, what: str):
        try:
            return fn()
        except Exception as e:
            if is_disk_full(e):
                previous = _step_dirs(self.dirs["latest"])
                keep = f"the previous checkpoint (step {max(previous)}) is intact" if previous else \
                    "no earlier checkpoint exists"
                raise UserError(f"{self.workdir}: no space left on device while {what}; {keep}. Free space and "
                                "run the same command again to resume") from e
            raise

    def save(self, step: int, state: Any, data_state: Any, meta: dict, best: bool = False) -> None:
        meta = dict(meta)
        meta.setdefault("manifests_sha256", manifest_hashes(meta.get("config")))

        def go():
            self._seal("latest")  # the previous async save has been committed by now (or is still running:
            self._seal("best")    # its folder is still temporary and is sealed next time)
            self.latest.save(step, args=self._args(state, data_state, meta), force=True)
            self._saving["latest"] = step
            if best:
                self.best.save(step, args=self._args(state, data_state, meta), force=True)
                self._saving["best"] = step

        pending = self._saving["latest"]  # saves are async: the previous one may be what failed
        self._guard(go, f"saving checkpoint step {step}" if pending is None else
                    f"saving checkpoint step {pending} or {step}")

    def wait(self) -> None:
        def go():
            self.latest.wait_until_finished()
            self.best.wait_until_finished()
            self._seal("latest")
            self._seal("best")

        self._guard(go, f"finishing checkpoint step {self._saving['latest']}")

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore(self, abstract_state: Any, step: Optional[int] = None, which: str = "latest") -> Tuple[Any, Any, dict]:
        out = restore(self.dirs[which], abstract_state, step)
        self.latest.reload()
        self.best.reload()
        return out

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.latest.close()
            self.best.close()


def _path(keys) -> str:
    """'params/downsampler/conv0/kernel' for a saved dict path and a TrainState attribute path alike."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


_HANDLERS = lambda: {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),  # noqa: E731
                     "meta": ocp.JsonCheckpointHandler()}


def _shape_problems(saved_tree: Any, abstract_state: Any) -> List[str]:
    """Leaves whose saved shape / dtype differ from the model's, or that exist on one side only."""
    saved = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved_tree)}
    want = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(want[k].shape)}" for k in sorted(want)
                if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(want[k].shape)]
    problems += [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(saved))]
    problems += [f"{k}: not in the model" for k in sorted(set(saved) - set(want))]
    return problems


def usable_steps(directory: str) -> List[int]:
    """Complete steps of a manager folder, newest first, that pass their seal (bad ones set aside)."""
    directory = fs.abs_path(directory)
    if fs.is_remote(directory):
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
            return sorted(mgr.all_steps(), reverse=True)
    out = []
    for step, d in sorted(_step_dirs(directory).items(), reverse=True):
        problem = check_step(d)
        if problem:
            _set_aside(directory, step, problem)
        else:
            out.append(step)
    return out


def restore(directory: str, abstract_state: Any, step: Optional[int] = None,
            check_data: bool = True) -> Tuple[Any, Any, dict]:
    """(state, data iterator state, meta) from a manager folder; the newest usable step by default.

    `abstract_state` (arrays or ShapeDtypeStructs with shardings) decides where the arrays land.
    A step that fails its seal or cannot be read is set aside and the previous one is used; a step
    of another architecture raises `CheckpointMismatchError`; changed manifests raise
    `ManifestChangedError` (unless `check_data=False`).
    """
    directory = fs.abs_path(directory)
    steps = [step] if step is not None else usable_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    problems = []
    for s in steps:
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                   item_handlers=_HANDLERS()) as mgr:
            try:
                metadata = mgr.item_metadata(s)["state"]
                saved_tree = metadata.tree if hasattr(metadata, "tree") else metadata
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged step
                saved_tree, problem = None, f"unreadable array metadata ({type(e).__name__}: {e})"
            if saved_tree is not None:
                mismatch = _shape_problems(saved_tree, abstract_state)
                if mismatch:
                    hint = _layout_hint(directory, s, abstract_state, ValueError("; ".join(mismatch[:3])))
                    raise CheckpointMismatchError(hint if "scan_layers" in hint else (
                        f"{directory}/{s}: the checkpoint is of another architecture than this config "
                        f"({'; '.join(mismatch[:3])}{'; ...' if len(mismatch) > 3 else ''}); use another run "
                        "folder, or the config that wrote it"))
                try:
                    out = mgr.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ))
                    problem = None
                except Exception as e:  # noqa: BLE001 - a damaged step: fall back to the previous one
                    problem = f"cannot be restored ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if problem is None:
            meta = dict(out.meta)
            if check_data:
                check_manifests(meta, f"{directory}/{s}")
            return out.state, _from_json_state(out.data["state"]), meta
        problems.append(f"step {s}: {problem}")
        if step is not None:
            break
        _set_aside(directory, s, problem)
    raise UserError(f"{directory}: no usable checkpoint ({'; '.join(problems)}); move the folder away to start over")


def _layout_hint(directory: str, step: int, abstract_state: Any, error: Exception) -> str:
    """The message for a restore whose tree does not match: names the layer layout when that is the cause."""

    from speechverse_jax.models.scan_layout import is_scanned

    params = getattr(abstract_state, "params", None)
    msg = f"{directory} step {step}: the checkpoint does not match this run's state ({type(error).__name__}: {error})"
    if params is None:
        return msg
    want = is_scanned(tree_lib.flatten(params))
    saved = None
    try:
        import glob
        import json

        files = glob.glob(os.path.join(directory, str(step), "state", "_METADATA"))
        if files:
            tree = json.dumps(json.load(open(files[0])))
            # stacked layers: T5's `blocks`, WavLM's and the decoder-only LLM's `layers` (not `layers_{i}`)
            saved = any(f"/{n}" in tree.replace(f"/{n}_", "") or f"'{n}'" in tree or f'"{n}"' in tree
                        for n in ("blocks", "layers"))
    except Exception:  # the hint is best-effort; the original error is chained
        saved = None
    if saved is not None and saved != want:
        return (f"{directory} step {step} was saved with model.scan_layers={saved} (layers "
                f"{'stacked' if saved else 'unrolled'}) but this run has model.scan_layers={want}: resume with "
                f"--config.model.scan_layers={saved}, or start a new stage from it with train.init_from "
                f"(which converts the layout)")
    return msg


def read_meta(directory: str, step: Optional[int] = None) -> Tuple[int, dict]:
    """(step, meta) of a checkpoint without touching its arrays (the newest usable step by default)."""
    directory = fs.abs_path(directory)
    if step is None:
        steps = usable_steps(directory)
        if not steps:
            raise FileNotFoundError(f"{directory}: no complete checkpoint")
        step = steps[0]
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, dict(meta)


def write_config(workdir: str, config) -> str:
    """The resolved config next to the checkpoints (also stored in every checkpoint's meta)."""
    path = os.path.join(fs.abs_path(workdir), "config.json")
    fs.makedirs(fs.abs_path(workdir))
    fs.write_text(path, config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2))
    return path


def load_trainable_params(path: str, prefer: str = "best", with_meta: bool = False):
    """Trainable params (flat) of a run folder: its best checkpoint, else its latest (or the
    reverse with prefer='latest'); a checkpoint-manager folder works too. `with_meta`: also the
    checkpoint's meta dict (`layout`, `config`, ...)."""
    order = ("best", "checkpoints") if prefer == "best" else ("checkpoints", "best")
    candidates = [os.path.join(path, sub) for sub in order] + [path]
    for c in candidates:
        try:
            step, meta = read_meta(c)
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
        params = {k: np.asarray(v) for k, v in tree.flatten(state["params"]).items()}
        return (params, meta) if with_meta else params
    raise FileNotFoundError(f"{path}: no checkpoint under {candidates}")
