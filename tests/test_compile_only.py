"""`train --compile-only` compiles the full-size (WavLM-Large + Flan-T5-XL) train step for an
8-device mesh from shapes alone, on forced CPU devices (`--compile-target=cpu`), and reports
memory per device, FLOPs and collectives. (tests/test_tpu_compile.py compiles for a TPU topology.)"""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE_FLAGS
from speechverse_jax import configs
from speechverse_jax.models import config as model_cfg_lib
from speechverse_jax.train import flops



@pytest.mark.slow
def test_full_size_step_compiles_for_a_mesh_and_reports(tmp_path):
    out = tmp_path / "aot"
    cmd = [sys.executable, "-m", "speechverse_jax.cli", "train", "--config", "configs/stage2_multitask.py",
           "--workdir", str(out), "--compile-only", "--compile-target=cpu", "--config.mesh.data=2", "--config.mesh.fsdp=4",
           "--config.data.batch_size=8", "--config.data.audio_buckets_seconds=(4.0,)",
           "--config.data.instruction_buckets=(32,)", "--config.data.target_buckets=(16,)"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)  # no forced device count
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "per device:" in res.stdout and "FLOPs per step" in res.stdout
    report = json.loads((out / "compile_only.json").read_text())
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    # Table 11 of the paper: 28.3M trainable (downsampler + LoRA r16 on q, v).
    assert report["params"]["trainable"] == 18_886_656 + 9_437_184
    assert report["params"]["frozen"] > 3_000_000_000
    # Frozen weights are bf16 and sharded 4 ways over fsdp: well under a quarter of 2 bytes each,
    # plus the few small leaves that stay replicated.
    frozen_bytes = report["per_device_bytes"]["frozen_params"]
    assert 2 * report["params"]["frozen"] / 4 <= frozen_bytes < 2 * report["params"]["frozen"] / 4 * 1.05
    # Adam moments: two float32 copies of the trainable params, sharded the same way.
    assert report["per_device_bytes"]["optimizer_state"] >= 2 * report["per_device_bytes"]["trainable_params"]
    assert report["xla_memory_per_device"]["temporaries"] > 0
    # the paper presets scan the layers and rematerialise the T5 blocks; no TPU topology was given,
    # so the step compiled for forced CPU devices and said so
    assert report["scan_layers"] and report["remat"] == "full" and report["target"] == "cpu"
    assert "forced CPU devices" in res.stdout
    # FSDP-4: the frozen weights are all-gathered, once per scanned layer iteration
    assert report["collectives"]["all-gather"]["count"] >= 48 and report["collectives"]["unknown_trip_count_loops"] == 0
    # XLA's cost analysis counts each loop body once (test_flops.py checks the analytic count
    # against XLA on an unrolled model), so here it is only below the analytic total.
    xla = report["xla_flops_per_device"] * report["devices"]
    assert 0 < xla < report["analytic_flops"]["total"], (xla, report["analytic_flops"])


def test_analytic_flops_of_the_paper_model_scale_with_the_batch():
    cfg = model_cfg_lib.build_model_config(configs.load("stage2_multitask").model)
    one = flops.train_step_flops(cfg, 1, 16000 * 10, 64, 32)
    many = flops.train_step_flops(cfg, 768, 16000 * 10, 64, 32)
    assert abs(many["total"] / one["total"] - 768) < 1e-6
    # T5-XL forward by weight matmuls per token: encoder tokens go through the encoder's weights and
    # the decoder's cross-attention k, v; decoder tokens through the rest of the decoder and the head.
    t5 = cfg.t5
    d, inner, ff = t5.d_model, t5.num_heads * t5.d_kv, t5.d_ff
    source = -(-flops.wavlm_frames(cfg.wavlm, 16000 * 10) // 4) + 64
    encoder_w = t5.num_layers * (4 * d * inner + 3 * d * ff) + t5.num_decoder_layers * 2 * d * inner
    decoder_w = t5.num_decoder_layers * (6 * d * inner + 3 * d * ff) + d * t5.vocab_size
    weights_only = 2 * 768 * (source * encoder_w + 32 * decoder_w)
    assert 1.0 < many["t5_forward"] / weights_only < 1.1, many  # + attention scores
