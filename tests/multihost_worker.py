"""Run by test_multihost.py: one process of a multi-process CPU run, or the 1-process reference.

    python multihost_worker.py BASE WORKDIR NUM_PROCESSES PROCESS_ID PORT

Every process has 8 / NUM_PROCESSES CPU devices; together they form one (2, 2, 2) mesh and train
the tiny model for 3 steps on the same global batches. Process 0 prints one JSON line: the loss
history and the final trainable params (gathered from all processes) as lists. With RESTORE_FROM=DIR
(the run folder of another run) it also restores DIR's latest checkpoint onto its own mesh.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

NUM_PROCESSES, PROCESS_ID, PORT = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
jax.config.update("jax_num_cpu_devices", 8 // NUM_PROCESSES)

from speechverse_jax.train import distributed  # noqa: E402

if NUM_PROCESSES > 1:
    distributed.initialize(coordinator=f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES, process_id=PROCESS_ID)

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from speechverse_jax.data.synthetic import SyntheticData  # noqa: E402
from speechverse_jax.train import checkpoint as ckpt_lib  # noqa: E402
from speechverse_jax.train.loop import train  # noqa: E402
from speechverse_jax.train.partitioning import make_mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train import tiny_config  # noqa: E402

GLOBAL_BATCH = 8


class ProcessRows(SyntheticData):
    """The global synthetic batches, cut to this process's rows (as the manifest pipeline does)."""

    def _rows(self, batch):
        n = GLOBAL_BATCH // jax.process_count()
        lo = jax.process_index() * n
        return {k: v[lo:lo + n] for k, v in batch.items()}

    def train_iterator(self):
        inner, rows = super().train_iterator(), self._rows

        class It:
            def __next__(self_):
                return rows(next(inner))

            get_state, set_state = inner.get_state, inner.set_state

        return It()

    def eval_batches(self):
        return [self._rows(b) for b in super().eval_batches()]


def main():
    base, workdir = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8 and jax.process_count() == NUM_PROCESSES, (jax.devices(), jax.process_count())
    mesh = make_mesh(2, 2, 2)
    config = tiny_config(base, steps=3)
    data = ProcessRows(batch_size=GLOBAL_BATCH, samples=4000, instruction_len=6, target_len=5, vocab_size=40,
                       task_names=["asr", "ic"])
    out = train(config, workdir, data, mesh=mesh, progress=False)
    params = multihost_utils.process_allgather(out["state"].params, tiled=True)
    if jax.process_index() == 0:
        losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))
                  if '"train"' in line]
        flat = traverse_util.flatten_dict(params, sep="/")
        result = {"losses": losses, "params": {k: np.asarray(v).tolist() for k, v in flat.items()},
                  "processes": jax.process_count()}
        restore_from = os.environ.get("RESTORE_FROM")
        if restore_from:  # a run folder written by another (multi-process) run: restore onto this mesh
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                              out["state"])
            state, data_state, meta = ckpt_lib.restore(os.path.join(restore_from, "checkpoints"), abstract)
            flat = traverse_util.flatten_dict(state.params, sep="/")
            result["restored"] = {"step": int(state.step), "data_state": data_state,
                                  "params": {k: np.asarray(v).tolist() for k, v in flat.items()}}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
