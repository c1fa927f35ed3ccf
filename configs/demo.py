"""The CPU demo: tiny pretrained backbones and the paper's three-stage curriculum on an espeak corpus.

    speechverse-jax demo                      # profile 'full'  (about 30 minutes on 2 cores, measured)
    speechverse-jax demo --profile quick      # the CI smoke profile (a few minutes)

`get_config(profile)` returns the whole demo: backbone sizes and pretraining budgets, then a
curriculum config (same shape as configs/curriculum.py) whose stages the demo runs with cached
encoder states. `speechverse-jax demo` takes no config overrides: to change a budget, edit
`PROFILES` below (or call `speechverse_jax.demo.run.run_demo` with a patched `demo_config`).
"""

import ml_collections

from speechverse_jax import config_lib

DEMO_LORA_TARGETS = r".*/(self_attention|cross_attention|mlp)/(q|k|v|o|wi_0|wi_1|wo)$"

PROFILES = {
    # steps: WavLM CTC, T5 text pretraining (copying alone, then the task mix), stage1,
    # stage2_warmup, stage2_multitask. A short LoRA warm-up: from the same stage 1, 100 warm-up
    # steps instead of 300 gave multi-task val 0.78 vs 0.80 and test IC 43% vs 32%, SNS 91 vs 86,
    # SF 44 vs 41 (ASR WER 52 vs 48); better warm-ups (rank 16, or a stronger stage 1) came before
    # worse multi-task stages (docs/demo_experiments.md).
    "full": dict(wavlm_steps=800, t5_steps=(550, 550), stage_steps=(1100, 100, 950), batch_size=16, vocab=1000,
                 wavlm_hidden=192, wavlm_layers=4, conv=64, t5_width=192, t5_layers=3,
                 audio_buckets=(2.0, 4.0, 6.0)),
    "quick": dict(wavlm_steps=20, t5_steps=(15, 15), stage_steps=(6, 4, 10), batch_size=8, vocab=200,
                  wavlm_hidden=64, wavlm_layers=2, conv=32, t5_width=64, t5_layers=2, audio_buckets=(6.0,)),
}


def get_config(profile="full"):
    p = PROFILES[profile or "full"]
    config = ml_collections.ConfigDict()
    config.profile = profile or "full"
    config.seed = 0
    config.backbones = dict(
        wavlm=dict(hidden_size=p["wavlm_hidden"], num_hidden_layers=p["wavlm_layers"], num_attention_heads=4,
                   intermediate_size=p["wavlm_hidden"] * 8 // 3, conv_dim=[p["conv"]] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                   conv_bias=False, feat_extract_norm="layer", do_stable_layer_norm=True,
                   num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8, num_buckets=64,
                   max_bucket_distance=200),
        t5=dict(d_model=p["t5_width"], d_kv=p["t5_width"] // 4, d_ff=p["t5_width"] * 8 // 3, num_layers=p["t5_layers"],
                num_decoder_layers=p["t5_layers"], num_heads=4,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
                relative_attention_max_distance=64, dropout_rate=0.0),
        vocab_size=p["vocab"],
        wavlm_steps=p["wavlm_steps"],
        wavlm_batch=8,
        wavlm_max_seconds=4.0,  # CTC sees clips up to this long (about 96% of the corpus)
        # the T5 reads an endless stream of text tasks over the train sentences (demo/backbones.py
        # TextTasks), no dropout, nothing repeats. Phase 1 is copying alone (dev copy WER 8% after
        # 600 steps; mixed with the other tasks from the start it was 41% after 2,000), phase 2 the
        # mix, still mostly copying, so the T5 keeps reading its input.
        t5_phases=[dict(steps=p["t5_steps"][0], tasks=dict(copy=0.5, copy_random=0.3, copy_stretched=0.2)),
                   dict(steps=p["t5_steps"][1], tasks=dict(copy=0.3, copy_random=0.15, copy_stretched=0.15, ic=0.1,
                                                           sf=0.09, kws=0.08, kwe=0.05, open=0.04, joint=0.04))],
        t5_batch=32,
        t5_lr=2e-3,
        text_check=("asr", "ic", "kws", "kwe", "sf") if profile != "quick" else ("asr",),  # T5 alone on dev text
    )
    config.order = list(config_lib.STAGES)
    for stage, steps in zip(config_lib.STAGES, p["stage_steps"]):
        s = config_lib.stage_config(stage, model_kwargs=dict(layer_combination="weighted", strides=(2, 2),
                                                             lora_rank=8), max_steps=steps,
                                    lr=3e-3 if stage == "stage1" else 2e-3, warmup_steps=max(steps // 10, 1),
                                    batch_size=p["batch_size"])
        s.model.lora.alpha = 16.0
        # LoRA on every linear map of the tiny T5, not only q and v (the paper's XL layout): on
        # this 192-wide T5, measured from the same stage 1, warm-up val loss 0.69 -> 0.60,
        # multi-task val 0.96 -> 0.77, test IC 29% -> 55%, SNS 68% -> 93%. It doubles the CPU
        # step time (0.30 -> 0.59 s multi-task), so the step budgets above are smaller; no LoRA
        # dropout (0.05 cost 14% of the step for 54 dropout masks).
        s.model.lora.target_regex = DEMO_LORA_TARGETS
        s.model.lora.dropout = 0.0
        s.train.log_every = max(steps // 50, 1)
        s.train.eval_every = max(steps // 3, 1)
        s.train.checkpoint_every = max(steps // 3, 1)
        s.train.early_stopping_patience = 0  # fixed budgets on CPU
        s.data.audio_buckets_seconds = p["audio_buckets"]
        s.data.max_audio_seconds = 6.0
        s.data.instruction_buckets = (32, 64, 128, 256)
        s.data.target_buckets = (16, 32, 64)
        s.data.max_target_tokens = 64
        s.data.bucket_window = 8
        s.data.read_threads = 0
        config[stage] = s
    return config
