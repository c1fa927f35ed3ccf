"""Fault injection: kill -9 at chosen points, damaged / full-disk checkpoints, changed manifests.

The training command runs in a subprocess (tests/fault_worker.py: the real `speechverse-jax`
CLI plus probes that log each batch's example ids and each save) and is killed with SIGKILL:
in the middle of an async checkpoint save, in the middle of a step, between curriculum stages.
After every kill the same command runs again. The final params and optimizer state of every
stage must equal an uninterrupted run's bit for bit, and the batches the surviving trajectory
trained on must hold every example exactly once per epoch, in the uninterrupted order.
"""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ASR_STEPS, FLOAT32, check_stages_done, curriculum_argv
from speechverse_jax.train import checkpoint as ckpt_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STAGES = ("stage1", "stage2_warmup")
STEPS = ASR_STEPS  # one epoch per stage (12 examples, batch 4)


def _curriculum_argv(base, manifest, workdir):
    return curriculum_argv(base, manifest, workdir, STAGES, os.path.join(HERE, "fault_curriculum_config.py"),
                           steps=STEPS, eval_every=STEPS, checkpoint_every=1,
                           extra=("train.keep_checkpoints=2",) + FLOAT32)


def _env(**extra):
    cache = os.environ.get("SPEECHVERSE_JAX_CACHE", os.path.join(REPO, ".jax_cache"))
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def _worker(fault_dir, argv, delay="0.4"):
    return [sys.executable, os.path.join(HERE, "fault_worker.py"), fault_dir] + argv


def _events(fault_dir):
    path = os.path.join(fault_dir, "events.log")
    return open(path).read().splitlines() if os.path.exists(path) else []


def _run_until(cmd, env, fault_dir, event, extra_delay, timeout=240):
    """Start the command; SIGKILL it `extra_delay` s after `event` is logged. -> True if killed."""
    start = len(_events(fault_dir))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if event in _events(fault_dir)[start:]:
            time.sleep(extra_delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return False


def _final_state(stage_dir):
    """Every array of the stage's latest checkpoint (params, optimizer state, step, rng) as numpy."""
    directory = os.path.join(stage_dir, "checkpoints")
    step = ckpt_lib.usable_steps(directory)[0]
    handlers = {"state": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers=handlers) as mgr:
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    import jax

    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _trajectory(fault_dir):
    """The batches the surviving run trained on, per stage: for each attempt, the batches it drew
    that were not redrawn by a later attempt (a later attempt restarts from its checkpoint)."""
    lines = []
    for text in open(os.path.join(fault_dir, "ids.jsonl")).read().split("\n"):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    out = {}
    for line in lines:  # a batch index seen again means the run went back to a checkpoint
        seq = out.setdefault(line["stage"], [])
        while seq and seq[-1]["batch"] >= line["batch"]:
            seq.pop()
        seq.append(line)
    return {s: [l["ids"] for l in seq] for s, seq in out.items()}


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tiny_base, asr_manifest, tmp_path):
    straight_dir, straight_faults = str(tmp_path / "straight"), str(tmp_path / "straight_probes")
    res = subprocess.run(_worker(straight_faults, _curriculum_argv(tiny_base, asr_manifest, straight_dir)),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    workdir, faults = str(tmp_path / "killed"), str(tmp_path / "killed_probes")
    cmd = _worker(faults, _curriculum_argv(tiny_base, asr_manifest, workdir))
    env = _env(SVJ_FAULT_FINALIZE_DELAY="0.4")
    rng = random.Random(19)
    plan = [  # (event to wait for, seconds after it): the kill lands ...
        ("finalizing stage1 1", rng.uniform(0.0, 0.3)),  # ... while step 1's async save is being written
        ("step stage1 2", rng.uniform(0.0, 0.2)),  # ... in the middle of step 3
        ("stage_done stage1", 0.0),  # ... between the stages
        ("finalizing stage2_warmup 2", rng.uniform(0.0, 0.3)),  # ... during a save in stage 2
        ("step stage2_warmup 2", rng.uniform(0.0, 0.2)),  # ... in the middle of the last step
    ]
    kills, mid_save = 0, 0
    for event, delay in plan:
        kills += _run_until(cmd, env, faults, event, delay)
        if event.startswith("finalizing"):  # the save was cut: its uncommitted temporary folder is there
            stage, step = event.split()[1:]
            mid_save += bool(glob.glob(os.path.join(workdir, stage, "checkpoints", f"{step}.orbax-checkpoint-tmp*")))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    assert kills == len(plan) and mid_save == 2
    straight_ids, ids = _trajectory(straight_faults), _trajectory(faults)
    check_stages_done(workdir, STAGES, STEPS)
    for stage in STAGES:
        s_step, a = _final_state(os.path.join(straight_dir, stage))
        k_step, b = _final_state(os.path.join(workdir, stage))
        assert s_step == k_step == STEPS and a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stage} {key}")
        assert ids[stage] == straight_ids[stage]  # the same batches, in the same order
        seen = [i for batch in ids[stage] for i in batch]
        assert sorted(seen) == sorted(f"u{i}" for i in range(12))  # each example once: none twice, none skipped


