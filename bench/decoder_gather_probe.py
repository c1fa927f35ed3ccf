"""Why the unrolled decoder-only step needs so much memory under FSDP: a small decoder-only model with
wide layers and tiny activations, compiled by the TPU compiler for a v5e:2x2 topology (libtpu's
deviceless AOT path, no TPU needed), with the frozen weights FSDP-sharded (all-gathered where used)
or replicated, and remat none / full. If the compiler gathered one layer at a time, FSDP would add
about one layer's bf16 weights to the temporaries; it adds most of the stack.

    JAX_PLATFORMS=cpu python bench/decoder_gather_probe.py

Measured (libtpu 0.0.42.1; 8 LLM layers of 31.5 MB bf16 weights each, 252 MB in all):
fsdp=4: 325 MB of temporaries (remat none), 225 MB (full); replicated (data=4): 109 MB, 49 MB.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speechverse_jax.configs import common as config_common  # noqa: E402
from speechverse_jax.models import config as model_cfg_lib  # noqa: E402
from speechverse_jax.models.decoder_lm import DecoderLMConfig  # noqa: E402
from speechverse_jax.models.wavlm import WavLMConfig  # noqa: E402
from speechverse_jax.train import aot  # noqa: E402

WAVLM = WavLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
LLM = dict(model_type="llama", vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, rope_theta=10000.0)


def main():
    per_layer = 2 * (1024 * 1024 * 2 + 1024 * 512 * 2 + 3 * 1024 * 4096)
    print(json.dumps({"bf16_bytes_per_layer": per_layer, "layers": LLM["num_hidden_layers"]}), flush=True)
    for mesh in ((1, 4, 1), (4, 1, 1)):
        for remat in ("none", "full"):
            config = config_common.stage_config("stage2_multitask", batch_size=8)
            config.data.audio_buckets_seconds = (0.25,)
            config.data.instruction_buckets = (8,)
            config.data.target_buckets = (8,)
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
            config.model.layout, config.model.remat = "decoder", remat
            config.model.dtype = config.model.frozen_param_dtype = "bfloat16"
            config.train.accum_steps = 1
            config.model.layer_combination = "weighted"
            config.model.lora.rank, config.model.lora.alpha, config.model.lora.dropout = 4, 8.0, 0.0
            cfg = model_cfg_lib.build_model_config(config.model, WAVLM, DecoderLMConfig.from_hf(LLM))
            r = aot.compile_train_step(config, log_fn=lambda *a: None, target="tpu", topology="v5e:2x2", model_cfg=cfg)
            m = r["xla_memory_per_device"]
            print(json.dumps({"mesh": dict(zip(("data", "fsdp", "tensor"), mesh)), "remat": remat,
                              "temporaries_mb": round(m["temporaries"] / 1e6, 1),
                              "arguments_mb": round(m["arguments"] / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
