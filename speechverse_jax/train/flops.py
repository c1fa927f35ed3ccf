"""Model FLOPs of one train step, counted from the architecture, and model FLOPs utilisation.

Counted: every matmul and convolution (2 FLOPs per multiply-add) over the padded shapes the step
computes; norms, softmax and element-wise work are left out, as usual for MFU. What a step runs:

- WavLM (frozen): forward only. No gradient flows into it.
- Downsampler (trainable): forward, weight gradients of every block, input gradients of every
  block but the first (its input is the frozen encoder's output).
- T5 (frozen, with LoRA): forward; backward computes input gradients only (one matmul per frozen
  weight matmul, two per activation-activation matmul in attention), no frozen weight gradients.
- LoRA: forward, plus both its weight gradients and its input gradient (2x its forward).
- The learnable layer weights (Eq. 1): a weighted sum, counted (forward and backward).

`xla_flops` of `train --compile-only` counts what XLA compiles, which also has the element-wise work
and any recomputation; the README compares the two.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

from speechverse_jax.models.speechverse import SpeechVerseConfig

# Dense peak FLOP/s per device for bf16 matmuls (vendor figures, no sparsity). CPU is measured.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,  # SXM; PCIe is 756e12
    "NVIDIA H200": 989e12,
}


def _conv_out(n: int, kernel: int, stride: int) -> int:
    return (n - kernel) // stride + 1


def wavlm_frames(cfg, samples: int) -> int:
    """Frames the feature extractor makes from `samples` (no padding, as WavLM's convs)."""
    n = samples
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        n = _conv_out(n, k, s)
    return n


def wavlm_forward(cfg, batch: int, samples: int) -> float:
    flops, n, c_in = 0.0, samples, 1
    for c_out, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        n = _conv_out(n, k, s)
        flops += 2 * batch * n * c_in * c_out * k
        c_in = c_out
    d, t, f, h = cfg.hidden_size, n, cfg.intermediate_size, cfg.num_attention_heads
    flops += 2 * batch * t * c_in * d  # feature projection
    flops += 2 * batch * t * d * (d // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    per_layer = (4 * 2 * batch * t * d * d  # q, k, v, out
                 + 2 * 2 * batch * t * t * d  # scores and weighted values
                 + 2 * batch * t * d * 8  # gated relative position: per head d_head -> 8
                 + 2 * 2 * batch * t * d * f)  # feed-forward
    return flops + cfg.num_hidden_layers * per_layer


def _lora_targets(target_regex: str) -> Dict[str, set]:
    """Which projections carry LoRA, per attention kind, by matching the regex as the model does."""
    pattern = re.compile(target_regex)
    out = {}
    for stack, kind in (("encoder", "self_attention"), ("decoder", "self_attention"), ("decoder", "cross_attention")):
        out[f"{stack}/{kind}"] = {p for p in "qkvo" if pattern.fullmatch(f"t5/{stack}/block_0/{kind}/{p}")}
    return out


def t5_step(cfg, batch: int, source_len: int, target_len: int, lora_rank: int, lora_regex: str) -> Dict[str, float]:
    """T5 FLOPs of a train step, split into forward, backward and LoRA (forward + backward)."""
    d, inner, f, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    ffn_mats = 3 if cfg.feed_forward_proj.startswith("gated") else 2
    b, s, t = batch, source_len, target_len
    targets = _lora_targets(lora_regex) if lora_rank else {}
    weight = attn = lora = 0.0

    def attention(kind, q_len, kv_len, layers):
        nonlocal weight, attn, lora
        rows = {"q": q_len, "k": kv_len, "v": kv_len, "o": q_len}
        weight += layers * sum(2 * b * n * d * inner for n in rows.values())
        attn += layers * 2 * 2 * b * q_len * kv_len * inner
        for p in targets.get(kind, ()):
            lora += layers * 2 * b * rows[p] * lora_rank * (d + inner)

    attention("encoder/self_attention", s, s, cfg.num_layers)
    weight += cfg.num_layers * ffn_mats * 2 * b * s * d * f
    attention("decoder/self_attention", t, t, cfg.num_decoder_layers)
    attention("decoder/cross_attention", t, s, cfg.num_decoder_layers)
    weight += cfg.num_decoder_layers * ffn_mats * 2 * b * t * d * f
    weight += 2 * b * t * d * v  # lm head
    forward = weight + attn
    return {"forward": forward, "backward": weight + 2 * attn, "lora": 3 * lora}


def downsampler_step(in_dim: int, out_dim: int, batch: int, frames: int, strides, kernel: int) -> Dict[str, float]:
    forward = backward = 0.0
    n, c_in = frames, in_dim
    for i, s in enumerate(strides):
        n = -(-n // s)
        block = 2 * batch * n * c_in * out_dim * kernel
        forward += block
        backward += block * (2 if i else 1)  # weight gradient; input gradient except for the first block
        c_in = out_dim
    return {"forward": forward, "backward": backward}


def train_step_flops(cfg: SpeechVerseConfig, batch: int, audio_samples: int, instruction_len: int,
                     target_len: int, audio_frames: Optional[int] = None) -> Dict[str, float]:
    """Model FLOPs of one train step over the whole global batch, by part.

    Shapes are the padded ones: audio `[batch, audio_samples]` (or cached encoder states with
    `audio_frames` frames, then the encoder is not run: pass `audio_samples=0`), instruction
    `[batch, instruction_len]`, target `[batch, target_len]`.
    """
    frames = audio_frames if audio_frames is not None else wavlm_frames(cfg.wavlm, audio_samples)
    out = {"wavlm_forward": wavlm_forward(cfg.wavlm, batch, audio_samples) if audio_samples else 0.0}
    layers = cfg.wavlm.num_hidden_layers
    out["layer_weights"] = 0.0 if cfg.layer_combination == "last" else 4.0 * batch * frames * cfg.wavlm.hidden_size * layers
    ds = downsampler_step(cfg.wavlm.hidden_size, cfg.t5.d_model, batch, frames, tuple(cfg.downsample_strides), cfg.downsample_kernel)
    out["downsampler"] = ds["forward"] + ds["backward"]
    audio_tokens = frames
    for s in cfg.downsample_strides:
        audio_tokens = -(-audio_tokens // s)
    rank = cfg.lora.rank if cfg.lora is not None else 0
    regex = cfg.lora.target_regex if cfg.lora is not None else ""
    t5 = t5_step(cfg.t5, batch, audio_tokens + instruction_len, target_len, rank, regex)
    out["t5_forward"], out["t5_backward"], out["lora"] = t5["forward"], t5["backward"], t5["lora"]
    out["total"] = sum(out.values())
    return out


def peak_flops_per_device(device=None, measure_cpu: bool = True) -> Optional[float]:
    """The table's figure for the device kind; on CPU a measured float32 matmul rate (or None)."""
    import jax

    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", ""))
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return peak
    if device.platform == "cpu" and measure_cpu:
        return measure_matmul_flops()
    return None


def measure_matmul_flops(n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a jitted float32 `[n, n] @ [n, n]` on the default device (best of a few runs)."""
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
