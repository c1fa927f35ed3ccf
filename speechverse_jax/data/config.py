"""The `config.data` section: its defaults (the one place they live) and its checks.

Sizes are in seconds, tokens or examples:
    train_manifests / eval_manifests   comma-separated paths (a list works too in Python)
    tokenizer            folder with spiece.model / tokenizer.json (T5 tokenizer)
    batch_size           global batch size (all processes together)
    seed, shuffle        order; shuffle=False walks the tasks in name order, each in manifest order
    mix_weights          'asr=0.5,ic=0.2' (or a {task: weight} dict): each task's share of the stream
                         ('' = by data size; tasks left out are counted as task_not_in_mix)
    epoch_examples       stream positions per epoch (0 = number of usable examples)
    num_epochs           0 = endless
    sample_rate          16000
    audio_buckets_seconds, instruction_buckets, target_buckets   the padded lengths
    max_audio_seconds    longer audio is dropped (or chunked); must fit the largest audio bucket
    max_target_tokens    longer targets are dropped (paper: 600); must fit the largest target bucket
    long_audio, chunk_tasks   'drop' | 'chunk' (windows of <= max_audio_seconds, for chunk_tasks)
    bucket_window        batches per duration-sorted window (1 = no sorting)
    prompt_split, eval_prompt_split   'seen' | 'unseen'
    with_labels          list label sets in classification / slot prompts
    descriptions_share   share of those prompts that also describe each label
    label_overrides      {task: [labels] or {label: description}}
    joint_tasks, joint_share   share of examples of joint_tasks (with a `transcript` field)
                         turned into joint-decoding examples (ASR first, then the task)
    strict, max_logged_errors   bad input raises / how many offenders are logged
    probe_durations, check_files   read missing durations from file headers / stat local files
    worker_count, worker_buffer   grain worker processes (0 = in process) and their buffers
    read_threads, prefetch        threads loading batches, and batches read ahead
    shard_index, shard_count      -1 = jax.process_index() / jax.process_count()
"""

from __future__ import annotations

from typing import Dict

import ml_collections

from speechverse_jax.data import tasks as tasks_lib


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` section (see the module docstring for each field)."""
    return ml_collections.ConfigDict(dict(
        train_manifests="",  # comma-separated (a string, so the command line can override it)
        eval_manifests="",
        tokenizer="",
        batch_size=32,
        seed=0,
        shuffle=True,
        mix_weights="",  # 'asr=0.5,ic=0.2' ('' = by data size)
        epoch_examples=0,
        num_epochs=0,
        sample_rate=16000,
        audio_buckets_seconds=(2.0, 4.0, 8.0, 15.0, 30.0),
        instruction_buckets=(64, 256, 512),
        target_buckets=(32, 128, 600),
        max_audio_seconds=30.0,
        max_target_tokens=600,
        long_audio="drop",
        chunk_tasks=("sns", "ac"),
        bucket_window=16,
        prompt_split="seen",
        eval_prompt_split="seen",
        with_labels=True,
        descriptions_share=0.0,
        label_overrides={},
        joint_tasks=tasks_lib.JOINT_TASKS_DEFAULT,
        joint_share=0.0,
        strict=False,
        max_logged_errors=10,
        probe_durations=True,
        check_files=True,
        worker_count=0,
        worker_buffer=2,
        read_threads=2,
        prefetch=4,
        shard_index=-1,
        shard_count=-1,
    ))


def mix_weights(cfg) -> Dict[str, float]:
    """`mix_weights` as {task: weight}; also accepts the string form 'asr=0.5,ic=0.2' (CLI)."""
    raw = cfg.mix_weights or {}
    if isinstance(raw, str):
        pairs = [p.split("=", 1) if "=" in p else p.split(":", 1) for p in raw.split(",") if p.strip()]
        raw = {k: v for k, v in pairs}
    return {str(k).strip().lower(): float(v) for k, v in plain(raw).items()}


def plain(value):
    """ConfigDict / FrozenConfigDict values -> plain dicts and tuples."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def validate_config(cfg) -> None:
    """Raise ValueError for settings that cannot work together."""
    sr = int(cfg.sample_rate)
    if int(cfg.batch_size) <= 0:
        raise ValueError(f"data.batch_size must be > 0, got {cfg.batch_size}")
    if float(cfg.max_audio_seconds) * sr > max(cfg.audio_buckets_seconds) * sr + 1e-6:
        raise ValueError(f"data.max_audio_seconds={cfg.max_audio_seconds} does not fit the largest audio bucket "
                         f"({max(cfg.audio_buckets_seconds)}s)")
    if int(cfg.max_target_tokens) > max(cfg.target_buckets):
        raise ValueError(f"data.max_target_tokens={cfg.max_target_tokens} is larger than the largest target "
                         f"bucket ({max(cfg.target_buckets)})")
    for split in (cfg.prompt_split, cfg.eval_prompt_split):
        if split not in ("seen", "unseen"):
            raise ValueError(f"prompt split must be 'seen' or 'unseen', got {split!r}")
