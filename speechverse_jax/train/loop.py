"""One training stage: set-up (mesh, born-sharded params, optimizer), the loop, eval, checkpoints.

    train(config, workdir, data)   # data: see `TrainData`

The run folder holds `config.json` (the resolved config), `metrics.jsonl`, `tensorboard/`,
`checkpoints/` (last N, async) and `best/` (lowest validation loss). Starting again in the same
folder resumes from the latest complete checkpoint, data order included.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from speechverse_jax import checkpoints as base_ckpt
from speechverse_jax import config_lib
from speechverse_jax.models.speechverse import SpeechVerse, SpeechVerseConfig, init_params, init_params_subset
from speechverse_jax.models import scan_layout
from speechverse_jax.models.layers import with_activation_sharding
from speechverse_jax.train import checkpoint as ckpt_lib
from speechverse_jax.train import optimizer as opt_lib
from speechverse_jax.train import partitioning
from speechverse_jax.train.metrics_log import MetricsWriter
from speechverse_jax.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)
SAMPLE_RATE = 16000


class TrainData(Protocol):
    """What the loop needs from the data layer."""

    task_names: List[str]

    def train_iterator(self) -> Iterator[Dict[str, np.ndarray]]:  # has get_state() / set_state()
        ...

    def eval_batches(self) -> Iterable[Dict[str, np.ndarray]]:
        ...

    def stats(self) -> Dict[str, int]:  # skipped / filtered examples by reason
        ...


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Setup:
    """Everything built from the config before the first step."""

    model_cfg: SpeechVerseConfig
    model: SpeechVerse
    mesh: jax.sharding.Mesh
    labels: Dict[str, str]
    frozen: Any
    trainable: Any
    param_shardings: Dict[str, Any]  # flat path -> NamedSharding
    rules: Any = ()  # logical-axis rules (params and activations)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat):
    return traverse_util.unflatten_dict(flat, sep="/")


def build_setup(config, mesh: Optional[jax.sharding.Mesh] = None, log_fn: Callable = print) -> Setup:
    """Model config, mesh, param labels; frozen params restored and trainable params initialised
    (or taken from the previous stage, LoRA grafted) directly into their shardings."""
    wavlm_cfg = t5_cfg = None
    if config.base_checkpoint:
        wavlm_cfg, t5_cfg, _ = base_ckpt.load_model_config(config.base_checkpoint)
    model_cfg = config_lib.build_model_config(config.model, wavlm_cfg, t5_cfg)
    model = SpeechVerse(model_cfg)
    if mesh is None:
        mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = partitioning.rules_from_config(config.mesh.rules)
    rng = jax.random.PRNGKey(int(config.train.seed))
    boxed = jax.eval_shape(lambda r: init_params(model_cfg, r), rng)
    shardings = _flat(partitioning.param_shardings(boxed, mesh, rules))
    abstract = _flat(nn.unbox(boxed))
    labels = opt_lib.label_params(_unflat(abstract), [tuple(r) for r in config.train.param_rules])
    log_fn(opt_lib.describe(labels, _unflat(abstract)))

    frozen_paths = {k for k, v in labels.items() if v == opt_lib.FREEZE}
    train_paths = {k for k, v in labels.items() if v == opt_lib.TRAIN}
    frozen = {}
    if config.base_checkpoint:
        in_base = {k for k in frozen_paths if k.startswith(("wavlm/", "t5/"))}
        target = _unflat({k: jax.ShapeDtypeStruct(abstract[k].shape, abstract[k].dtype, sharding=shardings[k])
                          for k in in_base})
        frozen = _flat(base_ckpt.load_base_params(config.base_checkpoint, target))
    missing_frozen = frozen_paths - set(frozen)
    if missing_frozen:
        if config.base_checkpoint:
            log_fn(f"warning: {len(missing_frozen)} frozen params are not in the base checkpoint and stay at "
                   f"their random init: {sorted(missing_frozen)[:5]}...")
        frozen.update(_flat(init_params_subset(model_cfg, rng, keep=missing_frozen.__contains__,
                                               out_shardings={k: shardings[k] for k in missing_frozen})))
    trainable = _flat(init_params_subset(model_cfg, jax.random.fold_in(rng, 1), keep=train_paths.__contains__,
                                         out_shardings={k: shardings[k] for k in train_paths}))
    init_from = config.train.get("init_from", "")
    if init_from:
        # the previous stage may have run with the other layer layout (model.scan_layers)
        previous = scan_layout.to_layout(previous_stage_params(init_from), scan_layout.is_scanned(abstract))
        grafted = sorted(k for k in train_paths if k not in previous)
        unused = sorted(k for k in previous if k not in train_paths)
        if unused:
            raise ValueError(f"train.init_from={init_from}: params not in this stage's trainable set: {unused[:10]}")
        for k, v in previous.items():
            if tuple(v.shape) != tuple(abstract[k].shape):
                raise ValueError(f"train.init_from={init_from}: {k} has shape {v.shape}, this model wants "
                                 f"{abstract[k].shape}")
            trainable[k] = jax.device_put(np.asarray(v, abstract[k].dtype), shardings[k])
        log_fn(f"initialised from {init_from}: {len(previous)} params restored, {len(grafted)} new "
               f"({'LoRA grafted with b = 0' if any('/lora_' in k for k in grafted) else 'fresh init'})")
    return Setup(model_cfg, model, mesh, labels, _unflat(frozen), _unflat(trainable), shardings, rules)


def previous_stage_params(path: str, prefer: str = "best") -> Dict[str, np.ndarray]:
    """Trainable params (flat) of a run folder: its best checkpoint, else its latest (or the
    reverse with prefer='latest'); a checkpoint-manager folder works too."""
    import orbax.checkpoint as ocp

    order = ("best", "checkpoints") if prefer == "best" else ("checkpoints", "best")
    candidates = [os.path.join(path, sub) for sub in order] + [path]
    for c in candidates:
        try:
            step, _ = ckpt_lib.read_meta(c)
        except (FileNotFoundError, ValueError, OSError):
            continue
        directory = ckpt_lib.abs_path(c)
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
        return {k: np.asarray(v) for k, v in _flat(state["params"]).items()}
    raise FileNotFoundError(f"{path}: no checkpoint under {candidates}")


def _put_batch(batch: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded over data x fsdp."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            continue
        out[k] = jax.make_array_from_process_local_data(partitioning.batch_sharding(mesh, v.ndim), v)
    return out


def _audio_seconds(batch) -> float:
    """Seconds of real audio in a host batch (masked-out padding rows excluded)."""
    rows = np.asarray(batch.get("example_mask", True))[..., None]
    if "audio_mask" in batch:
        return float((np.asarray(batch["audio_mask"]) & rows).sum()) / SAMPLE_RATE
    if "frame_mask" in batch:
        return float((np.asarray(batch["frame_mask"]) & rows).sum()) * 0.02  # WavLM frames are 20 ms
    return 0.0


@functools.lru_cache(maxsize=256)
def _flops_for_shapes(model_cfg: SpeechVerseConfig, rows: int, samples: int, frames: Optional[int], instruction: int,
                      target: int) -> float:
    from speechverse_jax.train.flops import train_step_flops

    return train_step_flops(model_cfg, rows, samples, instruction, target, audio_frames=frames)["total"]


def _step_flops(model_cfg: SpeechVerseConfig, batch) -> float:
    """Analytic model FLOPs of one train step on this global batch's padded shapes."""
    rows = batch["target_ids"].shape[0] * jax.process_count()
    ins, tgt = batch["instruction_ids"].shape[1], batch["target_ids"].shape[1]
    if "hidden_states" in batch:  # cached encoder states [b, L+1, frames, dim]: no encoder forward
        return _flops_for_shapes(model_cfg, rows, 0, batch["hidden_states"].shape[2], ins, tgt)
    return _flops_for_shapes(model_cfg, rows, batch["audio"].shape[1], None, ins, tgt)


