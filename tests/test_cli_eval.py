"""`speechverse-jax eval` and `infer` on a (briefly) trained run: reports, constraints, joint decoding."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.cli import main
from speechverse_jax.data.manifest import write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        path = root / f"{i}.wav"
        sf.write(str(path), (rng.standard_normal(int(rng.uniform(0.3, 0.9) * 16000)) * 0.1).astype(np.float32), 16000)
        text = TEXTS[i % 4]
        task = ("asr", "kws", "sc")[i % 3]
        target = {"asr": text, "kws": ("yes", "no")[i % 2], "sc": ("one", "two")[i % 2]}[task]
        row = {"audio": path.name, "task": task, "target": target, "id": f"e{i}", "transcript": text}
        if task == "kws":
            row["keyword"] = text.split()[0]
        rows.append(row)
    write_manifest(str(root / "m.jsonl"), rows)
    run = str(root / "run")
    argv = ["train", "--config", os.path.join(REPO, "configs", "stage2_multitask.py"), "--workdir", run,
            f"--config.base_checkpoint={tiny_base}", f"--config.data.train_manifests={root / 'm.jsonl'}"]
    argv += [f"--config.{k}" for k in (
        "train.max_steps=2", "train.log_every=1", "train.tensorboard=False", "data.batch_size=4",
        "data.audio_buckets_seconds=(1.0,)", "data.max_audio_seconds=1.0", "data.instruction_buckets=(64,128,256)",
        "data.target_buckets=(32,)", "data.max_target_tokens=32", "model.dtype=float32",
        "model.frozen_param_dtype=float32", "model.lora.rank=4")]
    assert main(argv) == 0
    return {"run": run, "manifest": str(root / "m.jsonl"), "root": root}


def test_eval_writes_predictions_and_a_table_per_setting(trained, tmp_path):
    out = str(tmp_path / "eval")
    assert main(["eval", "--checkpoint", trained["run"], "--manifest", trained["manifest"], "--out", out,
                 "--split", "both", "--constrained", "both", "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    preds = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
    metrics = json.load(open(os.path.join(out, "metrics.json")))["metrics"]
    # asr: free only (no label set); kws and sc: free + constrained; 2 instruction splits each
    assert set(metrics) == {"asr", "kws", "sc"}
    assert set(metrics["asr"]) == {"seen/free", "unseen/free"}
    assert set(metrics["kws"]) == {"seen/free", "unseen/free", "seen/constrained", "unseen/constrained"}
    assert len(preds) == 4 * 2 + 4 * 4 + 4 * 4
    for p in preds:
        if p["setting"].endswith("constrained") and p["task"] == "sc":
            assert p["hypothesis"] in ("one", "two"), p
        if p["setting"].endswith("constrained") and p["task"] == "kws":
            assert p["hypothesis"] in ("yes", "no"), p
    assert metrics["sc"]["seen/constrained"]["malformed_rate"] == 0.0
    seen = {p["instruction"] for p in preds if p["split"] == "seen"}
    unseen = {p["instruction"] for p in preds if p["split"] == "unseen"}
    assert seen.isdisjoint(unseen)
    assert "| sc | uar |" in open(os.path.join(out, "metrics.md")).read()


def test_eval_joint_decoding_scores_both_parts(trained, tmp_path):
    out = str(tmp_path / "joint")
    assert main(["eval", "--checkpoint", trained["run"], "--manifest", trained["manifest"], "--out", out,
                 "--joint", "--tasks", "kws", "--max-new-tokens", "12", "--batch-size", "4"]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))["metrics"]["kws"]["seen/free/joint"]
    assert "asr_wer" in metrics and "accuracy" in metrics
    preds = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
    assert all(p["reference"].startswith("ASR:") for p in preds)


def test_infer_with_labels_prints_json(trained, capsys):
    audio = str(trained["root"] / "0.wav")
    assert main(["infer", "--checkpoint", trained["run"], "--audio", audio, audio, "--instruction",
                 "How many speakers are there?", "--labels", "one,two", "--json", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(lines) == 2 and all(l["answer"] in ("one", "two") for l in lines)
    assert lines[0]["answer"] == lines[1]["answer"]  # same clip, same answer
