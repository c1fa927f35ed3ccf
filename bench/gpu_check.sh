#!/usr/bin/env bash
# Accelerator check for issue #16 (prepared on a CPU machine; run it where a GPU is lent), < 8 min.
#   bash bench/gpu_check.sh            # writes bench/results/gpu_step*.json, generation_speed_gpu.json
# 1. the full-size step (WavLM-Large + Flan-T5-XL, bf16, scan + full remat) for a few steps at the
#    largest batch that fits one GPU: step time, MFU against the chip's bf16 peak, peak memory;
#    if batch 16 does not fit, batch 8.
# 2. bench/generation_speed.py, ours vs HF generate on the same GPU, batch 1 and 8, greedy and beam 4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total --format=csv || true
"$PY" -c "import jax; print(jax.devices())"
# time budget (< 8 min in all): 200 s + 150 s for the step, 120 s for generation
for attempt in "16 200" "8 150"; do
  read -r b limit <<< "$attempt"
  if timeout "$limit" "$PY" bench/gpu_step.py --batch "$b" --audio-seconds 15 --steps 5 \
      --out "bench/results/gpu_step_b$b.json"; then
    break
  fi
  echo "batch $b failed (out of memory or timeout); trying a smaller batch"
done
timeout 120 "$PY" bench/generation_speed.py --d-model 512 --layers 4 --batches 1 8 --beams 1 4 --repeats 3 \
  --torch-device cuda --out bench/results/generation_speed_gpu.json
