"""The CPU demo: tiny pretrained backbones and the paper's three-stage curriculum on an espeak corpus.

    speechverse-jax demo                                   # profile 'full' (about 30 minutes on 2 cores)
    speechverse-jax demo --config demo:quick               # the CI smoke profile (a few minutes)
    speechverse-jax demo --config.stage2_multitask.train.max_steps=500 --config.corpus.sizes.train.ic=600

`get_config(profile)` returns the whole demo: the corpus (examples per split and task), backbone
sizes and pretraining budgets, then a curriculum config (same shape as the `curriculum` config)
whose stages the demo runs with cached encoder states. Every field takes a `--config.a.b=value`
override. Why each budget is what it is: docs/demo_experiments.md.
"""

import ml_collections

from speechverse_jax.configs import common

DEMO_LORA_TARGETS = r".*/(self_attention|cross_attention|mlp)/(q|k|v|o|wi_0|wi_1|wo)"
DEMO_TASKS = ("asr", "ic", "sf", "kws", "kwe", "ac", "sc", "sns", "open")

# Examples per split and task of the espeak corpus.
CORPUS_SIZES = {
    "full": {
        "train": {"asr": 600, "ic": 420, "sf": 420, "kws": 360, "kwe": 360, "ac": 400, "sc": 320,
                  "sns": 320, "open": 300},
        "dev": {t: 35 for t in DEMO_TASKS},
        "test": {t: 56 for t in DEMO_TASKS},
    },
    "quick": {
        "train": {t: 20 for t in DEMO_TASKS},
        "dev": {t: 4 for t in DEMO_TASKS},
        "test": {t: 6 for t in DEMO_TASKS},
    },
}

PROFILES = {
    # steps: WavLM CTC, T5 text pretraining (copying alone, then the task mix), stage1,
    # stage2_warmup, stage2_multitask (each budget measured: docs/demo_experiments.md).
    "full": dict(wavlm_steps=800, t5_steps=(550, 550), stage_steps=(1100, 100, 950), batch_size=16, vocab=1000,
                 wavlm_hidden=192, wavlm_layers=4, conv=64, t5_width=192, t5_layers=3,
                 audio_buckets=(2.0, 4.0, 6.0)),
    "quick": dict(wavlm_steps=20, t5_steps=(15, 15), stage_steps=(6, 4, 10), batch_size=8, vocab=200,
                  wavlm_hidden=64, wavlm_layers=2, conv=32, t5_width=64, t5_layers=2, audio_buckets=(6.0,)),
}


def get_config(profile="full"):
    profile = profile or "full"
    if profile not in PROFILES:
        raise ValueError(f"demo profile must be one of {sorted(PROFILES)}, got {profile!r}")
    p = PROFILES[profile]
    config = ml_collections.ConfigDict()
    config.profile = profile
    config.out = "outputs/demo"  # output folder (--out DIR)
    config.seed = 0
    config.corpus = dict(sizes=CORPUS_SIZES[profile], workers=2)
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
        # text pretraining phases: copying alone, then the task mix (docs/demo_experiments.md)
        t5_phases=[dict(steps=p["t5_steps"][0], tasks=dict(copy=0.5, copy_random=0.3, copy_stretched=0.2)),
                   dict(steps=p["t5_steps"][1], tasks=dict(copy=0.3, copy_random=0.15, copy_stretched=0.15, ic=0.1,
                                                           sf=0.09, kws=0.08, kwe=0.05, open=0.04, joint=0.04))],
        t5_batch=32,
        t5_lr=2e-3,
        text_check=("asr", "ic", "kws", "kwe", "sf") if profile != "quick" else ("asr",),  # T5 alone on dev text
    )
    # the curriculum's shared fields (the demo fills them in: its corpus and converted backbones)
    config.base_checkpoint = ""
    config.data = dict(train_manifests="", eval_manifests="", tokenizer="")
    config.order = list(common.STAGES)
    for stage, steps in zip(common.STAGES, p["stage_steps"]):
        s = common.stage_config(stage, model_kwargs=dict(layer_combination="weighted", strides=(2, 2),
                                                             lora_rank=8), max_steps=steps,
                                    lr=3e-3 if stage == "stage1" else 2e-3, warmup_steps=max(steps // 10, 1),
                                    batch_size=p["batch_size"])
        s.model.lora.alpha = 16.0
        # LoRA on every linear map of the tiny T5, no LoRA dropout (docs/demo_experiments.md)
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
