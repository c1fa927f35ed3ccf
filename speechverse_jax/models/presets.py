"""Architecture configs of the published backbones, in Hugging Face `config.json` form.

Used to build full-size shapes without weights (`jax.eval_shape`, compile-only runs); a
converted checkpoint carries its own config, which is what training and inference use.
"""

_WAVLM_CONV = dict(
    conv_dim=[512] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    feat_extract_activation="gelu",
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    num_buckets=320,
    max_bucket_distance=800,
)

WAVLM = {
    "wavlm-base-plus": dict(
        _WAVLM_CONV, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, feat_extract_norm="group", do_stable_layer_norm=False,
    ),
    "wavlm-large": dict(
        _WAVLM_CONV, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True,
    ),
}

_T5_COMMON = dict(
    vocab_size=32128,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    is_encoder_decoder=True,
)

_FLAN = dict(_T5_COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)

T5 = {
    "flan-t5-small": dict(_FLAN, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "flan-t5-base": dict(_FLAN, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "flan-t5-large": dict(_FLAN, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
    "flan-t5-xl": dict(_FLAN, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
    "flan-t5-xxl": dict(_FLAN, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64),
}

# Decoder-only LLMs (`models/decoder_lm.py`): the architecture fields of each model's published
# HF `config.json` (tokenizer-independent ids included; `DecoderLMConfig.from_hf` reads them).
_LLAMA3 = dict(
    model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
    mlp_bias=False, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
)
_LLAMA32_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_QWEN25 = dict(
    model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1000000.0,
    max_position_embeddings=32768, sliding_window=32768, use_sliding_window=False,
    bos_token_id=151643, eos_token_id=151643,
)

DECODER_LM = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA32_ROPE, factor=8.0), tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, sliding_window=131072, tie_word_embeddings=False),
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ),
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling=None, attn_logit_softcapping=None, final_logit_softcapping=None,
        rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ),
}

# Parameter counts shown on each model's Hugging Face page ("Model size", from the safetensors
# headers; tied embeddings counted once), rounded as published there.
DECODER_LM_PUBLISHED_SIZES = {
    "llama-3.2-1b": "1.24B",
    "llama-3.2-3b": "3.21B",
    "llama-3.1-8b": "8.03B",
    "qwen2.5-0.5b": "494M",
    "qwen2.5-1.5b": "1.54B",
    "qwen2.5-7b": "7.62B",
    "gemma-2-2b": "2.61B",
    "gemma-3-1b": "1000M",
}
