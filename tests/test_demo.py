"""The demo's quick profile end to end (the CI smoke test): every stage ran, every task has a metric.

A pipeline check, not a quality bar: the quick profile trains for a few steps only.
"""

import json
import os

from speechverse_jax.data import tasks
from speechverse_jax.demo.run import run_demo


def test_quick_demo_runs_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out_dir=out, profile="quick", progress=False)
    for name in ("summary.json", "loss_curves.png", "task_metrics.png", "eval/metrics.md", "eval/predictions.jsonl",
                 "backbones/base/model_config.json", "backbones/hf/wavlm/model.safetensors",
                 "backbones/hf/t5/spiece.model"):
        assert os.path.exists(os.path.join(out, name)), name
    assert summary["backbones"]["max_rel_diff_vs_hf"] <= 1e-4
    assert 0.0 <= summary["wavlm_pretraining"]["extra"]["dev_cer"]  # greedy CTC on held-out clips
    t5 = summary["t5_pretraining"]
    assert len(t5["text_tasks"]) == len(t5["extra"]["phase_losses"]) == 2  # copying, then the task mix
    assert set(t5["text_tasks"][0]) == {"copy", "copy_random", "copy_stretched"}
    assert set(summary["stages"]) == {"stage1", "stage2_warmup", "stage2_multitask"}
    for stage in summary["stages"].values():
        assert stage["steps"] > 0 and stage["skipped_steps"] == 0
    metrics = summary["metrics"]
    assert set(metrics) == {"asr", "ic", "sf", "kws", "kwe", "ac", "sc", "sns", "open"}
    for task, settings in metrics.items():
        metric = tasks.get_task(task).metric
        assert metric in settings["seen/free"], (task, settings)
        if tasks.get_task(task).labels or task in ("ic", "ac"):
            assert "seen/constrained" in settings, task
    assert "seen/free/joint" in metrics["ic"]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["infer_example"]["command"].startswith("speechverse-jax infer")
