"""`speechverse-jax curriculum` / `train` end to end on real manifests and the tiny converted base."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.cli import main
from speechverse_jax.data.manifest import write_manifest
from speechverse_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = root / f"{i}.wav"
        sf.write(str(path), (rng.standard_normal(int(rng.uniform(0.3, 0.9) * 16000)) * 0.1).astype(np.float32), 16000)
        rows.append({"audio": path.name, "task": "asr", "target": TEXTS[i % 4], "id": f"u{i}"})
    write_manifest(str(root / "train.jsonl"), rows)
    return str(root / "train.jsonl")


def _common(prefix, steps):
    return [f"--config.{prefix}{k}" for k in (
        f"train.max_steps={steps}", "train.eval_every=2", "train.log_every=1", "train.checkpoint_every=2",
        "train.tensorboard=False", "data.batch_size=4", "data.audio_buckets_seconds=(1.0,)",
        "data.max_audio_seconds=1.0", "data.instruction_buckets=(64,128,256)", "data.target_buckets=(32,)",
        "data.max_target_tokens=32", "model.dtype=float32", "model.frozen_param_dtype=float32",
        "optim.warmup_steps=1", "optim.lr=0.01", "model.lora.rank=4")]


def test_curriculum_cli_runs_three_stages_each_from_the_previous(tiny_base, manifest, tmp_path):
    workdir = str(tmp_path / "run")
    argv = ["curriculum", "--config", os.path.join(REPO, "configs", "curriculum.py"), "--workdir", workdir,
            f"--config.base_checkpoint={tiny_base}", f"--config.data.train_manifests={manifest}",
            f"--config.data.eval_manifests={manifest}"]
    for stage in ("stage1", "stage2_warmup", "stage2_multitask"):
        argv += _common(f"{stage}.", 2)
    argv.append("--config.stage1.model.lora.rank=0")
    assert main(argv) == 0
    for stage in ("stage1", "stage2_warmup", "stage2_multitask"):
        done = json.load(open(os.path.join(workdir, stage, "DONE.json")))
        assert done["steps"] == 2 and np.isfinite(done["best_val_loss"])
        config = json.load(open(os.path.join(workdir, stage, "config.json")))
        assert config["base_checkpoint"] == tiny_base
        rows = [json.loads(l) for l in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        train_rows = [r for r in rows if r["kind"] == "train"]
        assert len(train_rows) == 2 and all(np.isfinite(r["loss"]) and "loss/asr" in r for r in train_rows)
        assert any(r["kind"] == "eval" for r in rows)
        step, meta = ckpt_lib.read_meta(os.path.join(workdir, stage, "checkpoints"))
        assert step == 2 and meta["config"]["stage"] == stage
    s2 = json.load(open(os.path.join(workdir, "stage2_warmup", "config.json")))
    assert s2["train"]["init_from"] == os.path.join(workdir, "stage1")
    # A second run finds every stage finished and does nothing.
    assert main(argv) == 0


def test_train_cli_reports_bad_config_values(tiny_base, manifest, tmp_path, capsys):
    argv = ["train", "--config", os.path.join(REPO, "configs", "stage1.py"), "--workdir", str(tmp_path / "w"),
            f"--config.base_checkpoint={tiny_base}", f"--config.data.train_manifests={manifest}"] + _common("", 2)
    assert main(argv + ["--config.train.accum_steps=3"]) == 2  # one line on stderr, no traceback
    assert "accum_steps" in capsys.readouterr().err
    assert main(argv + ["--config.model.layer_combination=mean"]) == 2
    assert "layer_combination" in capsys.readouterr().err



@pytest.mark.parametrize("readers", ["threads", "workers"])
def test_train_cli_with_the_default_data_config(tiny_base, manifest, tmp_path, readers):
    """The documented command with the data section as shipped: grain reader threads on (the
    tokenizer was once first loaded inside them and failed), and grain worker processes on."""
    from speechverse_jax import configs

    assert configs.load("stage2_multitask").data.read_threads > 0  # the default this test is about
    workdir = str(tmp_path / "w")
    argv = ["train", "--config", "stage2_multitask", "--workdir", workdir, f"--config.base_checkpoint={tiny_base}",
            f"--config.data.train_manifests={manifest}", f"--config.data.eval_manifests={manifest}",
            "--config.train.max_steps=2", "--config.train.eval_every=2", "--config.train.log_every=1",
            "--config.train.tensorboard=False", "--config.data.batch_size=4", "--config.model.lora.rank=4",
            "--config.model.dtype=float32", "--config.model.frozen_param_dtype=float32"]
    if readers == "workers":
        argv.append("--config.data.worker_count=1")
    assert main(argv) == 0
    done = json.load(open(os.path.join(workdir, "DONE.json")))
    assert done["steps"] == 2 and np.isfinite(done["best_val_loss"])
    assert not done["data"].get("skipped/unreadable_audio")
