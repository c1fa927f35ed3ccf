"""Ahead-of-time check of a training config: compile its train step for its mesh from abstract
shapes only (no weights, no data, no accelerator) and report memory per device and FLOPs.

    speechverse-jax train --config configs/stage2_multitask.py:v5e-16 --workdir /tmp/x --compile-only

Without an accelerator the mesh is built from forced CPU devices (as many as the mesh needs), so a
laptop answers "does the full-size step compile for a 16-chip mesh, and what does each device
hold". Memory figures come from XLA's buffer assignment for the compiling backend: exact for that
backend, indicative for another (TPU layouts and fusion differ).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax import tree as tree_lib
from speechverse_jax.data.audio import SAMPLE_RATE
from speechverse_jax.train import flops as flops_lib



def mesh_devices(config) -> int:
    """Devices the config's mesh asks for (0 when a -1 entry leaves it to the device count)."""
    shape = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    return 0 if -1 in shape else int(np.prod(shape))


def force_cpu_devices(n: int) -> None:
    """Ask for `n` CPU devices; call before JAX starts a backend. No-op with an accelerator."""
    import importlib.util

    if n > 1 and not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin")):
        jax.config.update("jax_num_cpu_devices", n)


def batch_shapes(config) -> Dict[str, int]:
    """The worst-case padded batch: the largest bucket of each length, the global batch size."""
    d = config.data
    return {
        "batch": int(d.batch_size),
        "audio_samples": int(round(max(float(s) for s in d.audio_buckets_seconds) * SAMPLE_RATE)),
        "instruction_len": max(int(x) for x in d.instruction_buckets),
        "target_len": max(int(x) for x in d.target_buckets),
    }


def _bytes_per_device(tree: Any) -> int:
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def compile_train_step(config, log_fn=print, compiler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Lower and compile `config`'s train step on its mesh; returns the report (also logged)."""
    import flax.linen as nn
    from flax import traverse_util

    from speechverse_jax import checkpoints as base_ckpt
    from speechverse_jax.models import config as model_cfg_lib
    from speechverse_jax.models.speechverse import SpeechVerse, init_params
    from speechverse_jax.train import optimizer as opt_lib
    from speechverse_jax.train import partitioning
    from speechverse_jax.train.step import init_state, make_train_step

    wavlm_cfg = t5_cfg = None
    if config.base_checkpoint:
        wavlm_cfg, t5_cfg, _ = base_ckpt.load_model_config(config.base_checkpoint)
    model_cfg = model_cfg_lib.build_model_config(config.model, wavlm_cfg, t5_cfg)
    model = SpeechVerse(model_cfg)
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = partitioning.rules_from_config(config.mesh.rules)
    boxed = jax.eval_shape(lambda r: init_params(model_cfg, r), jax.random.PRNGKey(0))
    shardings = traverse_util.flatten_dict(partitioning.param_shardings(boxed, mesh, rules), sep="/")
    flat = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
    labels = opt_lib.label_params(traverse_util.unflatten_dict(flat, sep="/"),
                                  [tuple(r) for r in config.train.param_rules])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in flat.items()}
    unflat = lambda keep: traverse_util.unflatten_dict(  # noqa: E731
        {k: v for k, v in abstract.items() if labels[k] == keep}, sep="/")
    frozen, trainable = unflat(opt_lib.FREEZE), unflat(opt_lib.TRAIN)

    tx, schedule = opt_lib.make_optimizer(config.optim)
    init = jax.jit(lambda p: init_state(p, tx, 0)).lower(trainable).compile()
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   jax.eval_shape(lambda p: init_state(p, tx, 0), trainable), init.output_shardings)

    shapes = batch_shapes(config)
    b = shapes["batch"]
    batch_arrays = {
        "audio": ((b, shapes["audio_samples"]), jnp.float32), "audio_mask": ((b, shapes["audio_samples"]), jnp.bool_),
        "instruction_ids": ((b, shapes["instruction_len"]), jnp.int32),
        "instruction_mask": ((b, shapes["instruction_len"]), jnp.bool_),
        "target_ids": ((b, shapes["target_len"]), jnp.int32), "target_mask": ((b, shapes["target_len"]), jnp.bool_),
        "task_id": ((b,), jnp.int32), "example_mask": ((b,), jnp.bool_),
    }
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
             for k, (shape, dtype) in batch_arrays.items()}
    accum = int(config.train.accum_steps)
    if b % (accum * mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"data.batch_size={b} must divide by train.accum_steps={accum} x the batch-sharding "
                         f"mesh axes data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
    step = jax.jit(make_train_step(model, tx, schedule, 1, accum),
                   out_shardings=(jax.tree_util.tree_map(lambda x: x.sharding, state), None), donate_argnums=(0,))
    t0 = time.time()
    lowered = step.lower(state, frozen, batch)
    t_lower = time.time() - t0
    compiled = lowered.compile(compiler_options)
    t_compile = time.time() - t0 - t_lower

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    analytic = flops_lib.train_step_flops(model_cfg, b, shapes["audio_samples"], shapes["instruction_len"],
                                          shapes["target_len"])
    n_dev = mesh.devices.size
    report = {
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": int(n_dev),
        "device_kind": str(jax.devices()[0].device_kind),
        "batch": shapes,
        "accum_steps": accum,
        "params": {"frozen": tree_lib.count(frozen), "trainable": tree_lib.count(trainable)},
        "per_device_bytes": {
            "frozen_params": _bytes_per_device(frozen),
            "trainable_params": _bytes_per_device(state.params),
            "optimizer_state": _bytes_per_device(state.opt_state),
        },
        "compile_seconds": {"lower": round(t_lower, 2), "compile": round(t_compile, 2)},
        "analytic_flops": analytic,
        # XLA's count is for one device's program; times the devices for the whole step.
        "xla_flops_per_device": float(cost.get("flops", float("nan"))),
    }
    if mem is not None:
        report["xla_memory_per_device"] = {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
            "generated_code": int(mem.generated_code_size_in_bytes),
            "peak_estimate": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        }
    log_fn(format_report(report))
    return report


def format_report(r: Dict[str, Any]) -> str:
    gib = lambda x: f"{x / 2**30:8.2f} GiB"  # noqa: E731
    lines = [
        f"compile-only: mesh {r['mesh']} on {r['devices']} x {r['device_kind']}; global batch {r['batch']['batch']} "
        f"(audio {r['batch']['audio_samples'] / SAMPLE_RATE:g} s, instruction {r['batch']['instruction_len']}, "
        f"target {r['batch']['target_len']} tokens), accum_steps {r['accum_steps']}",
        f"  params: {r['params']['frozen']:,} frozen, {r['params']['trainable']:,} trainable",
        f"  lowered in {r['compile_seconds']['lower']} s, compiled in {r['compile_seconds']['compile']} s",
        "  per device:",
    ]
    for k, v in r["per_device_bytes"].items():
        lines.append(f"    {k:<22}{gib(v)}")
    for k, v in r.get("xla_memory_per_device", {}).items():
        lines.append(f"    xla {k:<18}{gib(v)}")
    total_xla = r["xla_flops_per_device"] * r["devices"]
    lines.append(f"  FLOPs per step: analytic {r['analytic_flops']['total']:.4g}, XLA {total_xla:.4g} "
                 f"({r['xla_flops_per_device']:.4g} per device; ratio XLA/analytic "
                 f"{total_xla / max(r['analytic_flops']['total'], 1):.3f})")
    return "\n".join(lines)
