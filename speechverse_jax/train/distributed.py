"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize(...)` once, before anything touches a JAX device. Three cases:

- explicit: a coordinator address is given (flag `--coordinator` or `SVJ_COORDINATOR`), with the
  process count and this process's id (`--num_processes` / `SVJ_NUM_PROCESSES`, `--process_id` /
  `SVJ_PROCESS_ID`). Any cluster: GPU nodes, CPU hosts, or several processes on one machine.
- auto (the default, `SVJ_DISTRIBUTED=auto`): a multi-worker TPU VM slice, a SLURM job or an Open
  MPI launch is detected from its environment and JAX finds the coordinator itself.
- off (`SVJ_DISTRIBUTED=off`): a single process, nothing to do.

After it, every process sees all devices (`jax.devices()`) and its own (`jax.local_devices()`).
Each process loads only its rows of the global batch (the data pipeline shards by
`jax.process_index()`), logs and writes metrics on process 0 only; orbax saves and restores with
all processes taking part, so the run folder must be one shared location (gs://, NFS).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

log = logging.getLogger(__name__)

MODES = ("auto", "off", "explicit")


def _detected_cluster(env: Dict[str, str]) -> Optional[str]:
    """The name of a multi-process environment JAX can initialise from without arguments."""
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def plan(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None, mode: Optional[str] = None,
         env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """What `initialize` will do, without doing it: `{"mode": ..., ...arguments}`.

    Flags win over the environment. Raises ValueError on an incomplete or inconsistent request.
    """
    env = dict(os.environ if env is None else env)
    coordinator = coordinator or env.get("SVJ_COORDINATOR") or None
    if num_processes is None and env.get("SVJ_NUM_PROCESSES"):
        num_processes = int(env["SVJ_NUM_PROCESSES"])
    if process_id is None and env.get("SVJ_PROCESS_ID"):
        process_id = int(env["SVJ_PROCESS_ID"])
    mode = (mode or env.get("SVJ_DISTRIBUTED") or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"SVJ_DISTRIBUTED / mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return {"mode": "off"}
    if coordinator or mode == "explicit":
        missing = [name for name, v in (("--coordinator", coordinator), ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start needs {', '.join(missing)} (or SVJ_COORDINATOR, "
                             "SVJ_NUM_PROCESSES, SVJ_PROCESS_ID)")
        if ":" not in str(coordinator):
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        return {"mode": "explicit", "coordinator_address": str(coordinator), "num_processes": int(num_processes),
                "process_id": int(process_id)}
    cluster = _detected_cluster(env)
    return {"mode": "auto", "cluster": cluster} if cluster else {"mode": "single"}


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, mode: Optional[str] = None) -> Dict[str, object]:
    """Start the JAX distributed runtime when this is a multi-process run; returns `plan(...)`."""
    import jax

    p = plan(coordinator, num_processes, process_id, mode)
    if p["mode"] == "explicit":
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
            # Cross-process collectives between CPU devices need an implementation (gloo).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=p["coordinator_address"],
                                   num_processes=p["num_processes"], process_id=p["process_id"])
    elif p["mode"] == "auto":
        jax.distributed.initialize()
    if p["mode"] in ("explicit", "auto"):
        log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return p


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (checked without initialising a backend)."""
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"))
