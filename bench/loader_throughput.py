"""Data loader throughput: examples/s and audio seconds/s, in total and per CPU core.

    python bench/loader_throughput.py                       # generated manifest, default settings
    python bench/loader_throughput.py --workers 2 --threads 2 --batches 40
    python bench/loader_throughput.py --train-step full    # also time the demo model's train step

Per core = work done / CPU seconds spent (this process plus its worker processes), so it does not
depend on how many cores the machine lends. To set it next to the train step, call
`measure_loader(config.data, num_batches)` and compare `audio_seconds_per_s` with the train
loop's `audio_seconds_per_s` metric: the loader keeps up when its number is the larger one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np


def make_manifest(out_dir: str, examples: int = 256, seed: int = 0, min_seconds: float = 1.0,
                  max_seconds: float = 15.0) -> Dict[str, str]:
    """Random-noise clips (16/22.05/44.1/48 kHz, mono and stereo, wav and flac) over four tasks,
    a manifest and a T5-style tokenizer folder. Returns {'manifest', 'tokenizer'}."""
    import soundfile as sf
    import transformers

    from speechverse_jax import hf_tiny
    from speechverse_jax.data import tasks as T

    rng = np.random.default_rng(seed)
    words = "turn on the radio now what is the time in paris set an alarm for seven play some jazz".split()
    rows, texts = [], []
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    for i in range(examples):
        sr = (16000, 22050, 44100, 48000)[i % 4]
        seconds = float(rng.uniform(min_seconds, max_seconds))
        path = os.path.join(out_dir, "audio", f"{i:05d}.{'flac' if i % 2 else 'wav'}")
        audio = (rng.standard_normal((int(seconds * sr), 1 + i % 2)) * 0.1).astype(np.float32)
        sf.write(path, audio, sr)
        text = " ".join(rng.choice(words, size=int(rng.integers(4, 20))))
        texts.append(text)
        task = ("asr", "asr", "er", "kws")[i % 4]
        row = {"audio": os.path.relpath(path, out_dir), "task": task, "id": f"b{i}", "transcript": text,
               "target": {"asr": text, "er": "neutral", "kws": "yes"}[task], "duration": round(seconds, 4)}
        if task == "kws":
            row["keyword"] = text.split()[0]
        rows.append(row)
    manifest = os.path.join(out_dir, "bench.jsonl")
    with open(manifest, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    tok = os.path.join(out_dir, "tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer_config.json")):
        prompts = [p for t in T.TASKS.values() for p in t.prompts]
        hf_tiny.train_spiece(texts + prompts, tok, vocab_size=256)
        transformers.T5Tokenizer.from_pretrained(tok, extra_ids=0, legacy=False).save_pretrained(tok)
    return {"manifest": manifest, "tokenizer": tok}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished worker processes
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_loader(data_config, num_batches: int = 30, warmup: int = 2, tokenizer: Any = None,
                   shard_index: Optional[int] = None, shard_count: Optional[int] = None) -> Dict[str, float]:
    """Time `num_batches` train batches after `warmup`; returns throughput numbers (a flat dict)."""
    from speechverse_jax.data.loader import ManifestData

    t_build = time.perf_counter()
    data = ManifestData(data_config, tokenizer, shard_index=shard_index, shard_count=shard_count)
    build_s = time.perf_counter() - t_build
    it = data.train_iterator()
    for _ in range(warmup):
        next(it)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    examples, audio_s, padded_s = 0, 0.0, 0.0
    sr = float(data_config.sample_rate)
    for _ in range(num_batches):
        b = next(it)
        valid = b["example_mask"]
        examples += int(valid.sum())
        audio_s += float(b["audio_mask"][valid].sum()) / sr
        padded_s += float(b["audio"].shape[0] * b["audio"].shape[1]) / sr
    wall = time.perf_counter() - t0
    it.close()  # workers exit, so their CPU time is counted
    cpu = max(_cpu_seconds() - cpu0, 1e-9)
    return {
        "batches": num_batches, "examples": examples, "wall_seconds": wall, "cpu_seconds": cpu,
        "examples_per_s": examples / wall, "audio_seconds_per_s": audio_s / wall,
        "examples_per_cpu_s": examples / cpu, "audio_seconds_per_cpu_s": audio_s / cpu,
        "padding_fraction": 1.0 - audio_s / max(padded_s, 1e-9), "manifest_build_seconds": build_s,
        "worker_count": int(data_config.worker_count), "read_threads": int(data_config.read_threads),
    }


def train_step_consumption(profile: str = "full", batch_size: int = 16, seconds: float = 4.0,
                           steps: int = 5) -> Dict[str, float]:
    """Audio seconds per wall second that the demo model's stage-2 train step consumes on this
    machine (from raw audio: WavLM forward + adaptor + T5 with LoRA, forward and backward)."""
    import flax.linen as nn
    import jax

    from speechverse_jax.models import config as model_cfg_lib
    from speechverse_jax.data.synthetic import random_batch
    from speechverse_jax.demo.run import demo_config
    from speechverse_jax.models.speechverse import SpeechVerse, init_params
    from speechverse_jax.models.t5 import T5Config
    from speechverse_jax.models.wavlm import WavLMConfig
    from speechverse_jax.train import optimizer as opt_lib
    from speechverse_jax.train.step import init_state, make_train_step

    from speechverse_jax import configs

    demo = demo_config(profile)
    recipe = configs.load("demo_backbones", profile)  # the shipped backbones' architectures
    vocab = 704 if profile == "full" else 256
    model_cfg = model_cfg_lib.build_model_config(
        demo.stage2_multitask.model, WavLMConfig.from_hf(recipe.wavlm.model.to_dict()),
        T5Config.from_hf(dict(recipe.t5.model.to_dict(), vocab_size=vocab)))
    params = nn.unbox(init_params(model_cfg, jax.random.PRNGKey(0)))
    labels = opt_lib.label_params(params, [tuple(r) for r in demo.stage2_multitask.train.param_rules])
    trainable, frozen = opt_lib.split(params, labels)
    tx, schedule = opt_lib.make_optimizer(demo.stage2_multitask.optim, int(demo.stage2_multitask.train.max_steps))
    state = init_state(trainable, tx, 0)
    step = jax.jit(make_train_step(SpeechVerse(model_cfg), tx, schedule), donate_argnums=(0,))
    batch = random_batch(0, batch_size, int(seconds * 16000), 64, 32, vocab, min_fraction=1.0)
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    step_s = (time.perf_counter() - t0) / steps
    return {"train_step_seconds": step_s, "train_step_compile_seconds": compile_s,
            "train_step_audio_seconds_per_s": batch_size * seconds / step_s,
            "train_step_batch": batch_size, "train_step_clip_seconds": seconds}


def main(argv=None) -> Dict[str, float]:
    from speechverse_jax.data.config import default_data_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=15.0)
    ap.add_argument("--dir", default="", help="where to write the generated clips (default: a temp folder)")
    ap.add_argument("--train-step", default="", choices=("", "full", "quick"),
                    help="also time the demo model's train step (from raw audio) in the same run")
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="loader_bench_")
    made = make_manifest(work, args.examples, max_seconds=args.max_seconds)
    cfg = default_data_config()
    cfg.train_manifests = made["manifest"]
    cfg.tokenizer = made["tokenizer"]
    cfg.batch_size = args.batch_size
    cfg.worker_count, cfg.read_threads = args.workers, args.threads
    cfg.shard_index, cfg.shard_count = 0, 1
    result = measure_loader(cfg, args.batches)
    result["cores_available"] = len(os.sched_getaffinity(0))
    if args.train_step:
        result.update(train_step_consumption(args.train_step, batch_size=args.batch_size))
        result["loader_over_train_step"] = result["audio_seconds_per_s"] / result["train_step_audio_seconds_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return result


if __name__ == "__main__":
    main()
