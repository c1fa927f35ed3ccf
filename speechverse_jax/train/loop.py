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
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol

import flax.linen as nn
import jax
import numpy as np

from speechverse_jax import fs
from speechverse_jax import tree as tree_lib
from speechverse_jax.data.audio import SAMPLE_RATE
from speechverse_jax import checkpoints as base_ckpt
from speechverse_jax.errors import CheckpointMismatchError
from speechverse_jax.models import composed
from speechverse_jax.models import lora as lora_lib
from speechverse_jax.models.composed import ComposedConfig, init_params, init_params_subset
from speechverse_jax.models import scan_layout
from speechverse_jax.models.layers import with_activation_sharding
from speechverse_jax.train import checkpoint as ckpt_lib
from speechverse_jax.train import optimizer as opt_lib
from speechverse_jax.train import partitioning
from speechverse_jax.train.metrics_log import MetricsWriter
from speechverse_jax.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


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

    model_cfg: ComposedConfig  # SpeechVerseConfig (layout 't5') or SpeechVerseDecoderConfig ('decoder')
    model: Any  # SpeechVerse or SpeechVerseDecoder (models/composed.py)
    mesh: jax.sharding.Mesh
    labels: Dict[str, str]
    frozen: Any
    trainable: Any
    param_shardings: Dict[str, Any]  # flat path -> NamedSharding
    rules: Any = ()  # logical-axis rules (params and activations)


def build_setup(config, mesh: Optional[jax.sharding.Mesh] = None, log_fn: Callable = print) -> Setup:
    """Model config, mesh, param labels; frozen params restored and trainable params initialised
    (or taken from the previous stage, LoRA grafted) directly into their shardings."""
    model_cfg = base_ckpt.model_config_for(config.model, config.base_checkpoint)
    model = composed.module_for(model_cfg)
    layout = composed.layout_of(model_cfg)
    if mesh is None:
        mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = partitioning.rules_from_config(config.mesh.rules)
    rng = jax.random.PRNGKey(int(config.train.seed))
    boxed = jax.eval_shape(lambda r: init_params(model_cfg, r), rng)
    shardings = tree_lib.flatten(partitioning.param_shardings(boxed, mesh, rules))
    abstract = tree_lib.flatten(nn.unbox(boxed))
    labels = opt_lib.label_params(tree_lib.unflatten(abstract), [tuple(r) for r in config.train.param_rules])
    log_fn(opt_lib.describe(labels, tree_lib.unflatten(abstract)))

    frozen_paths = {k for k, v in labels.items() if v == opt_lib.FREEZE}
    train_paths = {k for k, v in labels.items() if v == opt_lib.TRAIN}
    frozen = {}
    if config.base_checkpoint:
        in_base = {k for k in frozen_paths if k.startswith(composed.frozen_prefixes(model_cfg))}
        target = tree_lib.unflatten({k: jax.ShapeDtypeStruct(abstract[k].shape, abstract[k].dtype, sharding=shardings[k])
                          for k in in_base})
        frozen = tree_lib.flatten(base_ckpt.load_base_params(config.base_checkpoint, target))
    missing_frozen = frozen_paths - set(frozen)
    if missing_frozen:
        if config.base_checkpoint:
            log_fn(f"warning: {len(missing_frozen)} frozen params are not in the base checkpoint and stay at "
                   f"their random init: {sorted(missing_frozen)[:5]}...")
        frozen.update(tree_lib.flatten(init_params_subset(model_cfg, rng, keep=missing_frozen.__contains__,
                                               out_shardings={k: shardings[k] for k in missing_frozen})))
    trainable = tree_lib.flatten(init_params_subset(model_cfg, jax.random.fold_in(rng, 1), keep=train_paths.__contains__,
                                         out_shardings={k: shardings[k] for k in train_paths}))
    init_from = config.train.init_from
    if init_from:
        # the previous stage may have run with the other layer layout (model.scan_layers)
        loaded, meta = ckpt_lib.load_trainable_params(init_from, with_meta=True)
        if meta.get("layout", "t5") != layout:  # (checkpoints written before the decoder layout: T5)
            raise CheckpointMismatchError(
                f"train.init_from={init_from} was trained with model.layout={meta.get('layout', 't5')!r}, but this "
                f"stage runs model.layout={layout!r} (base checkpoint {config.base_checkpoint or '(presets)'}): "
                "start from a run of the same layout")
        previous = scan_layout.to_layout(loaded, scan_layout.is_scanned(abstract))
        trainable, grafted = lora_lib.graft_lora(previous, trainable, where=f"train.init_from={init_from}")
        for k in previous:
            trainable[k] = jax.device_put(np.asarray(previous[k], abstract[k].dtype), shardings[k])
        log_fn(f"initialised from {init_from}: {len(previous)} params restored, {len(grafted)} new "
               f"({'LoRA grafted with b = 0' if any('/lora_' in k for k in grafted) else 'fresh init'})")
    return Setup(model_cfg, model, mesh, labels, tree_lib.unflatten(frozen), tree_lib.unflatten(trainable), shardings,
                 rules)


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
def _flops_for_shapes(model_cfg: ComposedConfig, rows: int, samples: int, frames: Optional[int], instruction: int,
                      target: int, prefix: int = 0) -> float:
    from speechverse_jax.train.flops import train_step_flops

    return train_step_flops(model_cfg, rows, samples, instruction, target, audio_frames=frames,
                            prefix_len=prefix)["total"]


