"""Model FLOPs of one train step, counted from the architecture, and model FLOPs utilisation.

Counted: every matmul and convolution (2 FLOPs per multiply-add) over the padded shapes the step
computes; norms, softmax and element-wise work are left out, as usual for MFU. What a step runs:

- WavLM (frozen): forward only. No gradient flows into it.
- Downsampler (trainable): forward, weight gradients of every block, input gradients of every
  block but the first (its input is the frozen encoder's output).
- T5 (frozen, with LoRA): forward; backward computes input gradients only (one matmul per frozen
  weight matmul, two per activation-activation matmul in attention), no frozen weight gradients.
- Decoder-only LLM (layout 'decoder', frozen, with LoRA): the same rule over the packed sequence
  `[prefix | audio | instruction | answer]` (every layer's matmuls and full T x T attention: the
  masks are applied to a dense score matrix, sliding-window layers included); the LM head runs only
  on the answer positions (`SpeechVerseDecoder.from_hidden_states` gathers them first).
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
    d, t, f = cfg.hidden_size, n, cfg.intermediate_size
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


def _decoder_lora_targets(target_regex: str) -> set:
    """The LLM projections the regex adapts, matched against the model's own module paths."""
    pattern = re.compile(target_regex)
    names = ("self_attention/q", "self_attention/k", "self_attention/v", "self_attention/o",
             "mlp/gate", "mlp/up", "mlp/down")
    return {n for n in names if pattern.fullmatch(f"llm/layers_0/{n}")}


def decoder_lm_step(cfg, batch: int, seq_len: int, answer_len: int, lora_rank: int,
                    lora_regex: str) -> Dict[str, float]:
    """Decoder-only LLM FLOPs of a train step (`seq_len` packed positions, the LM head on
    `answer_len` of them), split into forward, backward and LoRA (forward + backward)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    b, t, n = batch, seq_len, cfg.num_hidden_layers
    shapes = {"self_attention/q": (d, q_out), "self_attention/k": (d, kv_out), "self_attention/v": (d, kv_out),
              "self_attention/o": (q_out, d), "mlp/gate": (d, f), "mlp/up": (d, f), "mlp/down": (f, d)}
    weight = n * sum(2 * b * t * i * o for i, o in shapes.values())
    attn = n * 2 * 2 * b * t * t * q_out  # scores and weighted values, every query head
    head = 2 * b * answer_len * d * v
    lora = 0.0
    if lora_rank:
        lora = n * sum(2 * b * t * lora_rank * sum(shapes[p]) for p in _decoder_lora_targets(lora_regex))
    return {"forward": weight + attn + head, "backward": weight + head + 2 * attn, "lora": 3 * lora}


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


def is_decoder_layout(cfg) -> bool:
    return hasattr(cfg, "llm")


def train_step_flops(cfg: SpeechVerseConfig, batch: int, audio_samples: int, instruction_len: int,
                     target_len: int, audio_frames: Optional[int] = None, prefix_len: int = 0) -> Dict[str, float]:
    """Model FLOPs of one train step over the whole global batch, by part.

    Shapes are the padded ones: audio `[batch, audio_samples]` (or cached encoder states with
    `audio_frames` frames, then the encoder is not run: pass `audio_samples=0`), instruction
    `[batch, instruction_len]`, target `[batch, target_len]`; the decoder-only layout also has the
    prompt before the audio, `[batch, prefix_len]`.

    Keys: wavlm_forward, layer_weights, downsampler, lora, total, and t5_forward / t5_backward (layout
    't5') or llm_forward / llm_backward (layout 'decoder').
    """
    frames = audio_frames if audio_frames is not None else wavlm_frames(cfg.wavlm, audio_samples)
    out = {"wavlm_forward": wavlm_forward(cfg.wavlm, batch, audio_samples) if audio_samples else 0.0}
    layers = cfg.wavlm.num_hidden_layers
    out["layer_weights"] = 0.0 if cfg.layer_combination == "last" else 4.0 * batch * frames * cfg.wavlm.hidden_size * layers
    decoder = is_decoder_layout(cfg)
    width = cfg.llm.hidden_size if decoder else cfg.t5.d_model
    ds = downsampler_step(cfg.wavlm.hidden_size, width, batch, frames, tuple(cfg.downsample_strides), cfg.downsample_kernel)
    out["downsampler"] = ds["forward"] + ds["backward"]
    audio_tokens = frames
    for s in cfg.downsample_strides:
        audio_tokens = -(-audio_tokens // s)
    rank = cfg.lora.rank if cfg.lora is not None else 0
    regex = cfg.lora.target_regex if cfg.lora is not None else ""
    if decoder:
        llm = decoder_lm_step(cfg.llm, batch, prefix_len + audio_tokens + instruction_len + target_len, target_len,
                              rank, regex)
        out["llm_forward"], out["llm_backward"], out["lora"] = llm["forward"], llm["backward"], llm["lora"]
    else:
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
