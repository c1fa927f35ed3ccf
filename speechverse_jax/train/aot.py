"""Ahead-of-time check of a training config: compile its train step for its target from abstract
shapes only (no weights, no data, no accelerator) and report, per device, memory, FLOPs, the
collectives of one optimizer step, and a step-time estimate.

    speechverse-jax train --config configs/stage2_multitask.py:wlm,v5e-16 --workdir /tmp/x --compile-only

Targets (`--compile-target`, default `auto`):
  * `tpu`: the slice's real TPU topology (`--topology v5e:4x4`, or the slice preset's
    `mesh.topology`) through libtpu's deviceless AOT path: no TPU is needed, the TPU compiler
    runs on this machine, and its memory and cost analyses are the TPU's own. A step that does
    not fit fails with RESOURCE_EXHAUSTED, as it would on the pod.
  * `cpu`: forced host-platform CPU devices, as many as the mesh needs. Memory figures are then
    XLA:CPU's buffer assignment: exact for CPU, only indicative for an accelerator.
  * `auto`: `tpu` when libtpu is installed and a topology is known, else `cpu` (and it says so).
"""

from __future__ import annotations

import importlib.util
import re
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax import tree as tree_lib
from speechverse_jax.data.audio import SAMPLE_RATE
from speechverse_jax.train import flops as flops_lib

TARGETS = ("auto", "tpu", "cpu")

# Per-chip figures from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v5e,
# /v5p, /v6e; cited in docs/scale.md): bf16 dense peak FLOP/s, HBM bytes, HBM bandwidth (bytes/s),
# ICI bandwidth per chip in one direction (bytes/s: half the pages' bidirectional figure).
CHIPS = {
    "TPU v5 lite": dict(peak_flops=197e12, hbm=16 * 10**9, hbm_bw=819e9, ici_bw=400e9 / 2),  # v5e
    "TPU v5": dict(peak_flops=459e12, hbm=95 * 10**9, hbm_bw=2765e9, ici_bw=1200e9 / 2),  # v5p
    "TPU v6 lite": dict(peak_flops=918e12, hbm=32 * 10**9, hbm_bw=1638e9, ici_bw=800e9 / 2),  # v6e
}


def mesh_devices(config) -> int:
    """Devices the config's mesh asks for (0 when a -1 entry leaves it to the device count)."""
    shape = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    return 0 if -1 in shape else int(np.prod(shape))


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def force_cpu_devices(n: int) -> None:
    """Ask for `n` CPU devices; call before JAX starts its CPU backend."""
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)


def config_topology(config) -> str:
    return str(config.mesh.topology or "")


def resolve_target(config, target: str = "auto", topology: Optional[str] = None) -> Tuple[str, str, str]:
    """(target 'tpu' | 'cpu', topology name or '', why) for a compile-only run."""
    if target not in TARGETS:
        raise ValueError(f"--compile-target must be one of {TARGETS}, got {target!r}")
    topology = topology or config_topology(config)
    if target == "cpu":
        return "cpu", "", "forced CPU devices (asked for)"
    if not libtpu_available():
        if target == "tpu":
            raise RuntimeError("--compile-target=tpu needs libtpu (pip install 'libtpu==0.0.42.*', the version "
                               "jax[tpu]==0.10.2 pins); it is not installed")
        return "cpu", "", "forced CPU devices: libtpu is not installed, so no TPU compiler is available"
    if not topology:
        if target == "tpu":
            raise ValueError("--compile-target=tpu needs a topology: --topology v5e:4x4 or a slice preset "
                             "(configs/...py:wlm,v5e-16) that sets mesh.topology")
        return "cpu", "", "forced CPU devices: no TPU topology given (--topology or a TPU slice preset)"
    return "tpu", topology, f"TPU compiler for topology {topology} (libtpu deviceless AOT)"


def topology_devices(topology: str):
    """The devices of a TPU topology (e.g. 'v5e:4x4'), with no TPU attached."""
    import os

    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file; a compile-only process needs no exclusive TPU access
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def batch_shapes(config, layout: str = "t5") -> Dict[str, int]:
    """The worst-case padded batch: the largest bucket of each length, the global batch size.

    The decoder-only layout also has the chat template's text before the audio (`prefix_ids`),
    padded to an instruction bucket by the loader: taken as the smallest one, which holds the
    templates of the supported LLMs (Llama 3.x with its default system turn: about 30 tokens)."""
    d = config.data
    out = {
        "batch": int(d.batch_size),
        "audio_samples": int(round(max(float(s) for s in d.audio_buckets_seconds) * SAMPLE_RATE)),
        "instruction_len": max(int(x) for x in d.instruction_buckets),
        "target_len": max(int(x) for x in d.target_buckets),
    }
    if layout == "decoder":
        out["prefix_len"] = min(int(x) for x in d.instruction_buckets)
    return out


