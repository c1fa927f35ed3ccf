"""The logit checker: run the HF PyTorch models and ours on the same random inputs and compare.

Needs torch (a verification-only dependency). Inputs include padding, so masks are exercised.
Relative difference = max |ours - HF| / max |HF| over the valid (unpadded) positions.
"""

from __future__ import annotations

from typing import Dict, List

import jax.numpy as jnp
import numpy as np

from speechverse_jax.models.t5 import T5, T5Config
from speechverse_jax.models.wavlm import WavLM, WavLMConfig, feature_lengths


def _torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError("--verify runs the Hugging Face PyTorch models and needs torch: "
                           "pip install torch==2.13.0 (or pip install -e .[test])") from None
    return torch


def _without_grad(fn):
    """Run `fn` under torch.no_grad() (a scope, so the caller's autograd state is left as it was)."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _torch().no_grad():
            return fn(*args, **kwargs)

    return wrapped


def compare(name: str, ours: np.ndarray, ref: np.ndarray, tolerance: float) -> Dict:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"tensor": name, "ok": False, "error": f"shape {ours.shape} vs HF {ref.shape}"}
    max_abs = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    finite = bool(np.all(np.isfinite(ours)))
    return {"tensor": name, "shape": list(ref.shape), "max_abs": max_abs, "max_rel": max_rel,
            "ok": finite and max_rel <= tolerance}


@_without_grad
def verify_wavlm(hf_dir: str, cfg: WavLMConfig, params, tolerance: float = 1e-4, seed: int = 0,
                 seconds=(1.0, 0.55)) -> List[Dict]:
    """Every hidden state of HF `WavLMModel` vs ours on a padded batch of random audio."""
    torch = _torch()
    import transformers

    model = transformers.WavLMModel.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    rng = np.random.default_rng(seed)
    lengths = [int(s * 16000) for s in seconds]
    audio = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros_like(audio, dtype=np.int32)
    for i, n in enumerate(lengths):
        audio[i, :n] = rng.standard_normal(n).astype(np.float32) * 0.1
        mask[i, :n] = 1
    ref = model(torch.from_numpy(audio), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    params32 = _to_float32(params)
    ours = WavLM(cfg).apply({"params": params32}, jnp.asarray(audio), jnp.asarray(mask))
    frames = np.asarray(feature_lengths(cfg, np.array(lengths)))
    results = []
    for layer, (o, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        o, r = np.asarray(o), r.numpy()
        valid = np.concatenate([o[i, : frames[i]] for i in range(len(lengths))])
        valid_ref = np.concatenate([r[i, : frames[i]] for i in range(len(lengths))])
        results.append(compare(f"wavlm.hidden_states[{layer}]", valid, valid_ref, tolerance))
    if len(ours.hidden_states) != len(ref.hidden_states):
        results.append({"tensor": "wavlm.hidden_states", "ok": False,
                        "error": f"{len(ours.hidden_states)} hidden states vs HF {len(ref.hidden_states)}"})
    return results


@_without_grad
def verify_t5(hf_dir: str, cfg: T5Config, params, tolerance: float = 1e-4, seed: int = 0,
              enc_lengths=(12, 7), dec_lengths=(6, 4)) -> List[Dict]:
    """Encoder output and logits of HF `T5ForConditionalGeneration` vs ours, padded batch."""
    torch = _torch()
    import transformers

    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    rng = np.random.default_rng(seed)
    b = len(enc_lengths)
    ids = rng.integers(2, cfg.vocab_size, (b, max(enc_lengths))).astype(np.int64)
    enc_mask = (np.arange(ids.shape[1])[None] < np.array(enc_lengths)[:, None]).astype(np.int64)
    ids = ids * enc_mask
    dec = rng.integers(2, cfg.vocab_size, (b, max(dec_lengths))).astype(np.int64)
    dec[:, 0] = cfg.decoder_start_token_id
    dec_mask = (np.arange(dec.shape[1])[None] < np.array(dec_lengths)[:, None]).astype(np.int64)
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(enc_mask),
                decoder_input_ids=torch.from_numpy(dec), decoder_attention_mask=torch.from_numpy(dec_mask))
    params32 = _to_float32(params)
    t5 = T5(cfg)
    variables = {"params": params32}
    emb = t5.apply(variables, jnp.asarray(ids, jnp.int32), method=T5.embed)
    enc = t5.apply(variables, emb, jnp.asarray(enc_mask, bool), method=T5.encode)
    logits = t5.apply(variables, jnp.asarray(dec, jnp.int32), enc, jnp.asarray(enc_mask, bool),
                      decoder_mask=jnp.asarray(dec_mask, bool), method=T5.decode)
    enc_valid = enc_mask.astype(bool)
    dec_valid = dec_mask.astype(bool)
    return [
        compare("t5.encoder_output", np.asarray(enc)[enc_valid], ref.encoder_last_hidden_state.numpy()[enc_valid], tolerance),
        compare("t5.logits", np.asarray(logits)[dec_valid], ref.logits.numpy()[dec_valid], tolerance),
    ]


def _to_float32(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