def _step_flops(model_cfg: ComposedConfig, batch) -> float:
    """Analytic model FLOPs of one train step on this global batch's padded shapes (either layout;
    the decoder-only layout's prompt before the audio is `prefix_ids`)."""
    rows = batch["target_ids"].shape[0] * jax.process_count()
    ins, tgt = batch["instruction_ids"].shape[1], batch["target_ids"].shape[1]
    pre = batch["prefix_ids"].shape[1] if "prefix_ids" in batch else 0
    if "hidden_states" in batch:  # cached encoder states [b, L+1, frames, dim]: no encoder forward
        return _flops_for_shapes(model_cfg, rows, 0, batch["hidden_states"].shape[2], ins, tgt, pre)
    return _flops_for_shapes(model_cfg, rows, batch["audio"].shape[1], None, ins, tgt, pre)


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


class ThroughputMeter:
    """Audio seconds, target tokens and model FLOPs per wall second since the last `record`."""

    def __init__(self, model_cfg: ComposedConfig, peak_flops: Optional[float]):
        self.model_cfg, self.peak = model_cfg, peak_flops
        self.reset()

    def reset(self) -> None:
        self.audio_s = self.tokens = self.flops = 0.0
        self.steps, self.t0 = 0, time.time()

    def add(self, batch) -> None:
        self.audio_s += _audio_seconds(batch)
        self.tokens += _target_tokens(batch)
        self.flops += _step_flops(self.model_cfg, batch)
        self.steps += 1

    def record(self) -> Dict[str, float]:
        """The rates of the steps added since the last reset (none: {}), then reset."""
        out: Dict[str, float] = {}
        elapsed = max(time.time() - self.t0, 1e-9)
        if self.steps:
            out = dict(step_time_s=elapsed / self.steps, audio_seconds_per_s=self.audio_s / elapsed,
                       target_tokens_per_s=self.tokens / elapsed)
            if self.flops:
                out["model_tflops_per_s"] = self.flops / elapsed / 1e12
            if self.peak and self.flops:
                out["mfu"] = self.flops / elapsed / self.peak
        self.reset()
        return out


@dataclasses.dataclass
class EarlyStopping:
    """Best validation loss so far and evaluations without improvement (checkpointed in meta)."""

    patience: int
    best: float = math.inf
    without_improvement: int = 0

    def update(self, loss: float) -> bool:
        """Record a validation loss; True when it is the best so far."""
        if loss < self.best:
            self.best, self.without_improvement = loss, 0
            return True
        self.without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.without_improvement >= self.patience


def _peak_flops(log_mfu: bool, say: Callable) -> Optional[float]:
    """All devices' peak FLOP/s for the MFU figure (None: not reported)."""
    if not log_mfu:
        return None
    from speechverse_jax.train.flops import peak_flops_per_device

    per_device = peak_flops_per_device()
    if not per_device:
        return None
    dev = jax.devices()[0]
    say(f"MFU is reported against {per_device / 1e12:.3g} TFLOP/s per device x {jax.device_count()} "
        f"devices ({dev.device_kind}{', measured float32 matmul' if dev.platform == 'cpu' else ''})")
    return per_device * jax.device_count()


def _train_record(metrics, data: TrainData, meter: ThroughputMeter) -> Dict[str, float]:
    m = metrics
    record = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
              "learning_rate": float(m["learning_rate"]), "skipped_steps": int(m["skipped_steps"])}
    record.update(meter.record())  # (the first step's time is compilation: reported once, apart)
    for i, name in enumerate(data.task_names):
        if m["task_tokens"][i]:
            record[f"loss/{name}"] = float(m["task_nll"][i] / m["task_tokens"][i])
    return record


def _check_finite(m, step: int, max_skips: int, say: Callable) -> None:
    if not bool(m["finite"]):
        say(f"step {step}: non-finite loss or gradient, update skipped "
            f"({int(m['consecutive_skips'])} in a row, {int(m['skipped_steps'])} in total)")
    if int(m["consecutive_skips"]) > max_skips:
        raise NonFiniteError(
            f"{int(m['consecutive_skips'])} steps in a row had a non-finite loss or gradient "
            f"(train.max_consecutive_skips={max_skips}). The paper saw gradient explosions without the "
            "curriculum: start from the previous stage, lower optim.lr, or check the data.")


