"""The package works when installed (not editable): built as a wheel, installed into a folder of its
own, and run from a folder outside the repository: configs ship with it, nothing climbs to the repo."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import cached_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    wheels, site = root / "wheels", root / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), REPO], check=True, cwd=str(root))
    (wheel,) = list(wheels.glob("speechverse_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, cwd=str(root))
    work = root / "elsewhere"
    work.mkdir()
    env = cached_env(PYTHONPATH=str(site))

    def run(*args, timeout=600):
        out = subprocess.run([sys.executable, "-m", "speechverse_jax.cli", *args], cwd=str(work), env=env,
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return out.stdout

    return {"site": site, "work": work, "run": run, "env": env}


@pytest.mark.slow
@pytest.mark.xdist_group("install")
def test_the_installed_copy_is_the_one_imported(installed):
    out = subprocess.run([sys.executable, "-c", "import speechverse_jax.configs as c; print(c.PACKAGE_DIR); "
                          "print(','.join(c.names()))"], cwd=str(installed["work"]), env=installed["env"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(installed["site"]))
    assert {"demo", "stage1", "stage2_warmup", "stage2_multitask", "curriculum", "eval", "infer", "convert",
            "prepare"} <= set(out[1].split(","))


@pytest.mark.slow
@pytest.mark.xdist_group("install")
def test_the_backbones_release_ships_whole(request):
    """The wheel carries demo/pretrained/ (package data): the installed copy passes its checksums."""
    installed = request.getfixturevalue("installed")
    code = ("from speechverse_jax.demo import shipped; print(shipped.PRETRAINED_DIR); "
            "print(len(shipped.verify_checksums(shipped.PRETRAINED_DIR)['files']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(installed["work"]), env=installed["env"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    folder, count = out.stdout.split()
    assert folder.startswith(str(installed["site"])) and int(count) >= 5


@pytest.mark.slow
@pytest.mark.xdist_group("install")
def test_convert_only_demo_train_and_compile_only_run_from_outside_the_repo(installed):
    run, work = installed["run"], installed["work"]
    run("demo", "--profile", "convert-only", "--out", "demo")
    base = work / "demo" / "base"
    assert json.load(open(work / "demo" / "summary.json"))["verify"] is True

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        sf.write(str(work / f"{i}.wav"), (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
        rows.append(json.dumps({"audio": f"{i}.wav", "task": "asr", "target": "turn on the radio", "id": str(i)}))
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    common = [f"--config.base_checkpoint={base}", "--config.data.train_manifests=train.jsonl",
              "--config.data.eval_manifests=train.jsonl", "--config.data.batch_size=4",
              "--config.data.audio_buckets_seconds=(1.0,)", "--config.data.max_audio_seconds=1.0",
              "--config.data.instruction_buckets=(64,)", "--config.data.target_buckets=(32,)",
              "--config.data.max_target_tokens=32", "--config.model.dtype=float32",
              "--config.model.frozen_param_dtype=float32", "--config.model.lora.rank=4"]
    run("train", "--config", "stage2_multitask", "--workdir", "run", "--config.train.max_steps=2",
        "--config.train.eval_every=2", "--config.train.tensorboard=False", *common)
    assert json.load(open(work / "run" / "DONE.json"))["steps"] == 2
    out = run("train", "--config", "stage2_multitask", "--compile-only", "--workdir", "aot", *common)
    report = json.load(open(work / "aot" / "compile_only.json"))
    assert report and "compile_only.json" in out
