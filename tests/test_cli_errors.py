"""Every sub-command answers a user error with one line and a non-zero exit, never a traceback.

User errors: bad flags, missing or wrong folders and files, bad config values, a checkpoint of
another architecture, manifests changed under a run. Programming errors keep their tracebacks.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.cli import main
from speechverse_jax.data.manifest import write_manifest
from speechverse_jax.errors import one_line, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]
TRAIN_FLAGS = [f"--config.{k}" for k in (
    "train.log_every=1", "train.checkpoint_every=1", "train.tensorboard=False", "data.batch_size=4",
    "data.audio_buckets_seconds=(1.0,)", "data.max_audio_seconds=1.0", "data.instruction_buckets=(64,128,256)",
    "data.target_buckets=(32,)", "data.max_target_tokens=32", "model.dtype=float32",
    "model.frozen_param_dtype=float32", "model.lora.rank=4")]


def _user_error(capsys, argv, code=2, contains=""):
    """Run the CLI in-process: non-zero exit, exactly one `error:` line, no traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse / usage errors
        rc = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    assert rc == code, (argv, rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error:") or ": error: " in l]
    assert len(lines) == 1, err[-2000:]
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    rng = np.random.default_rng(2)
    rows = []
    for i in range(8):
        sf.write(str(root / f"{i}.wav"), (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
        rows.append({"audio": f"{i}.wav", "task": "asr", "target": TEXTS[i % 4], "id": f"c{i}"})
    write_manifest(str(root / "m.jsonl"), rows)
    workdir = str(root / "run")
    argv = ["train", "--config", os.path.join(REPO, "configs", "stage2_multitask.py"), "--workdir", workdir,
            f"--config.base_checkpoint={tiny_base}", f"--config.data.train_manifests={root / 'm.jsonl'}"] + TRAIN_FLAGS
    assert main(argv + ["--config.train.max_steps=2"]) == 0
    (root / "afile").write_text("not a folder")
    return {"root": root, "workdir": workdir, "argv": argv, "manifest": str(root / "m.jsonl"), "base": tiny_base}


def test_convert_prepare_demo_user_errors(run, capsys):
    afile, missing = str(run["root"] / "afile"), str(run["root"] / "missing")
    _user_error(capsys, ["convert", "--wavlm", missing, "--t5", missing, "--out", str(run["root"] / "c")],
                contains=f"{missing}: no config.json")
    _user_error(capsys, ["convert", "--wavlm", afile, "--t5", afile, "--out", str(run["root"] / "c")],
                contains="no config.json")
    _user_error(capsys, ["convert", "--wavlm", missing], contains="required")  # bad flags
    _user_error(capsys, ["prepare", "nosuch", missing, str(run["root"] / "p")], contains="unknown dataset 'nosuch'")
    _user_error(capsys, ["prepare", "librispeech", missing, str(run["root"] / "p")], contains=missing)
    _user_error(capsys, ["prepare", "librispeech", missing, str(run["root"] / "p"), "--option", "x"],
                contains="KEY=VALUE")
    _user_error(capsys, ["demo", "--profile", "huge"], contains="must be one of")
    _user_error(capsys, ["demo", "--out", afile, "--profile", "convert-only"], contains=f"{afile}: File exists")
    _user_error(capsys, ["demo", "--profile", "quick", "--out", str(run["root"] / "d"), "--config.backbones.dir",
                         missing], contains=f"{missing}/MANIFEST.json: missing")
    _user_error(capsys, ["demo-backbones", "--profile", "huge"], contains="must be one of")
    _user_error(capsys, ["nosuch"], contains="unknown command")


def test_train_and_curriculum_user_errors(run, capsys):
    base = ["train", "--config", os.path.join(REPO, "configs", "stage1.py"), "--workdir", str(run["root"] / "t"),
            f"--config.base_checkpoint={run['base']}", f"--config.data.train_manifests={run['manifest']}"] + TRAIN_FLAGS
    _user_error(capsys, base + ["--config.train.nosuch=1"], contains="unknown config field")
    _user_error(capsys, base + ["--config.train.max_steps=many"], contains="max_steps")
    _user_error(capsys, base + ["--nosuch=1"], contains="nosuch")
    _user_error(capsys, ["train", "--config", str(run["root"] / "none.py"), "--workdir", "w"], contains="none.py")
    _user_error(capsys, base + ["--config.train.accum_steps=3"], contains="accum_steps")
    _user_error(capsys, base + ["--config.model.layer_combination=mean"], contains="layer_combination")
    _user_error(capsys, base + [f"--config.data.train_manifests={run['root'] / 'none.jsonl'}"], contains="none.jsonl")
    _user_error(capsys, base[:4] + [str(run["root"] / "afile")] + base[5:], contains="afile")
    _user_error(capsys, ["curriculum", "--config", os.path.join(REPO, "configs", "curriculum.py"), "--workdir",
                         str(run["root"] / "cur"), f"--config.base_checkpoint={run['root'] / 'nobase'}"],
                contains="nobase")


def test_resume_with_another_architecture_or_changed_manifest_is_refused(run, capsys, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(run["workdir"], workdir)
    argv = [workdir if a == run["workdir"] else a for a in run["argv"]] + ["--config.train.max_steps=3"]
    _user_error(capsys, argv + ["--config.model.lora.rank=8"], contains="another architecture")
    manifest = str(tmp_path / "m.jsonl")
    lines = open(run["manifest"]).read().splitlines()
    with open(manifest, "w") as f:  # the run's own manifest, copied: same contents, then changed
        f.write("\n".join(json.dumps({**json.loads(l), "audio": str(run["root"] / json.loads(l)["audio"])})
                          for l in lines) + "\n")
    argv = [f"--config.data.train_manifests={manifest}" if a.startswith("--config.data.train_manifests") else a
            for a in argv]
    shutil.rmtree(workdir)
    assert main(argv[:-1] + ["--config.train.max_steps=2"]) == 0
    with open(manifest, "a") as f:
        f.write(json.dumps({"audio": str(run["root"] / "0.wav"), "task": "asr", "target": "new row"}) + "\n")
    _user_error(capsys, argv, contains=f"the manifest {manifest} changed since this checkpoint was written")


def test_eval_and_infer_user_errors(run, capsys, tmp_path):
    missing = str(run["root"] / "missing")
    _user_error(capsys, ["eval", "--checkpoint", missing, "--manifest", run["manifest"]], contains=missing)
    _user_error(capsys, ["eval", "--checkpoint", run["workdir"], "--manifest", missing + ".jsonl", "--out",
                         str(tmp_path / "e")], contains="missing.jsonl")
    _user_error(capsys, ["eval", "--checkpoint", run["workdir"]], contains="--manifest")
    _user_error(capsys, ["infer", "--checkpoint", missing, "--audio", "a.wav", "--instruction", "hi"], contains=missing)
    _user_error(capsys, ["infer", "--checkpoint", run["workdir"], "--audio", missing + ".wav", "--instruction", "hi"],
                code=1, contains="file not found")
    # A run folder whose config describes another architecture than its checkpoint holds.
    other = str(tmp_path / "other")
    shutil.copytree(run["workdir"], other)
    config = json.load(open(os.path.join(other, "config.json")))
    config["model"]["lora"]["rank"] = 8
    json.dump(config, open(os.path.join(other, "config.json"), "w"))
    _user_error(capsys, ["eval", "--checkpoint", other, "--manifest", run["manifest"], "--out", str(tmp_path / "o")],
                contains="another architecture")


def test_programming_errors_keep_their_traceback(capsys):
    def bug(_):
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        run_cli(bug, None)
    assert run_cli(lambda _: (_ for _ in ()).throw(ValueError("bad value\nsecond line")), None) == 2
    assert capsys.readouterr().err == "error: bad value; second line\n"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x")) == "/x: No such file or directory"


def test_console_script_prints_no_traceback(run, tmp_path):
    """The installed entry point, as a user runs it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "speechverse_jax.cli", "eval", "--checkpoint",
                          str(run["root"] / "missing"), "--manifest", run["manifest"]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
