"""The checker for decoder-only LMs: every hidden state and the logits of HF (eager attention,
float32) vs ours on a padded batch, in `convert/verify.py`'s report format. Needs torch.

The batch holds one left-padded and one right-padded row (plus an unpadded one), so masks,
position ids that skip pads, and sliding windows are all exercised. Only real tokens are compared.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.convert.verify import _torch, _without_grad, compare
from speechverse_jax.models.decoder_lm import DecoderLM, DecoderLMConfig


def padded_batch(cfg: DecoderLMConfig, lengths: Sequence[int], left: Sequence[bool], seed: int = 0):
    """Random ids `[b, t]` (pads = pad id or 0), mask `[b, t]` and position ids skipping pads."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), cfg.pad_token_id or 0, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, (n, is_left) in enumerate(zip(lengths, left)):
        span = slice(t - n, t) if is_left else slice(0, n)
        ids[i, span] = rng.integers(3, cfg.vocab_size, n)
        mask[i, span] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    return ids, mask, positions


def hf_model(hf_dir: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()


@_without_grad
def verify_decoder_lm(hf_dir: str, cfg: DecoderLMConfig, params, tolerance: float = 1e-4, seed: int = 0,
                      lengths=(11, 7, 9), left=(False, True, False), prefix: str = "llm") -> List[Dict]:
    """[compare(...)] for `{prefix}.hidden_states[i]` (HF's layout: embeddings, after each layer,
    the last one normed) and `{prefix}.logits`, real tokens only."""
    torch = _torch()
    model = hf_model(hf_dir)
    ids, mask, positions = padded_batch(cfg, lengths, left, seed)
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions), output_hidden_states=True)
    params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    ours = DecoderLM(cfg).apply({"params": params32}, input_ids=jnp.asarray(ids, jnp.int32),
                                attention_mask=jnp.asarray(mask, bool), position_ids=jnp.asarray(positions, jnp.int32),
                                output_hidden_states=True)
    valid = mask.astype(bool)
    results = []
    for i, (o, r) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        results.append(compare(f"{prefix}.hidden_states[{i}]", np.asarray(o)[valid], r.numpy()[valid], tolerance))
    if len(ours.hidden_states) != len(ref.hidden_states):
        results.append({"tensor": f"{prefix}.hidden_states", "ok": False,
                        "error": f"{len(ours.hidden_states)} hidden states vs HF {len(ref.hidden_states)}"})
    results.append(compare(f"{prefix}.logits", np.asarray(ours.logits)[valid], ref.logits.numpy()[valid], tolerance))
    return results
