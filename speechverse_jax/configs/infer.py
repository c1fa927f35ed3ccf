"""`speechverse-jax infer`: answer an instruction about audio files.

    speechverse-jax infer --checkpoint runs/wlm/stage2_multitask --audio a.wav b.flac \\
        --instruction "What is the intent of the speaker?" --task ic --beams 4

Each flag is short for `--config.<name>=value` on this config (lists are comma-separated there).
"""

import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        checkpoint="",  # a training run folder (or a converted base folder: adaptor at init)
        audio="",  # audio files, comma-separated (any format; resampled to 16 kHz)
        instruction="",
        labels="",  # restrict the answer to these labels: 'a,b,c' or a file with one per line
        task="",  # a task name whose label set constrains the answer (e.g. ic, sns)
        beams=1,
        max_new_tokens=64,
        json=False,  # one JSON object per line
    ))
