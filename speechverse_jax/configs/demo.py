"""The CPU demo: the shipped tiny backbones and the paper's three-stage curriculum on an espeak corpus.

    speechverse-jax demo                                   # profile 'full'
    speechverse-jax demo --config demo:quick               # the CI smoke profile (a few minutes)
    speechverse-jax demo --config.stage2_multitask.train.max_steps=500 --config.corpus.sizes.train.ic=600
    speechverse-jax demo --pretrain-backbones              # run the backbones recipe (demo_backbones) first
    speechverse-jax demo --config.layout=decoder --out outputs/demo_decoder   # the decoder-only LLM layout

`get_config(profile)` returns the whole demo: the corpus (examples per split and task), where the
backbones come from, then a curriculum config (same shape as the `curriculum` config) whose stages
the demo runs with cached encoder states. The backbones' architectures and pretraining budgets are
the `demo_backbones` config's (`speechverse-jax demo-backbones`). Every field takes a
`--config.a.b=value` override. Why each budget is what it is: docs/demo_experiments.md.
"""

import ml_collections

from speechverse_jax.configs import common

# every linear map of the LLM: the T5's (wi_0 / wi_1 / wo) and the decoder-only LM's (gate / up / down)
DEMO_LORA_TARGETS = r".*/(self_attention|cross_attention|mlp)/(q|k|v|o|wi_0|wi_1|wo|gate|up|down)"
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
        "dev": {t: 2 for t in DEMO_TASKS},  # validation only: 18 clips, 3 batches
        "test": {t: 6 for t in DEMO_TASKS},
    },
}

# The robustness splits (demo/corpus.py plan_robust): test sentences in voices beyond the corpus's
# ranges, and ASR / KWS / KWE on test sentences with shuffled word orders. Evaluated, never trained on.
ROBUST_SIZES = {
    "full": {"robust_voices": {t: 40 for t in DEMO_TASKS}, "robust_order": {"asr": 40, "kws": 40, "kwe": 40}},
    "quick": {"robust_voices": {"asr": 2, "ic": 2, "sc": 2}, "robust_order": {"asr": 2, "kws": 2}},
}

PROFILES = {
    # steps of stage1, stage2_warmup, stage2_multitask (each budget measured: docs/demo_experiments.md).
    "full": dict(stage_steps=(1100, 100, 2000), batch_size=16, audio_buckets=(2.0, 4.0, 6.0),
                 instruction_buckets=(32, 64, 128, 256), target_buckets=(16, 32, 64)),
    # the smoke profile (the test suite runs it): one padded shape per stage, as each further bucket
    # is another train-step compilation, and the two stage-2 stages the same length, so their train
    # steps are one program (compiled once under a persistent compilation cache, as in the tests)
    "quick": dict(stage_steps=(6, 6, 6), batch_size=8, audio_buckets=(6.0,), instruction_buckets=(256,),
                  target_buckets=(64,)),
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
    config.corpus = dict(sizes=CORPUS_SIZES[profile], robust_sizes=ROBUST_SIZES[profile], workers=2)
    # dir: a backbones release folder (demo/shipped.py layout); "" is the one shipped in the package.
    # pretrain: run the demo_backbones recipe (this profile, this seed) and convert its release instead.
    config.backbones = dict(dir="", pretrain=False)
    # the LLM of the release the demo trains on: 't5' (the paper's Flan-T5 layout) or 'decoder' (the
    # release's Llama-style decoder-only LM, audio in its chat prompt); each converts to its own base
    config.layout = "t5"
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
        s.data.instruction_buckets = p["instruction_buckets"]
        s.data.target_buckets = p["target_buckets"]
        s.data.max_target_tokens = 64
        s.data.bucket_window = 8
        s.data.read_threads = 0
        config[stage] = s
    return config
