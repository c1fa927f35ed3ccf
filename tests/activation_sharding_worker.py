"""Run by test_activation_sharding.py in a fresh process with 8 forced CPU devices.

Compiles the train step of a small SpeechVerse on a (data=2, fsdp=2, tensor=2) mesh twice: with
the activation sharding context (`models.layers.activation_sharding`, what train / eval /
compile-only use) and without it. Prints one JSON line per case: the sharding constraints in the
lowered program, the collectives of the compiled one, and how often the per-device shapes of the
T5 encoder's residual stream appear with `embed` whole (the layout the rules ask for: batch over
data x fsdp, embed replicated) or split over `tensor`.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from speechverse_jax.configs import common as config_common  # noqa: E402
from speechverse_jax.models import config as model_cfg_lib  # noqa: E402
from speechverse_jax.models.t5 import T5Config  # noqa: E402
from speechverse_jax.models.wavlm import WavLMConfig  # noqa: E402
from speechverse_jax.train import aot, partitioning  # noqa: E402

D_MODEL, D_FF = 48, 80


def small_config(scan_layers: bool = False):
    config = config_common.stage_config("stage2_multitask", batch_size=8)
    config.data.audio_buckets_seconds = (0.5,)
    config.data.instruction_buckets = (8,)
    config.data.target_buckets = (8,)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.model.scan_layers = scan_layers
    wavlm = WavLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                        conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
    t5 = T5Config(vocab_size=160, d_model=D_MODEL, d_kv=8, d_ff=D_FF, num_layers=2, num_decoder_layers=2,
                  num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    return config, model_cfg_lib.build_model_config(config.model, wavlm, t5)


def main():
    assert len(jax.devices()) == 8, jax.devices()
    scan = len(sys.argv) > 1 and sys.argv[1] == "scan"
    config, model_cfg = small_config(scan)
    mesh = partitioning.make_mesh(2, 2, 2, devices=jax.devices())
    # encoder length: 8000 samples -> 799 WavLM frames -> 200 audio tokens after the 4x downsampler, + 8
    seq = 208
    rows = 8 // 4  # batch over data x fsdp
    for on in (True, False):
        lowered, _ = aot.lower_train_step(config, mesh, model_cfg=model_cfg, activation_constraints=on)
        text = lowered.as_text()
        hlo = lowered.compile().as_text()
        stats = aot.collective_stats(hlo)
        print(json.dumps({
            "constraints": on,
            "lowered_constraints": text.count("sharding_constraint") + text.count("@Sharding"),
            "residual_whole": hlo.count(f"f32[{rows},{seq},{D_MODEL}]"),
            "residual_split": hlo.count(f"f32[{rows},{seq},{D_MODEL // 2}]"),
            "collective_bytes": {k: v["bytes"] for k, v in stats.items() if isinstance(v, dict)},
        }), flush=True)


if __name__ == "__main__":
    main()
