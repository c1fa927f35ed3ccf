"""Named hardware presets: mesh shape, micro-batch and gradient accumulation per slice.

    config = configs.load("stage1", "wlm,v5e-16")   # or --config stage1:wlm,v5e-16 on the command line
    slices.apply_slice(config, "v5e-16")                               # the same thing by hand

A preset fixes `config.mesh.{data,fsdp,tensor}`, `config.data.batch_size` (the GLOBAL batch, the
paper's 768) and `config.train.accum_steps`, so that

    per_device_batch * data * fsdp * accum_steps == global_batch

where `per_device_batch` is the micro-batch one (data, fsdp) shard runs at a time (tensor-parallel
devices of a shard share its rows).

The TPU compiler is the source of truth (`--compile-only` compiles for the preset's topology with
libtpu, no TPU needed; `bench/tpu_presets.py` searches the micro-batch): a preset listed in
`COMPILER_CHECKED` was derived from that compiler's memory report -- the largest micro-batch whose
full-size stage2_multitask step, at the largest bucket shapes of the data config (30 s audio, a
512-token instruction, 600 target tokens), peaks under USABLE_FRACTION of HBM -- and its report is
committed as bench/results/compile_<preset>.json (tests/test_tpu_compile.py checks it against the
preset). The others still rest on the memory model below; check one before paying for a run:
`speechverse-jax train --config configs/stage2_multitask.py:wlm,v6e-8 --workdir /tmp/x --compile-only`.

Memory model (full-size model, bf16 compute and bf16-stored frozen weights, scanned layers and
`model.remat=full` as the paper configs set them), fitted to the v5e-16 TPU compiles:
  * frozen weights: Flan-T5-XL 5.7 GB + WavLM-Large 0.63 GB = 6.3 GB, divided by `fsdp`.
  * trainable state: 28.3M float32 params + AdamW m, v + gradients + the accumulation carry
    = 5 x 113 MB, about 0.6 GB (replicated: small enough not to matter).
  * activations: with each T5 block rematerialised only its input is kept for the backward
    pass; the frozen WavLM keeps nothing (stop_gradient). The TPU compiler's temporaries grow by
    about 0.48 GB per micro-batch row at the largest buckets (v5e-16: 2.36 GB at 2 rows, 5.08 GB at 8,
    8.77 GB at 16, 12.96 GB at 24):
    ACTIVATION_GB_PER_EXAMPLE. (Without remat it was about 3.3 GB per row at 30 s audio and
    256 + 128 tokens, and the v5e-16 step did not fit at 2 rows: 24.25G of temporaries.)
  * headroom: 1.5 GB for the gathered layer weights, the recomputed block, XLA scratch (the
    compiled temporaries at zero rows, extrapolated).
A preset's micro-batch keeps that sum under USABLE_FRACTION of the device's memory.
Against the compiled reports: v5e-16 at 24 rows 14.0 GB estimated / 13.8 GB compiled (+2%), v6e-8
at 32 rows 18.3 / 20.9 (-13%), v5p-32 at 48 rows (weights replicated, no accumulation) 31.5 / 27.1
(+16%). So it is a screen good to about 20%, not a substitute for the compile.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

PAPER_GLOBAL_BATCH = 768

FROZEN_GB = 5.7 + 0.63  # Flan-T5-XL + WavLM-Large, bf16
TRAINABLE_STATE_GB = 0.6  # 28.3M f32 params, AdamW m and v, grads, accumulation carry
ACTIVATION_GB_PER_EXAMPLE = 0.48  # remat=full, largest buckets; fitted to TPU compiles (module docstring)
HEADROOM_GB = 1.5
USABLE_FRACTION = 0.9  # of the nominal HBM (runtime reservations; XLA_CLIENT_MEM_FRACTION=0.9 on GPU)


@dataclasses.dataclass(frozen=True)
class SlicePreset:
    name: str
    accelerator: str  # gcloud --accelerator-type (TPU) or a description (GPU, CPU)
    runtime_version: str  # TPU VM software version ("" off TPU)
    devices: int  # JAX devices (one per TPU chip: v4 / v5p megacore chips are one device each)
    hosts: int  # JAX processes (TPU VM workers)
    hbm_gb: float  # memory per device
    data: int
    fsdp: int
    tensor: int
    per_device_batch: int  # micro-batch rows per (data, fsdp) shard
    accum_steps: int
    why: str
    topology: str = ""  # libtpu topology name for deviceless compile-only checks (aot.py), "" off TPU

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.data * self.fsdp * self.accum_steps

    def estimated_gb(self) -> float:
        """Peak memory per device by the module's memory model."""
        return (FROZEN_GB / self.fsdp / self.tensor + TRAINABLE_STATE_GB
                + ACTIVATION_GB_PER_EXAMPLE * self.per_device_batch / self.tensor + HEADROOM_GB)


