"""The `config.train`, `config.optim` and `config.mesh` sections (their defaults live here) and the
curriculum stages' trainable-param rules."""

from __future__ import annotations

import ml_collections

from speechverse_jax.train.partitioning import DEFAULT_RULES

# Which params train, per curriculum stage: ordered (regex, label) over param paths, matched with
# re.fullmatch; the first match wins, every param must be matched and every rule must match
# something (speechverse_jax/rules.py). layer_weights exist only with layer_combination='weighted',
# so they share a rule with the downsampler, which always exists. The LLM is `t5/` in the T5
# layout and `llm/` in the decoder-only one (models/composed.py): the same rules serve both.
RULES_STAGE1 = (
    (r"(downsampler|layer_weights)/.*", "train"),
    (r"(wavlm|t5|llm)/.*", "freeze"),
)
RULES_STAGE2 = (
    (r"(t5|llm)/.*/lora_[ab]", "train"),
    (r"(downsampler|layer_weights)/.*", "train"),
    (r"(wavlm|t5|llm)/.*", "freeze"),
)


def train_config(max_steps: int = 10000, lr: float = 1e-3, warmup_steps: int = 100,
                 rules=RULES_STAGE1) -> ml_collections.ConfigDict:
    """`config.train`, `config.optim` and `config.mesh` sections with the paper's defaults
    (AdamW, peak 1e-3, 100 warm-up steps for the WavLM model). The batch size is `data.batch_size`."""
    return ml_collections.ConfigDict(dict(
        train=dict(
            seed=0,
            accum_steps=1,  # micro-batches per update (data.batch_size must divide by it)
            max_steps=max_steps,
            param_rules=[list(r) for r in rules],
            init_from="",  # previous stage run folder: its best checkpoint's trainable params
            log_every=10,
            log_mfu=True,  # model FLOPs utilisation in the train log (analytic FLOPs / device peak)
            eval_every=500,
            checkpoint_every=500,
            keep_checkpoints=3,
            early_stopping_patience=5,  # evaluations without val improvement (paper: 5 epochs); 0 = off
            max_consecutive_skips=10,  # non-finite steps in a row before the run stops
            tensorboard=True,
        ),
        # total_steps: the schedule's length; 0 follows train.max_steps (an override of max_steps
        # stretches the schedule with it; a set value lets a run stop early on a longer schedule)
        optim=dict(lr=lr, warmup_steps=warmup_steps, total_steps=0, decay="cosine", final_lr_fraction=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0),
        # topology: the TPU topology a slice preset targets (compile-only checks), e.g. "v5e:4x4".
        mesh=dict(data=-1, fsdp=1, tensor=1, rules=[list(r) for r in DEFAULT_RULES], topology=""),
    ))