def _bytes_per_device(tree: Any) -> int:
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def lower_train_step(config, mesh, model_cfg=None, activation_constraints: bool = True) -> Tuple[Any, Dict[str, Any]]:
    """Lower `config`'s train step on `mesh` from abstract shapes. Returns (lowered, info).

    `model_cfg` overrides the model built from `config.model` (small models in tests);
    `activation_constraints=False` traces without the activation sharding context (tests check
    that the constraints change the compiled program).
    """
    import flax.linen as nn
    from speechverse_jax import checkpoints as base_ckpt
    from speechverse_jax.models import composed
    from speechverse_jax.models.composed import init_params
    from speechverse_jax.models.layers import with_activation_sharding
    from speechverse_jax.train import optimizer as opt_lib
    from speechverse_jax.train import partitioning
    from speechverse_jax.train.step import init_state, make_train_step

    if model_cfg is None:  # either layout: `model.layout` and the base checkpoint decide (as training)
        model_cfg = base_ckpt.model_config_for(config.model, config.base_checkpoint)
    layout = composed.layout_of(model_cfg)
    model = composed.module_for(model_cfg)
    rules = partitioning.rules_from_config(config.mesh.rules)
    boxed = jax.eval_shape(lambda r: init_params(model_cfg, r), jax.random.PRNGKey(0))
    shardings = tree_lib.flatten(partitioning.param_shardings(boxed, mesh, rules))
    flat = tree_lib.flatten(nn.unbox(boxed))
    labels = opt_lib.label_params(tree_lib.unflatten(flat),
                                  [tuple(r) for r in config.train.param_rules])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in flat.items()}
    frozen, trainable = opt_lib.split(tree_lib.unflatten(abstract), labels)[::-1]

    tx, schedule = opt_lib.make_optimizer(config.optim, int(config.train.max_steps))
    init = jax.jit(lambda p: init_state(p, tx, 0)).lower(trainable).compile()
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   jax.eval_shape(lambda p: init_state(p, tx, 0), trainable), init.output_shardings)

    shapes = batch_shapes(config, layout)
    b = shapes["batch"]
    batch_arrays = {
        "audio": ((b, shapes["audio_samples"]), jnp.float32), "audio_mask": ((b, shapes["audio_samples"]), jnp.bool_),
        "instruction_ids": ((b, shapes["instruction_len"]), jnp.int32),
        "instruction_mask": ((b, shapes["instruction_len"]), jnp.bool_),
        "target_ids": ((b, shapes["target_len"]), jnp.int32), "target_mask": ((b, shapes["target_len"]), jnp.bool_),
        "task_id": ((b,), jnp.int32), "example_mask": ((b,), jnp.bool_),
    }
    if layout == "decoder":
        batch_arrays["prefix_ids"] = ((b, shapes["prefix_len"]), jnp.int32)
        batch_arrays["prefix_mask"] = ((b, shapes["prefix_len"]), jnp.bool_)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
             for k, (shape, dtype) in batch_arrays.items()}
    accum = int(config.train.accum_steps)
    if b % (accum * mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"data.batch_size={b} must divide by train.accum_steps={accum} x the batch-sharding "
                         f"mesh axes data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
    fn = make_train_step(model, tx, schedule, 1, accum)
    if activation_constraints:
        fn = with_activation_sharding(fn, mesh, rules)
    step = jax.jit(fn, out_shardings=(jax.tree_util.tree_map(lambda x: x.sharding, state), None),
                   donate_argnums=(0,))
    t0 = time.time()
    lowered = step.lower(state, frozen, batch)
    info = {
        "model_cfg": model_cfg, "layout": layout, "shapes": shapes, "accum_steps": accum,
        "lower_seconds": time.time() - t0,
        "params": {"frozen": tree_lib.count(frozen), "trainable": tree_lib.count(trainable)},
        "per_device_bytes": {
            "frozen_params": _bytes_per_device(frozen),
            "trainable_params": _bytes_per_device(state.params),
            "optimizer_state": _bytes_per_device(state.opt_state),
        },
    }
    return lowered, info


# ----------------------------------------------------------------------------- HLO collectives

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)[\s(].*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_COND_LIMIT = re.compile(r"constant\((\d+)\)")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _group_size(line: str) -> int:
    m = _GROUPS_MESH.search(line)  # replica_groups=mesh['axis_0'=1,'axis_1'=4] {'axis_1'}
    if m:
        sizes = {k.strip().strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)}
        return int(np.prod([sizes.get(a.strip().strip("'"), 1) for a in m.group(2).split(",") if a.strip()] or [1]))
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return 0


