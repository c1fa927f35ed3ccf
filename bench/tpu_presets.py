"""Re-derive the TPU slice presets from the TPU compiler's own memory report (deviceless AOT via
libtpu, no TPU needed): for each preset, the largest micro-batch per (data, fsdp) shard whose
full-size train step (stage2_multitask, the largest bucket shapes of the data config) compiles
for the preset's topology with a peak under 90% of the chip's HBM, at the paper's global batch 768.

    python bench/tpu_presets.py --presets v5e-16,v6e-8,v5p-32 --micro 16,12,8 --out-dir bench/results
    # the decoder-only layout on Llama 3.2 3B (report: compile_v5e-16_llama-3.2-3b_chunked.json; with
    # the full-size configs' attention_chunk and loss_chunk it fits at the T5 preset's 24 rows)
    python bench/tpu_presets.py --presets v5e-16 --micro 48,24 --tag _llama-3.2-3b_chunked \
        --extra "--config.model.layout=decoder --config.model.llm_preset=llama-3.2-3b"

Each candidate is compiled in its own process (`speechverse-jax train ... --compile-only
--compile-target=tpu --config.train.accum_steps=A`); candidates are tried from the largest down and
the first that fits is kept. Writes bench/results/compile_<preset>.json: the command that made the
kept report, the report, and every attempt (fit, peak, compile time, or the compiler's error).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from speechverse_jax.train import slices  # noqa: E402


def compile_once(preset: str, micro: int, extra, workdir: str, timeout: float = 1200):
    p = slices.get(preset)
    shards = p.data * p.fsdp
    accum = slices.PAPER_GLOBAL_BATCH // (shards * micro)
    args = ["train", "--config", f"configs/stage2_multitask.py:wlm,{preset}", "--workdir", workdir,
            "--compile-only", "--compile-target=tpu", f"--config.train.accum_steps={accum}", *extra]
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "speechverse_jax.cli", *args], capture_output=True, text=True,
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1"),
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        res = subprocess.CompletedProcess(args, 124, "", f"timed out after {timeout:.0f} s")
    attempt = {"micro_batch": micro, "accum_steps": accum, "rc": res.returncode, "wall_seconds": round(time.time() - t0, 1),
               "command": "speechverse-jax " + " ".join(a if a != workdir else "/tmp/x" for a in args)}
    report = None
    path = os.path.join(workdir, "compile_only.json")
    if res.returncode == 0 and os.path.exists(path):
        report = json.load(open(path))
        attempt.update(peak_gib=report["xla_memory_per_device"]["peak_estimate"] / 2**30,
                       hbm_fraction=report["hbm_fraction"], fits=report["hbm_fraction"] <= slices.USABLE_FRACTION,
                       compile_seconds=report["compile_seconds"])
    else:
        err = [l for l in (res.stderr + res.stdout).splitlines() if "RESOURCE_EXHAUSTED" in l or "Error" in l]
        attempt.update(fits=False, error=(err[-1] if err else (res.stderr or res.stdout)[-500:])[:600])
    return attempt, report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="v5e-16,v6e-8,v5p-32")
    ap.add_argument("--micro", default="32,24,16,12,8,6,4,2,1", help="candidate micro-batches, tried largest first")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--extra", default="", help="more --config overrides, space-separated")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per compile")
    ap.add_argument("--tag", default="", help="appended to the report's name: compile_<preset><tag>.json")
    a = ap.parse_args()
    for preset in a.presets.split(","):
        p = slices.get(preset)
        shards = p.data * p.fsdp
        cands = [m for m in sorted({int(x) for x in a.micro.split(",")}, reverse=True)
                 if slices.PAPER_GLOBAL_BATCH % (shards * m) == 0]
        attempts, kept = [], None
        for m in cands:
            with tempfile.TemporaryDirectory() as tmp:
                attempt, report = compile_once(preset, m, a.extra.split(), tmp, a.timeout)
            attempts.append(attempt)
            print(json.dumps({"preset": preset, **attempt}), flush=True)
            if attempt["fits"]:
                kept = (attempt, report)
                break
        out = {"preset": preset, "topology": p.topology, "global_batch": slices.PAPER_GLOBAL_BATCH,
               "usable_fraction": slices.USABLE_FRACTION, "attempts": attempts,
               "command": kept[0]["command"] if kept else None, "report": kept[1] if kept else None}
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, f"compile_{preset}{a.tag}.json"), "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
