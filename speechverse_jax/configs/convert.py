"""`speechverse-jax convert`: HF WavLM + T5 (or decoder-only LLM) folders -> one converted base checkpoint folder.

    speechverse-jax convert --wavlm hf/wavlm-large --t5 hf/flan-t5-xl --out checkpoints/base --verify

Each flag is short for `--config.<name>=value` on this config.
"""

import ml_collections


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        wavlm="",  # HF WavLM folder (config.json + safetensors or .bin)
        t5="",  # HF T5 folder (config.json + weights [+ tokenizer])
        llm="",  # instead of t5: an HF Llama 3.x / Qwen2 / Gemma 2 / Gemma 3 causal-LM folder
        out="",  # output folder (local or gs://)
        dtype="float32",  # storage dtype of the frozen weights: float32 | bfloat16
        verify=False,  # compare against the HF PyTorch models (needs torch)
        report="",  # write the verification / conversion report as JSON here
        tolerance=1e-4,  # max allowed float32 relative difference
        overwrite=False,  # replace OUT if it exists
    ))