# -- damaged checkpoints and a full disk (in-process, synthetic data) ------------------------------
def _tiny(base, steps, **train):
    """`steps` steps of one learning-rate schedule: a run stopped early is a prefix of the uninterrupted
    run, and every run here shares one compiled train step."""
    from test_train import SCHEDULE_STEPS, tiny_config

    return tiny_config(base, steps=steps, schedule_steps=SCHEDULE_STEPS, checkpoint_every=1, keep_checkpoints=3,
                       **train)


def _tiny_data():
    from test_train import tiny_data

    return tiny_data()


def _params(state):
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def straight4(tiny_base, tmp_path_factory):
    from speechverse_jax.train.loop import train

    out = train(_tiny(tiny_base, 4), str(tmp_path_factory.mktemp("straight") / "run"), _tiny_data(), progress=False)
    return _params(out["state"])


def test_damaged_checkpoints_fall_back_to_the_last_complete_one(tiny_base, straight4, tmp_path, capsys):
    """Step 3 has a truncated file, step 2 a deleted one: both are set aside with a warning naming the
    file, training resumes from step 1 and ends where an uninterrupted run ends."""
    from speechverse_jax.train.loop import train

    workdir = str(tmp_path / "run")
    train(_tiny(tiny_base, 3), workdir, _tiny_data(), progress=False)
    victims = {}
    for step, damage in ((3, "truncate"), (2, "delete")):
        files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
        victims[step] = max(files, key=os.path.getsize)
        if damage == "truncate":
            with open(victims[step], "r+b") as f:
                f.truncate(os.path.getsize(victims[step]) // 2)
        else:
            os.remove(victims[step])
    capsys.readouterr()
    out = train(_tiny(tiny_base, 4), workdir, _tiny_data(), progress=False)
    text = capsys.readouterr().out
    folder = os.path.join(workdir, "checkpoints")
    assert f"checkpoint step 3 in {folder} is unusable ({victims[3]} has " in text
    assert f"checkpoint step 2 in {folder} is unusable ({victims[2]} is missing)" in text
    assert f"resumed from {workdir} at step 1" in text
    for step in (2, 3):  # kept for inspection, never loaded
        assert os.path.isdir(os.path.join(folder, f"corrupt-{step}"))
    got = _params(out["state"])
    for k in straight4:  # steps 2-4 re-run from step 1: the same result as never stopping
        np.testing.assert_array_equal(got[k], straight4[k], err_msg=k)


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _fill(folder, leave):
    """Write a filler file until the disk is full, then free `leave` bytes."""
    path = os.path.join(folder, "filler")
    # Unbuffered: a buffered file keeps the bytes of a failed write and raises ENOSPC again on close.
    with open(path, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 65536):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) - leave, 0))
    return path


def test_disk_full_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(tiny_base, straight4, tmp_path):
    """On a real 64 MB tmpfs when this user may mount one (root); else ENOSPC is injected into the
    checkpoint writer (the same error orbax's writer raises)."""
    from speechverse_jax.errors import UserError
    from speechverse_jax.train.loop import train

    mnt = str(tmp_path / "small_disk")
    real = _mount_tmpfs(mnt, "64m")  # room for two tiny runs; the filler takes the rest
    try:
        workdir = os.path.join(mnt, "run")
        train(_tiny(tiny_base, 2), workdir, _tiny_data(), progress=False)
        step2 = os.path.join(workdir, "checkpoints", "2")
        before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(step2, "**", "*"), recursive=True)
                  if os.path.isfile(p)}
        if real:
            filler = _fill(mnt, leave=8192)  # room for a metrics line, not for a checkpoint
            ctx = None
        else:
            from unittest import mock

            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir, "checkpoints"))

            ctx = mock.patch.object(ocp.CheckpointManager, "save", full)
            ctx.start()
        try:
            with pytest.raises(UserError) as info:
                train(_tiny(tiny_base, 4), workdir, _tiny_data(), progress=False)
        finally:
            if ctx:
                ctx.stop()
        msg = str(info.value)
        print(f"disk full ({'64 MB tmpfs' if real else 'injected ENOSPC'}): {msg}")
        assert "no space left on device while saving checkpoint step" in msg and "the previous checkpoint (step 2) is intact" in msg, msg
        after = {p: open(p, "rb").read() for p in before}
        assert after == before  # step 2 untouched
        assert ckpt_lib.usable_steps(os.path.join(workdir, "checkpoints"))[0] == 2
        if real:
            os.remove(filler)
        out = train(_tiny(tiny_base, 4), workdir, _tiny_data(), progress=False)  # space again: resume and finish
        got = _params(out["state"])
        for k in straight4:
            np.testing.assert_array_equal(got[k], straight4[k], err_msg=k)
    finally:
        if real:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=20)