PRESETS: Dict[str, SlicePreset] = {p.name: p for p in (
    SlicePreset(
        "v4-8", "v4-8", "tpu-ubuntu2204-base", devices=4, hosts=1, hbm_gb=32.0,
        data=1, fsdp=4, tensor=1, per_device_batch=6, accum_steps=32,
        why="4 chips x 32 GB: FSDP-4 cuts the frozen weights to 1.6 GB/chip; 6 rows (23 GB est.) fit, "
            "8 (30 GB) would not leave 10% spare; 768 / (4 x 6) = 32 micro-steps"),
    SlicePreset(
        "v4-32", "v4-32", "tpu-ubuntu2204-base", devices=16, hosts=4, hbm_gb=32.0,
        data=4, fsdp=4, tensor=1, per_device_batch=6, accum_steps=8,
        why="16 chips on 4 hosts, one 3D-torus ICI slice: FSDP-4 groups (1.6 GB of frozen weights) "
            "x 4 data replicas; same 6-row micro-batch as v4-8; 768 / (16 x 6) = 8"),
    SlicePreset(
        "v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", devices=16, hosts=4, hbm_gb=16.0,
        data=1, fsdp=16, tensor=1, per_device_batch=24, accum_steps=2,
        topology="v5e:4x4",
        why="16 GB/chip: FSDP-16 over the whole slice (0.4 GB/chip of frozen weights, gathers on ICI); "
            "with scanned, rematerialised T5 blocks the TPU compiler fits 24 rows at the largest buckets "
            "in 12.87 GiB (86% of 16 GB; bench/results/compile_v5e-16.json; 48 rows would not fit), and "
            "768 / (16 x 24) = 2 micro-steps, 12x fewer weight all-gathers than the 2-row preset needed "
            "without remat"),
    SlicePreset(
        "v5p-32", "v5p-32", "v2-alpha-tpuv5", devices=16, hosts=4, hbm_gb=95.0,
        data=16, fsdp=1, tensor=1, per_device_batch=48, accum_steps=1,
        topology="v5p:2x2x4",
        why="95 GB/chip: the frozen weights replicated, so the step's only collectives are the "
            "trainable gradients' all-reduces (51, 57 MB); the TPU compiler fits all 48 rows of a shard "
            "in one step at 25.26 GiB (29% of 95 GB; bench/results/compile_v5p-32.json); "
            "768 / (16 x 48) = 1, no accumulation"),
    SlicePreset(
        "v6e-8", "v6e-8", "v2-alpha-tpuv6e", devices=8, hosts=1, hbm_gb=32.0,
        data=1, fsdp=8, tensor=1, per_device_batch=32, accum_steps=3,
        topology="v6e:2x4",
        why="8 chips x 32 GB on one host: FSDP-8 (0.8 GB/chip of weights); the TPU compiler fits 32 rows "
            "at the largest buckets in 19.45 GiB (65% of 32 GB; "
            "bench/results/compile_v6e-8.json; 48 rows peak at 94%); 768 / (8 x 32) = 3"),
    SlicePreset(
        "gpu-8xh100", "8x NVIDIA H100 80GB (one node)", "", devices=8, hosts=1, hbm_gb=80.0,
        data=8, fsdp=1, tensor=1, per_device_batch=16, accum_steps=6,
        why="80 GB/GPU: replicate the weights (NVLink makes FSDP cheap, but it is not needed) and "
            "run 16 rows (61 GB est. of the 72 GB JAX gets at mem fraction 0.9); 768 / (8 x 16) = 6"),
    SlicePreset(
        "cpu-8", "8 host-platform CPU devices (rehearsal)", "", devices=8, hosts=1, hbm_gb=0.0,
        data=2, fsdp=2, tensor=2, per_device_batch=8, accum_steps=24,
        why="rehearsal of the sharding code on one machine with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8: every mesh axis > 1; memory is host RAM"),
)}


# Presets whose micro-batch comes from the TPU compiler's memory report (committed under bench/results/).
COMPILER_CHECKED = {"v5e-16": "bench/results/compile_v5e-16.json", "v6e-8": "bench/results/compile_v6e-8.json",
                    "v5p-32": "bench/results/compile_v5p-32.json"}


def get(name: str) -> SlicePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown slice preset {name!r}; valid slices: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def apply_slice(config, name: str, global_batch: Optional[int] = None):
    """Set `config.mesh.{data,fsdp,tensor}`, `config.data.batch_size` and `config.train.accum_steps`
    from preset `name` (in place; returns `config`). `global_batch` (default: the preset's, i.e.
    the paper's 768) must divide into the preset's micro-batches."""
    p = get(name)
    batch = p.global_batch if global_batch is None else int(global_batch)
    shards = p.data * p.fsdp
    if batch <= 0 or batch % (shards * p.per_device_batch):
        raise ValueError(f"slice {name}: global batch {batch} must be a positive multiple of "
                         f"data*fsdp*per_device_batch = {shards * p.per_device_batch}")
    config.mesh.data = p.data
    config.mesh.fsdp = p.fsdp
    config.mesh.tensor = p.tensor
    config.data.batch_size = batch
    config.train.accum_steps = batch // (shards * p.per_device_batch)
    config.mesh.topology = p.topology
    return config


def table() -> str:
    """The presets as a markdown table (used by docs/scale.md)."""
    rows = ["| slice | accelerator | devices | hosts | HBM/device | mesh (data, fsdp, tensor) | "
            "per-device batch | accum | est. GB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        rows.append(f"| {p.name} | {p.accelerator} | {p.devices} | {p.hosts} | "
                    f"{f'{p.hbm_gb:g} GB' if p.hbm_gb else 'host RAM'} | ({p.data}, {p.fsdp}, {p.tensor}) | "
                    f"{p.per_device_batch} | {p.accum_steps} | {p.estimated_gb():.1f} |")
    return "\n".join(rows)
