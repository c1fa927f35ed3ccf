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
