"""Full-size (or near-full-size) SpeechVerse train step on one GPU, bf16: step time, MFU, peak memory.

    python bench/gpu_step.py --steps 5 --batch 8 --audio-seconds 15      # WavLM-Large + Flan-T5-XL
    python bench/gpu_step.py --t5 flan-t5-small --wavlm wavlm-base-plus --batch 2 --audio-seconds 2  # CPU smoke

Random weights (bf16 frozen WavLM / T5, float32 LoRA + downsampler, the stage2_multitask rules),
`model.scan_layers` and `model.remat` as in the paper presets. Times `--steps` steps after one
warm-up step (compile reported apart). MFU = analytic model FLOPs (train/flops.py) / step time /
the device's dense bf16 peak (`flops.PEAK_FLOPS`). Peak memory from `device.memory_stats()`.
Prints and writes one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wavlm", default="wavlm-large")
    ap.add_argument("--t5", default="flan-t5-xl")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--audio-seconds", type=float, default=15.0)
    ap.add_argument("--instruction-len", type=int, default=64)
    ap.add_argument("--target-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_step.json"))
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from speechverse_jax.configs import common as config_common
    from speechverse_jax.models import config as model_cfg_lib
    from speechverse_jax.models.speechverse import init_params_subset
    from speechverse_jax.train import flops as flops_lib
    from speechverse_jax.train import optimizer as opt_lib
    from speechverse_jax.models.speechverse import SpeechVerse
    from speechverse_jax.train.step import init_state, make_train_step

    config = config_common.paper_stage_config("stage2_multitask", "wlm")
    config.model.wavlm_preset, config.model.t5_preset = a.wavlm, a.t5
    config.model.scan_layers = not a.no_scan
    config.model.remat = a.remat
    cfg = model_cfg_lib.build_model_config(config.model)
    model = SpeechVerse(cfg)
    params = traverse_util.flatten_dict(init_params_subset(cfg, jax.random.PRNGKey(0), keep=lambda p: True), sep="/")
    labels = opt_lib.label_params(traverse_util.unflatten_dict(params, sep="/"),
                                  [tuple(r) for r in config.train.param_rules])
    pick = lambda which: traverse_util.unflatten_dict({k: v for k, v in params.items() if labels[k] == which}, sep="/")  # noqa: E731
    frozen, trainable = pick(opt_lib.FREEZE), pick(opt_lib.TRAIN)
    tx, schedule = opt_lib.make_optimizer(config.optim, int(config.train.max_steps))
    state = init_state(trainable, tx, 0)
    b, n = a.batch, int(a.audio_seconds * 16000)
    rng = np.random.default_rng(0)
    batch = {
        "audio": jnp.asarray(rng.standard_normal((b, n)), jnp.float32), "audio_mask": jnp.ones((b, n), bool),
        "instruction_ids": jnp.asarray(rng.integers(2, 1000, (b, a.instruction_len)), jnp.int32),
        "instruction_mask": jnp.ones((b, a.instruction_len), bool),
        "target_ids": jnp.asarray(rng.integers(2, 1000, (b, a.target_len)), jnp.int32),
        "target_mask": jnp.ones((b, a.target_len), bool),
    }
    step = jax.jit(make_train_step(model, tx, schedule), donate_argnums=(0,))
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    model_flops = flops_lib.train_step_flops(cfg, b, n, a.instruction_len, a.target_len)["total"]
    peak = flops_lib.PEAK_FLOPS.get(dev.device_kind) or next(
        (v for k, v in flops_lib.PEAK_FLOPS.items() if k in dev.device_kind), None)
    step_s = float(np.median(times))
    stats = dev.memory_stats() or {}
    out = {
        "device": dev.device_kind, "platform": dev.platform, "wavlm": a.wavlm, "t5": a.t5, "batch": b,
        "audio_seconds": a.audio_seconds, "instruction_len": a.instruction_len, "target_len": a.target_len,
        "scan_layers": not a.no_scan, "remat": a.remat, "first_step_seconds": first, "step_seconds": times,
        "median_step_seconds": step_s, "model_flops": model_flops,
        "mfu_bf16": model_flops / step_s / peak if peak else None, "peak_flops": peak,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "loss": float(m["loss"]),
    }
    print(json.dumps(out, indent=2))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
