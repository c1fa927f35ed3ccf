"""eval and infer never die on one bad clip: skip + count by reason, --strict, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from speechverse_jax.cli import main
from speechverse_jax.data.manifest import write_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]


def _wav(path, seconds, rng, value=None):
    x = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    if value is not None:
        x[100:200] = value
    sf.write(str(path), x, 16000, subtype="FLOAT")
    return path.name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 good rows, then one of each kind of bad row (line numbers noted)."""
    root = tmp_path_factory.mktemp("evalbad")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(8):
        task = ("asr", "sc")[i % 2]
        rows.append({"audio": _wav(root / f"g{i}.wav", rng.uniform(0.3, 0.6), rng), "task": task, "id": f"g{i}",
                     "target": TEXTS[i % 4] if task == "asr" else ("one", "two")[i % 2]})
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    bad = {
        "unreadable_audio": {"audio": "corrupt.wav", "duration": 0.5},  # duration given: no header probe
        "nonfinite_audio": {"audio": _wav(root / "nan.wav", 0.4, rng, np.nan)},
        "empty_audio": {"audio": _wav(root / "empty.wav", 0.0, rng)},
        "missing_file": {"audio": "nowhere.wav"},
        "audio_too_long": {"audio": _wav(root / "long.wav", 2.5, rng)},  # eval limit set to 2 s below
        "too_long_but_manifest_says_short": {"audio": "long.wav", "duration": 1.0},
    }
    lines = {}
    for i, (kind, row) in enumerate(bad.items()):
        rows.append({**row, "task": "asr", "target": TEXTS[0], "id": f"bad{i}"})
        lines[kind] = len(rows)
    write_manifest(str(root / "m.jsonl"), rows)
    with open(root / "m.jsonl", "a") as f:
        f.write("{not json\n")
    lines["malformed_json"] = len(rows) + 1
    return {"root": root, "manifest": str(root / "m.jsonl"), "lines": lines}


@pytest.fixture(scope="module")
def base_2s(tiny_base, tmp_path_factory):
    """The tiny converted base (an untrained model is enough to exercise the eval machinery)."""
    return tiny_base


def _eval_argv(base, manifest, out, *extra):
    return ["eval", "--checkpoint", base, "--manifest", manifest, "--out", out, "--max-new-tokens", "4",
            "--batch-size", "2", *extra]


@pytest.fixture()
def limit_2s(monkeypatch):
    from speechverse_jax.api import SpeechVerseModel

    monkeypatch.setattr(SpeechVerseModel, "max_audio_seconds", 2.0)


def test_eval_skips_and_counts_every_bad_row(base_2s, corpus, tmp_path, limit_2s, capsys):
    out = str(tmp_path / "eval")
    assert main(_eval_argv(base_2s, corpus["manifest"], out)) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    lines = corpus["lines"]
    assert metrics["skipped"] == {"total": 7, "by_reason": {
        "audio_too_long": 2, "empty_audio": 1, "malformed_json": 1, "missing_file": 1, "nonfinite_audio": 1,
        "unreadable_audio": 1}}
    skipped = [json.loads(l) for l in open(os.path.join(out, "skipped.jsonl"))]
    where = {s["where"]: s["reason"] for s in skipped}
    m = corpus["manifest"]
    assert where == {f"{m}:{lines['unreadable_audio']}": "unreadable_audio",
                     f"{m}:{lines['nonfinite_audio']}": "nonfinite_audio",
                     f"{m}:{lines['empty_audio']}": "empty_audio", f"{m}:{lines['missing_file']}": "missing_file",
                     f"{m}:{lines['audio_too_long']}": "audio_too_long",
                     f"{m}:{lines['too_long_but_manifest_says_short']}": "audio_too_long",
                     f"{m}:{lines['malformed_json']}": "malformed_json"}
    preds = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
    assert sorted(p["id"] for p in preds) == [f"g{i}" for i in range(8)]
    md = open(os.path.join(out, "metrics.md")).read()
    assert "Skipped rows: 7 (audio_too_long 2, empty_audio 1" in md
    assert "Traceback" not in capsys.readouterr().err


def test_eval_strict_stops_at_the_first_bad_row_with_one_line(base_2s, corpus, tmp_path, limit_2s, capsys):
    assert main(_eval_argv(base_2s, corpus["manifest"], str(tmp_path / "e"), "--strict")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    first_bad = min(corpus["lines"].values())
    assert err[0].startswith(f"error: {corpus['manifest']}:{first_bad}: "), err


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
                JAX_COMPILATION_CACHE_DIR=os.environ.get("SPEECHVERSE_JAX_CACHE", os.path.join(REPO, ".jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_eval_killed_half_way_resumes_to_the_same_files(base_2s, corpus, tmp_path):
    """A real kill -9 of the CLI in the middle of the predictions, then the same command again."""
    argv = _eval_argv(base_2s, corpus["manifest"], "OUT", "--split", "both", "--constrained", "both")
    straight = str(tmp_path / "straight")
    assert main([a if a != "OUT" else straight for a in argv]) == 0
    n_total = sum(1 for _ in open(os.path.join(straight, "predictions.jsonl")))
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "speechverse_jax.cli"] + [a if a != "OUT" else killed for a in argv]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred = os.path.join(killed, "predictions.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(pred) and sum(1 for _ in open(pred)) >= n_total // 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the eval finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = sum(1 for _ in open(pred))
    assert 0 < n_before < n_total
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already done" in res.stderr
    assert _files(killed) == _files(straight)


def test_eval_refuses_to_mix_with_another_runs_folder(base_2s, corpus, tmp_path, limit_2s, capsys):
    out = str(tmp_path / "e")
    assert main(_eval_argv(base_2s, corpus["manifest"], out)) == 0
    assert main(_eval_argv(base_2s, corpus["manifest"], out, "--split", "unseen")) == 2
    assert "holds an evaluation of other inputs" in capsys.readouterr().err


def test_infer_answers_good_files_and_reports_bad_ones(base_2s, corpus, tmp_path, capsys, limit_2s):
    root = corpus["root"]
    files = [str(root / "g0.wav"), str(root / "nan.wav"), str(root / "corrupt.wav"), str(root / "long.wav"),
             str(root / "nowhere.wav"), str(root / "g1.wav")]
    rc = main(["infer", "--checkpoint", base_2s, "--audio", *files, "--instruction", "Transcribe the audio.",
               "--json", "--max-new-tokens", "4"])
    assert rc == 1
    out = capsys.readouterr()
    rows = [json.loads(l) for l in out.out.splitlines() if l.startswith("{")]
    assert [r["audio"] for r in rows] == files
    assert [r.get("reason") for r in rows] == [None, "nonfinite_audio", "unreadable_audio", "audio_too_long",
                                                "missing_file", None]
    assert "answer" in rows[0] and "answer" in rows[5]
    err = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert len(err) == 4 and "longer than the model's limit of 2s" in err[2]
    assert "Traceback" not in out.err
    # Plain mode: answers on stdout, one line per bad file on stderr.
    assert main(["infer", "--checkpoint", base_2s, "--audio", files[0], files[1], "--instruction", "Transcribe.",
                 "--max-new-tokens", "4"]) == 1
    out = capsys.readouterr()
    assert out.out.count("\t") == 1 and out.out.startswith(files[0])
    assert [l for l in out.err.splitlines() if l.startswith("error:")] == [f"error: {files[1]}: contains NaN or inf samples"]