def _target_tokens(batch) -> float:
    """Target tokens of the real (not masked-out) rows of a host batch."""
    rows = np.asarray(batch.get("example_mask", True))[..., None]
    return float((np.asarray(batch["target_mask"]) & rows).sum())


def evaluate(setup: Setup, params_trainable, data: TrainData, eval_fn) -> Dict[str, float]:
    """Token-weighted validation loss, overall and per task."""
    n = len(data.task_names)
    nll, tokens = 0.0, 0.0
    task_nll, task_tokens = np.zeros(n), np.zeros(n)
    for batch in data.eval_batches():
        out = jax.device_get(eval_fn(params_trainable, setup.frozen, _put_batch(batch, setup.mesh)))
        nll += float(out["nll"])
        tokens += float(out["tokens"])
        task_nll += np.asarray(out["task_nll"])
        task_tokens += np.asarray(out["task_tokens"])
    result = {"loss": nll / max(tokens, 1.0), "target_tokens": tokens}
    for i, name in enumerate(data.task_names):
        if task_tokens[i]:
            result[f"loss/{name}"] = task_nll[i] / task_tokens[i]
    return result


def train(config, workdir: str, data: TrainData, mesh=None, progress: bool = True) -> Dict[str, Any]:
    """Run one stage until `train.max_steps` or early stopping. Returns a summary dict."""
    from tqdm import tqdm

    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    ckpt_lib.write_config(workdir, config) if is_main else None
    setup = build_setup(config, mesh, log_fn=say)
    tcfg = config.train
    tx, schedule = opt_lib.make_optimizer(config.optim)
    n_tasks = max(len(data.task_names), 1)
    state = jax.jit(lambda p: init_state(p, tx, int(tcfg.seed)))(setup.trainable)
    say(f"optimizer state: {opt_lib.count(state.opt_state):,} values "
        f"(= {opt_lib.count(state.opt_state) / max(opt_lib.count(state.params), 1):.2f} x trainable)")
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(tcfg.keep_checkpoints))
    data_iter = data.train_iterator()
    best_val, evals_without_improvement = math.inf, 0
    start = checkpointer.latest_step()
    if start is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, data_state, meta = checkpointer.restore(abstract)
        if data_state is not None:
            data_iter.set_state(data_state)
        best_val = float(meta.get("best_val_loss", math.inf))
        evals_without_improvement = int(meta.get("evals_without_improvement", 0))
        say(f"resumed from {workdir} at step {int(state.step)}")

    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    # activation constraints (models/layers.py `constrain`) take effect inside these traces
    step_fn = jax.jit(with_activation_sharding(make_train_step(setup.model, tx, schedule, n_tasks,
                                                               int(tcfg.accum_steps)), setup.mesh, setup.rules),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))
    eval_fn = jax.jit(with_activation_sharding(make_eval_step(setup.model, n_tasks), setup.mesh, setup.rules))
    writer = MetricsWriter(workdir, tensorboard=bool(tcfg.get("tensorboard", True)))

    def meta(extra=None):
        return {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
                "base_checkpoint": config.base_checkpoint, "best_val_loss": best_val,
                "evals_without_improvement": evals_without_improvement, **(extra or {})}

    max_steps = int(tcfg.max_steps)
    step = int(state.step)
    stop_reason = "max_steps"
    bar = tqdm(total=max_steps, initial=step, disable=not (progress and is_main), desc="train", unit="step",
               dynamic_ncols=True)
    peak = None
    if tcfg.get("log_mfu", True):
        from speechverse_jax.train.flops import peak_flops_per_device

        per_device = peak_flops_per_device()
        peak = per_device * jax.device_count() if per_device else None
        if per_device:
            say(f"MFU is reported against {per_device / 1e12:.3g} TFLOP/s per device x {jax.device_count()} "
                f"devices ({jax.devices()[0].device_kind}{', measured float32 matmul' if jax.devices()[0].platform == 'cpu' else ''})")
    window = {"audio_s": 0.0, "tokens": 0.0, "flops": 0.0, "t0": time.time(), "steps": 0}
    compile_s = None
    try:
        while step < max_steps:
            batch = next(data_iter)
            t_step = time.time()
            state, metrics = step_fn(state, setup.frozen, _put_batch(batch, setup.mesh))
            step += 1
            if compile_s is None:
                jax.block_until_ready(state.step)
                compile_s = time.time() - t_step
                say(f"first step (compile + run): {compile_s:.1f}s")
                window = {"audio_s": 0.0, "tokens": 0.0, "flops": 0.0, "t0": time.time(), "steps": 0}
            else:
                window["audio_s"] += _audio_seconds(batch)
                window["tokens"] += _target_tokens(batch)
                window["flops"] += _step_flops(setup.model_cfg, batch)
                window["steps"] += 1
            if step % int(tcfg.log_every) == 0 or step == max_steps:
                m = jax.device_get(metrics)
                elapsed = max(time.time() - window["t0"], 1e-9)
                record = {
                    "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "learning_rate": float(m["learning_rate"]), "skipped_steps": int(m["skipped_steps"]),
                }
                if window["steps"]:  # (the first step's time is compilation: reported once above)
                    record.update(step_time_s=elapsed / window["steps"], audio_seconds_per_s=window["audio_s"] / elapsed,
                                  target_tokens_per_s=window["tokens"] / elapsed,
                                  model_tflops_per_s=window["flops"] / elapsed / 1e12)
                    if peak:
                        record["mfu"] = window["flops"] / elapsed / peak
                for i, name in enumerate(data.task_names):
                    if m["task_tokens"][i]:
                        record[f"loss/{name}"] = float(m["task_nll"][i] / m["task_tokens"][i])
                if not bool(m["finite"]):
                    say(f"step {step}: non-finite loss or gradient, update skipped "
                        f"({int(m['consecutive_skips'])} in a row, {int(m['skipped_steps'])} in total)")
                writer.write(step, "train", record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.2e}")
                window = {"audio_s": 0.0, "tokens": 0.0, "flops": 0.0, "t0": time.time(), "steps": 0}
                if int(m["consecutive_skips"]) > int(tcfg.max_consecutive_skips):
                    raise NonFiniteError(
                        f"{int(m['consecutive_skips'])} steps in a row had a non-finite loss or gradient "
                        f"(train.max_consecutive_skips={int(tcfg.max_consecutive_skips)}). The paper saw gradient "
                        "explosions without the curriculum: start from the previous stage, lower optim.lr, or "
                        "check the data.")
            bar.update(1)
            is_eval = step % int(tcfg.eval_every) == 0 or step == max_steps
            improved = False
            if is_eval:
                val = evaluate(setup, state.params, data, eval_fn)
                stats = data.stats() if hasattr(data, "stats") else {}
                val["skipped_examples"] = sum(v for k, v in stats.items() if k.startswith("skipped/"))
                val["filtered_examples"] = sum(v for k, v in stats.items() if k.startswith("filtered/"))
                writer.write(step, "eval", val)
                improved = val["loss"] < best_val
                if improved:
                    best_val, evals_without_improvement = val["loss"], 0
                else:
                    evals_without_improvement += 1
                say(f"step {step}: val loss {val['loss']:.4f} (best {best_val:.4f})")
            if step % int(tcfg.checkpoint_every) == 0 or step == max_steps or improved:
                checkpointer.save(step, state, data_iter.get_state(), meta({"step": step}), best=improved)
                writer.sync()
            patience = int(tcfg.get("early_stopping_patience", 0))
            if is_eval and patience and evals_without_improvement >= patience:
                stop_reason = f"early stopping: no val improvement in {patience} evaluations"
                if step % int(tcfg.checkpoint_every) != 0 and not improved:
                    checkpointer.save(step, state, data_iter.get_state(), meta({"step": step}))
                break
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    summary = {"workdir": workdir, "steps": step, "stop_reason": stop_reason, "best_val_loss": best_val,
               "skipped_steps": int(state.skipped_steps), "compile_seconds": compile_s,
               "data": data.stats() if hasattr(data, "stats") else {}}
    say(f"stage done: {stop_reason}; best val loss {best_val:.4f}; {summary['skipped_steps']} skipped steps")
    return {"summary": summary, "state": state, "setup": setup}
