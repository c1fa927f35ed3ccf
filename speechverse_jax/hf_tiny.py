"""Tiny random Hugging Face backbones, saved the way `save_pretrained` does (needs torch).

Nothing can be downloaded from a model hub here, so tests and the demo build their own models
with transformers + torch and go through the same conversion path as real weights.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence

TINY_WAVLM = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32, 32, 32),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_buckets=32,
    max_bucket_distance=64,
)

TINY_T5 = dict(
    vocab_size=128,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def _torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError(
            "building reference Hugging Face models needs torch: pip install torch==2.13.0"
        ) from None
    return torch


def save_wavlm(out_dir: str, family: str = "large", seed: int = 0, **overrides) -> str:
    """A random `WavLMModel`: family 'base' (group norm, post-LN) or 'large' (layer norm, pre-LN)."""
    torch = _torch()
    import transformers

    if family not in ("base", "large"):
        raise ValueError(f"family must be 'base' or 'large', got {family!r}")
    kw = dict(TINY_WAVLM)
    kw.update(
        feat_extract_norm="group" if family == "base" else "layer",
        do_stable_layer_norm=family == "large",
        conv_bias=family == "large",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.WavLMModel(transformers.WavLMConfig(**kw)).eval()
    _randomize_norms(model, torch)
    model.save_pretrained(out_dir)
    return out_dir


def save_t5(
    out_dir: str,
    flan: bool = True,
    seed: int = 0,
    max_shard_size: Optional[str] = None,
    spiece_model: Optional[str] = None,
    **overrides,
) -> str:
    """A random `T5ForConditionalGeneration`.

    flan=True: gated-gelu with an untied lm_head (Flan-T5 / T5 v1.1); False: relu with tied
    embeddings and the d_model**-0.5 output scaling (T5 v1.0). `spiece_model` is copied in with
    a tokenizer config so the folder also carries a tokenizer.
    """
    torch = _torch()
    import transformers

    kw = dict(TINY_T5)
    kw.update(feed_forward_proj="gated-gelu" if flan else "relu", tie_word_embeddings=not flan)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()
    if flan:
        # transformers 5 ties lm_head to the embedding even when the config says untied:
        # give it its own weight, as Flan-T5 checkpoints have.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    _randomize_norms(model, torch)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if spiece_model:
        # T5Tokenizer(vocab_file=...) silently builds a 4-token vocabulary; from_pretrained on a
        # folder holding spiece.model loads the real one.
        shutil.copy(spiece_model, os.path.join(out_dir, "spiece.model"))
        tok = transformers.T5Tokenizer.from_pretrained(out_dir, extra_ids=0, legacy=False)
        tok.save_pretrained(out_dir)
    return out_dir


def _randomize_norms(model, torch) -> None:
    """Fresh models have unit norm scales: perturb them so the parity tests see them used."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "final_layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def train_spiece(texts: Sequence[str], out_dir: str, vocab_size: int = 128, character_coverage: float = 1.0) -> str:
    """A T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) trained on `texts`."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        model_type="unigram",
        # every character of the texts gets a piece: at the default 0.9995 a rare one such as the
        # '-' of 'non-speech' became <unk>, and a label holding it could never be written
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix + ".model"


# ---- decoder-only LMs ------------------------------------------------------------------------

_TINY_LM = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per KV head
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_DECODER_LMS = {
    # llama3 RoPE scaling with a small original context so the scaled, smoothed and kept bands
    # all occur for head_dim 16.
    "llama": dict(_TINY_LM, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2": dict(_TINY_LM, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # sliding_window 4 so the sliding layers see a window shorter than the test prompts.
    "gemma2": dict(_TINY_LM, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                   sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "gemma3": dict(_TINY_LM, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=None,
                   attn_logit_softcapping=None, sliding_window_pattern=2,
                   rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
                                    "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
}


def save_decoder_lm(out_dir: str, family: str, seed: int = 0, max_shard_size: Optional[str] = None,
                    safe_serialization: bool = True, **overrides) -> str:
    """A random HF causal LM of `family` ('llama', 'qwen2', 'gemma2', 'gemma3') with the tiny config
    above (GQA, the family's RoPE, windows and caps) and perturbed norms and biases."""
    torch = _torch()
    import transformers

    if family not in TINY_DECODER_LMS:
        raise ValueError(f"family must be one of {sorted(TINY_DECODER_LMS)}, got {family!r}")
    kw = dict(TINY_DECODER_LMS[family])
    kw.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    _randomize_lm(model, family, kw["hidden_size"], torch)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if not safe_serialization:
        # transformers 5 writes safetensors only: write a pytorch_model.bin by hand
        os.makedirs(out_dir, exist_ok=True)
        model.config.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
        return out_dir
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def _randomize_lm(model, family: str, hidden: int, torch) -> None:
    """Perturb norms and biases; larger weights than the 0.02 init so attention patterns are far
    from uniform. Gemma's embedding is multiplied by sqrt(hidden) in the forward, so it gets that
    much less (else the residual stream is the input token and the model just repeats it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                continue
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                scale = 0.15 / hidden ** 0.5 if (family.startswith("gemma") and "embed" in name) else 0.15
                p.copy_(torch.randn_like(p) * scale)


def save_gemma3_multimodal(out_dir: str, seed: int = 0) -> str:
    """A random `Gemma3ForConditionalGeneration` (tiny SigLIP tower + the tiny Gemma 3 text model),
    the layout of the Gemma-3-4B+ checkpoints."""
    torch = _torch()
    import transformers

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    text = transformers.Gemma3TextConfig(**TINY_DECODER_LMS["gemma3"])
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=93, boi_token_index=94, eoi_token_index=95)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    _randomize_lm(model, "gemma3", text.hidden_size, torch)
    model.save_pretrained(out_dir)
    return out_dir


# Token ids 0..2 agree with `TINY_DECODER_LMS` (pad, bos, eos); the rest are a tiny chat format's.
DECODER_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_decoder_tokenizer(out_dir: str, texts: Sequence[str], vocab_size: int = 192,
                           chat_template: Optional[str] = None) -> str:
    """A small BPE tokenizer (every printable ASCII character in its alphabet, merges learnt from
    `texts`, spaces kept as a metaspace) saved with `save_pretrained`, for a tiny decoder-only LM
    of the same `vocab_size`; `chat_template` (e.g. `TINY_CHAT_TEMPLATE`) or none (the plain prompt)."""
    import string

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DECODER_SPECIALS, show_progress=False,
                                  initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation + "\n"))
    tok.train_from_iterator(list(texts), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"save_decoder_tokenizer: {tok.get_vocab_size()} tokens > vocab_size {vocab_size}")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>",
                                                additional_special_tokens=DECODER_SPECIALS[4:])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return out_dir
