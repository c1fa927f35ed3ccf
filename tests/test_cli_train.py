"""`speechverse-jax curriculum` / `train` end to end on real manifests and the tiny converted base."""

import json
import os

import numpy as np
import pytest

from conftest import ASR_STEPS, FLOAT32, REPO, check_stages_done, curriculum_argv, stage_flags
from speechverse_jax.cli import main
from speechverse_jax.train import checkpoint as ckpt_lib


@pytest.mark.slow
def test_curriculum_cli_runs_three_stages_each_from_the_previous(tiny_base, asr_manifest, tmp_path):
    workdir = str(tmp_path / "run")
    # (stage1 and stage2_warmup as test_faults runs them: the same compiled steps)
    argv = curriculum_argv(tiny_base, asr_manifest, workdir, steps=ASR_STEPS, extra=FLOAT32)
    assert main(argv) == 0
    check_stages_done(workdir, steps=ASR_STEPS)
    for stage in ("stage1", "stage2_warmup", "stage2_multitask"):
        config = json.load(open(os.path.join(workdir, stage, "config.json")))
        assert config["base_checkpoint"] == tiny_base
        rows = [json.loads(l) for l in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        train_rows = [r for r in rows if r["kind"] == "train"]
        assert len(train_rows) == ASR_STEPS and all(np.isfinite(r["loss"]) and "loss/asr" in r for r in train_rows)
        assert any(r["kind"] == "eval" for r in rows)
        step, meta = ckpt_lib.read_meta(os.path.join(workdir, stage, "checkpoints"))
        assert step == ASR_STEPS and meta["config"]["stage"] == stage
    s2 = json.load(open(os.path.join(workdir, "stage2_warmup", "config.json")))
    assert s2["train"]["init_from"] == os.path.join(workdir, "stage1")
    # A second run finds every stage finished and does nothing.
    assert main(argv) == 0


def test_train_cli_reports_bad_config_values(tiny_base, asr_manifest, tmp_path, capsys):
    argv = ["train", "--config", os.path.join(REPO, "configs", "stage1.py"), "--workdir", str(tmp_path / "w"),
            f"--config.base_checkpoint={tiny_base}", f"--config.data.train_manifests={asr_manifest}",
            *stage_flags(extra=FLOAT32)]
    assert main(argv + ["--config.train.accum_steps=3"]) == 2  # one line on stderr, no traceback
    assert "accum_steps" in capsys.readouterr().err
    assert main(argv + ["--config.model.layer_combination=mean"]) == 2
    assert "layer_combination" in capsys.readouterr().err



@pytest.mark.slow
@pytest.mark.parametrize("readers", ["threads", "workers"])
def test_train_cli_with_the_default_data_config(tiny_base, asr_manifest, tmp_path, readers):
    """The documented command with the data section as shipped: grain reader threads on (the
    tokenizer was once first loaded inside them and failed), and grain worker processes on."""
    from speechverse_jax import configs

    assert configs.load("stage2_multitask").data.read_threads > 0  # the default this test is about
    workdir = str(tmp_path / "w")
    argv = ["train", "--config", "stage2_multitask", "--workdir", workdir, f"--config.base_checkpoint={tiny_base}",
            f"--config.data.train_manifests={asr_manifest}", f"--config.data.eval_manifests={asr_manifest}",
            "--config.train.max_steps=2", "--config.train.eval_every=2", "--config.train.log_every=1",
            "--config.train.tensorboard=False", "--config.data.batch_size=4", "--config.model.lora.rank=4",
            "--config.model.dtype=float32", "--config.model.frozen_param_dtype=float32"]
    if readers == "workers":
        argv.append("--config.data.worker_count=1")
    assert main(argv) == 0
    done = json.load(open(os.path.join(workdir, "DONE.json")))
    assert done["steps"] == 2 and np.isfinite(done["best_val_loss"])
    assert not done["data"].get("skipped/unreadable_audio")
