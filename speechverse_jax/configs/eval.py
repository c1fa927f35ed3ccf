"""`speechverse-jax eval`: generate on manifests and score every task.

    speechverse-jax eval --checkpoint runs/wlm/stage2_multitask --manifest data/test.jsonl \\
        --split both --constrained both --out outputs/eval

Each flag is short for `--config.<name>=value` on this config (lists are comma-separated there).
"""

import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        checkpoint="",  # a training run folder
        manifest="",  # manifests, comma-separated
        out="outputs/eval",  # folder for predictions.jsonl and metrics.{json,md}
        split="seen",  # instruction wordings: seen | unseen | both
        constrained="no",  # label-constrained decoding: no | yes | both
        joint=False,  # joint decoding: transcript first, then the answer
        tasks="",  # only these tasks (comma-separated; '' = all)
        beams=1,
        max_new_tokens=64,
        batch_size=16,
        strict=False,  # stop at the first bad row (exit 2) instead of skipping and counting it
    ))