def _validate(setup: Setup, state, data: TrainData, eval_fn) -> Dict[str, float]:
    val = evaluate(setup, state.params, data, eval_fn)
    stats = data.stats() if hasattr(data, "stats") else {}
    val["skipped_examples"] = sum(v for k, v in stats.items() if k.startswith("skipped/"))
    val["filtered_examples"] = sum(v for k, v in stats.items() if k.startswith("filtered/"))
    return val


def train(config, workdir: str, data: TrainData, mesh=None, progress: bool = True) -> Dict[str, Any]:
    """Run one stage until `train.max_steps` or early stopping. Returns a summary dict."""
    from tqdm import tqdm

    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    if is_main:  # a workdir that cannot be a folder fails here, naming it, before any work
        fs.makedirs(fs.abs_path(workdir))
    setup = build_setup(config, mesh, log_fn=say)
    tcfg = config.train
    tx, schedule = opt_lib.make_optimizer(config.optim, int(config.train.max_steps))
    n_tasks = max(len(data.task_names), 1)
    state = jax.jit(lambda p: init_state(p, tx, int(tcfg.seed)))(setup.trainable)
    say(f"optimizer state: {tree_lib.count(state.opt_state):,} values "
        f"(= {tree_lib.count(state.opt_state) / max(tree_lib.count(state.params), 1):.2f} x trainable)")
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(tcfg.keep_checkpoints))
    data_iter = data.train_iterator()
    stopper = EarlyStopping(int(tcfg.early_stopping_patience))
    if checkpointer.latest_step() is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, data_state, meta = checkpointer.restore(abstract)
        if data_state is not None:
            data_iter.set_state(data_state)
        stopper.best = float(meta.get("best_val_loss", math.inf))
        stopper.without_improvement = int(meta.get("evals_without_improvement", 0))
        say(f"resumed from {workdir} at step {int(state.step)}")
    if is_main:  # written once the run is known to start (a refused resume leaves the folder as it was)
        ckpt_lib.write_config(workdir, config)

    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    # activation constraints (models/layers.py `constrain`) take effect inside these traces
    step_fn = jax.jit(with_activation_sharding(make_train_step(setup.model, tx, schedule, n_tasks,
                                                               int(tcfg.accum_steps)), setup.mesh, setup.rules),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))
    eval_fn = jax.jit(with_activation_sharding(make_eval_step(setup.model, n_tasks), setup.mesh, setup.rules))
    writer = MetricsWriter(workdir, tensorboard=bool(tcfg.tensorboard))

    def save(step, best=False):
        meta = {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
                "base_checkpoint": config.base_checkpoint, "layout": composed.layout_of(setup.model_cfg), "best_val_loss": stopper.best,
                "evals_without_improvement": stopper.without_improvement, "step": step}
        checkpointer.save(step, state, data_iter.get_state(), meta, best=best)

    max_steps, every = int(tcfg.max_steps), lambda n: step % int(n) == 0 or step == max_steps
    step = int(state.step)
    stop_reason = "max_steps"
    bar = tqdm(total=max_steps, initial=step, disable=not (progress and is_main), desc="train", unit="step",
               dynamic_ncols=True)
    meter = ThroughputMeter(setup.model_cfg, _peak_flops(bool(tcfg.log_mfu), say))
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
                meter.reset()
            else:
                meter.add(batch)
            if every(tcfg.log_every):
                m = jax.device_get(metrics)
                record = _train_record(m, data, meter)
                writer.write(step, "train", record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.2e}")
                _check_finite(m, step, int(tcfg.max_consecutive_skips), say)
            bar.update(1)
            is_eval, improved = every(tcfg.eval_every), False
            if is_eval:
                val = _validate(setup, state, data, eval_fn)
                writer.write(step, "eval", val)
                improved = stopper.update(val["loss"])
                say(f"step {step}: val loss {val['loss']:.4f} (best {stopper.best:.4f})")
            if every(tcfg.checkpoint_every) or improved:
                save(step, best=improved)
                writer.sync()
            if is_eval and stopper.should_stop:
                stop_reason = f"early stopping: no val improvement in {stopper.patience} evaluations"
                if step % int(tcfg.checkpoint_every) != 0 and not improved:
                    save(step)
                break
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    summary = {"workdir": workdir, "steps": step, "stop_reason": stop_reason, "best_val_loss": stopper.best,
               "skipped_steps": int(state.skipped_steps), "compile_seconds": compile_s,
               "data": data.stats() if hasattr(data, "stats") else {}}
    say(f"stage done: {stop_reason}; best val loss {stopper.best:.4f}; {summary['skipped_steps']} skipped steps")
    return {"summary": summary, "state": state, "setup": setup}
