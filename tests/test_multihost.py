"""Two real processes x 4 CPU devices (gloo collectives) train like one process with 8 devices,
and the checkpoint they write together restores in a single process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAGS
from speechverse_jax.train import distributed

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(text: str) -> dict:
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError("no RESULT line in:\n" + text[-3000:])


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.slow
def test_two_processes_match_one_process_and_checkpoint_restores(tiny_base, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)  # no forced device count
    port = _free_port()
    multi_dir = str(tmp_path / "two_processes")
    procs = [subprocess.Popen([sys.executable, WORKER, tiny_base, multi_dir, "2", str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    multi = _result(outs[0])
    assert multi["processes"] == 2
    assert "RESULT" not in outs[1]  # process 1 neither logs results nor writes metrics
    assert "stage done" not in outs[1]

    single = subprocess.run([sys.executable, WORKER, tiny_base, str(tmp_path / "one_process"), "1", "0", "0"],
                            env=dict(env, RESTORE_FROM=multi_dir), capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    ref = _result(single.stdout)

    assert len(multi["losses"]) == len(ref["losses"]) == 3
    for a, b in zip(multi["losses"], ref["losses"]):
        assert abs(a - b) / abs(b) <= 1e-5, (multi["losses"], ref["losses"])
    assert multi["params"].keys() == ref["params"].keys()
    worst = max(_rel_l2(multi["params"][k], ref["params"][k]) for k in ref["params"])
    assert worst <= 1e-5, worst
    # The checkpoint the two processes wrote restores in one process: same step, data position, params.
    restored = ref["restored"]
    assert restored["step"] == 3 and restored["data_state"] == {"index": 3}
    for k, v in multi["params"].items():
        np.testing.assert_array_equal(np.asarray(restored["params"][k], np.float32), np.asarray(v, np.float32),
                                      err_msg=k)


def test_distributed_plan_from_flags_and_environment():
    assert distributed.plan(env={}) == {"mode": "single"}
    assert distributed.plan(env={"SVJ_DISTRIBUTED": "off", "TPU_WORKER_HOSTNAMES": "a,b"}) == {"mode": "off"}
    assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == {"mode": "auto", "cluster": "tpu"}
    assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}) == {"mode": "single"}  # one-host TPU VM
    assert distributed.plan(env={"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})["cluster"] == "slurm"
    explicit = distributed.plan("10.1.2.3:1234", 4, 3, env={})
    assert explicit == {"mode": "explicit", "coordinator_address": "10.1.2.3:1234", "num_processes": 4,
                        "process_id": 3}
    from_env = distributed.plan(env={"SVJ_COORDINATOR": "h:1", "SVJ_NUM_PROCESSES": "2", "SVJ_PROCESS_ID": "1"})
    assert from_env["process_id"] == 1 and from_env["num_processes"] == 2
    with pytest.raises(ValueError, match="--process_id"):
        distributed.plan("h:1", 2, None, env={})
    with pytest.raises(ValueError, match=r"in \[0, --num_processes=2\)"):
        distributed.plan("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.plan("h", 2, 0, env={})
    with pytest.raises(ValueError, match="SVJ_DISTRIBUTED"):
        distributed.plan(env={"SVJ_DISTRIBUTED": "sometimes"})