def collective_stats(hlo_text: str) -> Dict[str, Any]:
    """Count and bytes of each collective kind in a compiled (per-device) HLO module, weighted by
    how often it runs in one call: an op inside a while loop with a known trip count n (a scanned
    layer stack, gradient accumulation) counts n times, nested loops multiply.

    Bytes are the op's full buffer on one device: the gathered result of an all-gather, the
    un-scattered input of a reduce-scatter, the buffer of an all-reduce. `ici_bytes` is what a
    ring algorithm sends per device: (g-1)/g of that for gather / scatter, 2(g-1)/g for all-reduce,
    the whole buffer for all-to-all and collective-permute (g = replica-group size).
    """
    comps: Dict[str, list] = {}
    current = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if current is None or (not line.startswith(" ") and stripped.endswith("{")):
            m = _COMP_HEADER.match(stripped)
            if m and stripped.endswith("{"):
                current = m.group(1)
                comps[current] = []
                if stripped.startswith("ENTRY"):
                    comps.setdefault("__entry__", [current])
                continue
        if stripped == "}":
            continue
        if current is not None:
            comps[current].append(stripped)
    entry = comps.pop("__entry__", [None])[0]
    edges: Dict[str, list] = {}
    unknown_trip = 0
    for name, lines in comps.items():
        for line in lines:
            calls = _CALLS.findall(line)
            if not calls and "branch_computations" not in line:
                continue
            trip = 1
            if " while(" in line:
                m = _TRIP.search(line)
                if m:
                    trip = int(m.group(1))
                else:  # a scan's condition: `compare(counter, constant(N)), direction=LT`, counter from 0
                    cond = dict(calls).get("condition")
                    limits = [int(c) for l in comps.get(cond, []) for c in _COND_LIMIT.findall(l)]
                    if len(limits) == 1 and any("direction=LT" in l for l in comps.get(cond, [])):
                        trip = limits[0]
                    else:
                        unknown_trip += 1
            for kind, child in calls:
                edges.setdefault(name, []).append((child, trip if kind in ("body", "condition") else 1))
            m = _BRANCHES.search(line)
            if m:
                for child in m.group(1).split(","):
                    edges.setdefault(name, []).append((child.strip().lstrip("%"), 1))
    mult: Dict[str, int] = {}

    def visit(name, factor, depth=0):
        if depth > 64:
            return
        mult[name] = mult.get(name, 0) + factor
        for child, trip in edges.get(name, []):
            visit(child, factor * trip, depth + 1)

    if entry is not None:
        visit(entry, 1)
    out = {k: {"count": 0, "bytes": 0, "ici_bytes": 0.0} for k in COLLECTIVES}
    for name, lines in comps.items():
        n = mult.get(name, 0)
        if not n:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            kind = m.group(2)
            result = m.group(1)
            operands = line[m.end():]
            if kind == "reduce-scatter":
                size = _shape_bytes(operands.split(")")[0])
            elif m.group(3):  # async start: the result tuple holds (operand, output): take the output
                shapes = _SHAPE.findall(result)
                size = _shape_bytes(f"{shapes[-1][0]}[{shapes[-1][1]}]") if shapes else 0
            else:
                size = _shape_bytes(result)
            g = _group_size(line) or 1
            factor = {"all-gather": (g - 1) / g, "reduce-scatter": (g - 1) / g,
                      "all-reduce": 2 * (g - 1) / g}.get(kind, 1.0)
            out[kind]["count"] += n
            out[kind]["bytes"] += n * size
            out[kind]["ici_bytes"] += n * size * factor
    out["unknown_trip_count_loops"] = unknown_trip
    return out


# ----------------------------------------------------------------------------- report

