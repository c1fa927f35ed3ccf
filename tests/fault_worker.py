"""A `speechverse-jax` command run with fault-injection probes (tests/test_faults.py kills it).

    python tests/fault_worker.py FAULT_DIR <speechverse-jax arguments...>

Probes (nothing changes what the command computes):
- FAULT_DIR/ids.jsonl: one line per training batch drawn: {stage, batch (global index), ids}.
- FAULT_DIR/events.log: `step <stage> <batch>`, `save <stage> <step>`, `finalizing <stage> <step>`,
  `stage_done <stage>` as they happen (flushed), so the test can kill -9 at a chosen point.
- SVJ_FAULT_FINALIZE_DELAY (seconds): orbax's background commit of a save (the rename of the
  written temporary folder) waits this long first, so a kill during the window lands in the middle
  of an async checkpoint save.
"""

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    fault_dir, argv = sys.argv[1], sys.argv[2:]
    os.makedirs(fault_dir, exist_ok=True)
    from orbax.checkpoint._src.path import atomicity

    from speechverse_jax import cli
    from speechverse_jax.data import loader as pipeline
    from speechverse_jax.train import checkpoint as ckpt_lib
    from speechverse_jax.train import curriculum

    state = {"stage": "train"}

    def event(text):
        with open(os.path.join(fault_dir, "events.log"), "a") as f:
            f.write(text + "\n")

    original_run_stage = curriculum.run_stage

    def run_stage(config, workdir, *a, **k):
        state["stage"] = os.path.basename(str(workdir).rstrip("/"))
        out = original_run_stage(config, workdir, *a, **k)
        event(f"stage_done {state['stage']}")
        return out

    curriculum.run_stage = run_stage

    original_next = pipeline.BatchIterator.__next__

    def logged_next(self):
        batch = original_next(self)
        meta = batch["meta"]
        line = {"stage": state["stage"], "batch": int(meta["global_batch"]),
                "ids": [i for i, m in zip(meta["ids"], batch["example_mask"]) if i is not None and m]}
        if self.pipeline.train:
            with open(os.path.join(fault_dir, "ids.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            event(f"step {state['stage']} {line['batch']}")
        return batch

    pipeline.BatchIterator.__next__ = logged_next

    original_save = ckpt_lib.Checkpointer.save

    def save(self, step, *a, **k):
        original_save(self, step, *a, **k)
        event(f"save {state['stage']} {step}")

    ckpt_lib.Checkpointer.save = save
    delay = float(os.environ.get("SVJ_FAULT_FINALIZE_DELAY", "0"))
    original_commit = atomicity.on_commit_callback

    async def commit(tmpdir, *a, **k):  # all files written, the temporary folder not yet renamed
        if delay:
            event(f"finalizing {state['stage']} {os.path.basename(str(tmpdir.get_final()))}")
            time.sleep(delay)
        return await original_commit(tmpdir, *a, **k)

    atomicity.on_commit_callback = commit
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