def step_time_estimate(report: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """An ESTIMATE of one optimizer step's time from the compiler's cost analysis and the
    collective bytes over the chip's ICI bandwidth (figures in `CHIPS`). None off TPU."""
    chip = CHIPS.get(report["device_kind"])
    if chip is None:
        return None
    # XLA's cost analysis counts a while-loop body once (the layer scan, the accumulation loop),
    # so the compute term uses the analytic model FLOPs, plus one more LLM forward (T5 or the
    # decoder-only LLM) when its layers are rematerialised (the recomputation), spread over the devices.
    model_flops = report["analytic_flops"]["total"]
    af = report["analytic_flops"]
    executed = model_flops + (af.get("t5_forward", af.get("llm_forward", 0.0)) if report.get("remat", "none") != "none"
                              else 0.0)
    compute = executed / report["devices"] / chip["peak_flops"]
    ici = sum(v["ici_bytes"] for k, v in report["collectives"].items() if isinstance(v, dict)) / chip["ici_bw"]
    hbm = 0.0  # not estimated: bytes accessed from cost analysis have the same loop under-count
    roofline = compute
    serial = roofline + ici  # no overlap of collectives with compute
    overlapped = max(roofline, ici)
    mfu = lambda t: model_flops / (report["devices"] * chip["peak_flops"] * t) if t else float("nan")  # noqa: E731
    return {"compute_seconds": compute, "hbm_seconds": hbm, "ici_seconds": ici,
            "step_seconds_no_overlap": serial, "step_seconds_full_overlap": overlapped,
            "mfu_no_overlap": mfu(serial), "mfu_full_overlap": mfu(overlapped)}


def compile_train_step(config, log_fn=print, compiler_options: Optional[Dict[str, Any]] = None,
                       target: str = "auto", topology: Optional[str] = None, model_cfg=None,
                       hlo_out: Optional[str] = None) -> Dict[str, Any]:
    """Lower and compile `config`'s train step for its target (see the module docstring); returns
    the report (also logged). Raises the compiler's error when the step does not fit."""
    from speechverse_jax.train import partitioning

    kind, topology, why = resolve_target(config, target, topology)
    log_fn(f"compile-only: {why}")
    if kind == "tpu":
        devices = topology_devices(topology)
        need = mesh_devices(config)
        if need and need != len(devices):
            raise ValueError(f"mesh {dict(config.mesh.items()) if hasattr(config.mesh, 'items') else config.mesh} "
                             f"needs {need} devices, topology {topology} has {len(devices)}")
    else:
        n = mesh_devices(config) or 1
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise RuntimeError(f"the mesh needs {n} CPU devices but JAX has {len(devices)}: call "
                               f"aot.force_cpu_devices({n}) before JAX starts (the CLI does)")
        devices = devices[:n] if mesh_devices(config) else devices
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    lowered, info = lower_train_step(config, mesh, model_cfg=model_cfg)
    t0, c0 = time.time(), time.process_time()
    compiled = lowered.compile(compiler_options)
    t_compile, c_compile = time.time() - t0, time.process_time() - c0

    hlo_text = compiled.as_text()
    if hlo_out:  # the compiled per-device program, gzipped (where the collectives come from)
        import gzip

        with gzip.open(hlo_out, "wt") as f:
            f.write(hlo_text)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    shapes = info["shapes"]
    b = shapes["batch"]
    analytic = flops_lib.train_step_flops(info["model_cfg"], b, shapes["audio_samples"], shapes["instruction_len"],
                                          shapes["target_len"], prefix_len=shapes.get("prefix_len", 0))
    n_dev = mesh.devices.size
    report = {
        "target": kind,
        "target_why": why,
        "layout": info["layout"],
        "llm": _llm_summary(info["model_cfg"]),
        "topology": topology,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": int(n_dev),
        "device_kind": str(mesh.devices.flat[0].device_kind),
        "batch": shapes,
        "accum_steps": info["accum_steps"],
        "micro_batch_per_shard": b // info["accum_steps"] // (mesh.shape["data"] * mesh.shape["fsdp"]),
        "scan_layers": bool(config.model.scan_layers),
        "remat": str(config.model.remat),
        "loss_chunk": int(config.model.loss_chunk),
        "params": info["params"],
        "per_device_bytes": info["per_device_bytes"],
        # wall seconds, and the process's CPU seconds (all threads; steadier on a shared machine)
        "compile_seconds": {"lower": round(info["lower_seconds"], 2), "compile": round(t_compile, 2),
                            "compile_cpu": round(c_compile, 2)},
        "analytic_flops": analytic,
        # XLA's count is for one device's program, each while-loop body counted once (so it is
        # far below the analytic count for a scanned / accumulating step).
        "xla_flops_per_device": float(cost.get("flops", float("nan"))),
        "xla_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "xla_optimal_seconds": float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None,
        "collectives": collective_stats(hlo_text),
    }
    if mem is not None:
        report["xla_memory_per_device"] = {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
            "generated_code": int(mem.generated_code_size_in_bytes),
            "peak_estimate": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        }
        chip = CHIPS.get(report["device_kind"])
        if chip is not None:
            report["hbm_bytes"] = chip["hbm"]
            report["hbm_fraction"] = report["xla_memory_per_device"]["peak_estimate"] / chip["hbm"]
    report["step_time_estimate"] = step_time_estimate(report)
    log_fn(format_report(report))
    return report


def _llm_summary(cfg) -> str:
    """'llama: 28 layers, hidden 3072, vocab 128256' (decoder) or 't5: 24+24 layers, d_model 2048, ...'."""
    if hasattr(cfg, "llm"):
        c = cfg.llm
        return f"{c.family}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}"
    c = cfg.t5
    return f"t5: {c.num_layers}+{c.num_decoder_layers} layers, d_model {c.d_model}, vocab {c.vocab_size}"


def format_report(r: Dict[str, Any]) -> str:
    gib = lambda x: f"{x / 2**30:8.2f} GiB"  # noqa: E731
    lines = [
        f"compile-only [{r.get('target', 'cpu')}{' ' + r['topology'] if r.get('topology') else ''}]: "
        f"layout {r.get('layout', 't5')} ({r.get('llm', '?')}), mesh {r['mesh']} "
        f"on {r['devices']} x {r['device_kind']}; global batch {r['batch']['batch']} "
        f"({'prefix %d, ' % r['batch']['prefix_len'] if 'prefix_len' in r['batch'] else ''}"
        f"audio {r['batch']['audio_samples'] / SAMPLE_RATE:g} s, instruction {r['batch']['instruction_len']}, "
        f"target {r['batch']['target_len']} tokens), accum_steps {r['accum_steps']} "
        f"(micro-batch {r.get('micro_batch_per_shard', '?')} rows per (data, fsdp) shard); "
        f"scan_layers={r.get('scan_layers')}, remat={r.get('remat')}, loss_chunk={r.get('loss_chunk', 0)}",
        f"  params: {r['params']['frozen']:,} frozen, {r['params']['trainable']:,} trainable",
        f"  lowered in {r['compile_seconds']['lower']} s, compiled in {r['compile_seconds']['compile']} s wall"
        f" ({r['compile_seconds'].get('compile_cpu', '?')} s CPU)",
        "  per device:",
    ]
    for k, v in r["per_device_bytes"].items():
        lines.append(f"    {k:<22}{gib(v)}")
    for k, v in r.get("xla_memory_per_device", {}).items():
        lines.append(f"    xla {k:<18}{gib(v)}")
    if "hbm_fraction" in r:
        lines.append(f"    peak / HBM            {100 * r['hbm_fraction']:7.1f} %  (of {r['hbm_bytes'] / 2**30:g} GiB)")
    total_xla = r["xla_flops_per_device"] * r["devices"]
    lines.append(f"  FLOPs per step: analytic {r['analytic_flops']['total']:.4g}, XLA {total_xla:.4g} "
                 f"({r['xla_flops_per_device']:.4g} per device; ratio XLA/analytic "
                 f"{total_xla / max(r['analytic_flops']['total'], 1):.3f})")
    lines.append("  collectives per optimizer step, per device (count, buffer bytes, ring bytes sent):")
    for k in COLLECTIVES:
        c = r["collectives"][k]
        lines.append(f"    {k:<20}{c['count']:6d} {gib(c['bytes'])} {gib(c['ici_bytes'])}")
    est = r.get("step_time_estimate")
    if est:
        lines.append(f"  ESTIMATE (not measured) of the step time: compute at peak {est['compute_seconds']:.3f} s, "
                     f"ICI {est['ici_seconds']:.3f} s -> "
                     f"{est['step_seconds_full_overlap']:.3f}-{est['step_seconds_no_overlap']:.3f} s per step, MFU "
                     f"{100 * est['mfu_no_overlap']:.0f}-{100 * est['mfu_full_overlap']:.0f} %")
    return "\n".join(lines)
