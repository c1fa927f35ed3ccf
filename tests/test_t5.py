"""T5: parity with HF `T5ForConditionalGeneration`, conversion (single / sharded / bad), cached decoding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from speechverse_jax import hf_tiny
from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint
from speechverse_jax.convert.t5 import convert_t5, name_table
from speechverse_jax.models.t5 import T5, T5Config, relative_position_bucket, shift_right

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ENC_LENGTHS = (37, 20)  # > relative_attention_max_distance=32: the saturated buckets are used
DEC_LENGTHS = (12, 7)
TOL = 1e-4


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {
        "flan": hf_tiny.save_t5(str(root / "flan"), flan=True),
        "v1": hf_tiny.save_t5(str(root / "v1"), flan=False),
        "flan_sharded": hf_tiny.save_t5(str(root / "flan_sharded"), flan=True, max_shard_size="200KB"),
    }


@pytest.fixture(scope="module")
def converted(hf_dirs):
    return {k: convert_t5(HFCheckpoint(d)) for k, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    d_model, vocab = hf_tiny.TINY_T5["d_model"], hf_tiny.TINY_T5["vocab_size"]
    b, s, t = len(ENC_LENGTHS), max(ENC_LENGTHS), max(DEC_LENGTHS)
    enc_mask = np.arange(s)[None] < np.array(ENC_LENGTHS)[:, None]
    embeds = rng.standard_normal((b, s, d_model)).astype(np.float32)
    embeds[~enc_mask] = 3.0  # garbage in the padding must not leak
    ids = rng.integers(2, vocab, (b, s)) * enc_mask
    dec = rng.integers(2, vocab, (b, t))
    dec[:, 0] = hf_tiny.TINY_T5["decoder_start_token_id"]
    dec_mask = np.arange(t)[None] < np.array(DEC_LENGTHS)[:, None]
    return dict(embeds=embeds, ids=ids, enc_mask=enc_mask, dec=dec, dec_mask=dec_mask)


def hf_forward(folder, inp, use_ids=False):
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    enc = {"input_ids": torch.from_numpy(inp["ids"])} if use_ids else {"inputs_embeds": torch.from_numpy(inp["embeds"])}
    with torch.no_grad():
        out = model(**enc, attention_mask=torch.from_numpy(inp["enc_mask"].astype(np.int64)),
                    decoder_input_ids=torch.from_numpy(inp["dec"]),
                    decoder_attention_mask=torch.from_numpy(inp["dec_mask"].astype(np.int64)))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.mark.parametrize("style", ["flan", "v1"])
def test_parity_with_hf(style, hf_dirs, converted, inputs):
    cfg, params = converted[style]
    assert cfg.tie_word_embeddings == (style == "v1")
    assert cfg.feed_forward_proj == ("gated-gelu" if style == "flan" else "relu")
    assert ("lm_head" in params) == (style == "flan")
    t5, variables = T5(cfg), {"params": params}
    em, dm = inputs["enc_mask"], inputs["dec_mask"]

    enc = t5.apply(variables, jnp.asarray(inputs["embeds"]), jnp.asarray(em), method=T5.encode)
    logits = t5.apply(variables, jnp.asarray(inputs["dec"]), enc, jnp.asarray(em),
                      decoder_mask=jnp.asarray(dm), method=T5.decode)
    ref_enc, ref_logits = hf_forward(hf_dirs[style], inputs)
    enc_err, logit_err = rel_err(np.asarray(enc)[em], ref_enc[em]), rel_err(np.asarray(logits)[dm], ref_logits[dm])
    print(f"{style}: encoder rel err {enc_err:.2e}, logits rel err {logit_err:.2e}")
    assert enc_err <= TOL and logit_err <= TOL

    # Token ids through the shared embedding, via __call__.
    logits_ids = t5.apply(variables, input_ids=jnp.asarray(inputs["ids"]), attention_mask=jnp.asarray(em),
                          decoder_input_ids=jnp.asarray(inputs["dec"]), decoder_mask=jnp.asarray(dm))
    _, ref_logits_ids = hf_forward(hf_dirs[style], inputs, use_ids=True)
    assert rel_err(np.asarray(logits_ids)[dm], ref_logits_ids[dm]) <= TOL


def test_sharded_checkpoint_converts_to_the_same_params(hf_dirs, converted):
    folder = hf_dirs["flan_sharded"]
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    assert HFCheckpoint(folder).weights_format == "safetensors-sharded"
    cfg_a, a = converted["flan"]
    cfg_b, b = converted["flan_sharded"]
    assert cfg_a == cfg_b
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("style", ["flan", "v1"])
def test_cached_decoding_matches_teacher_forcing(style, converted, inputs):
    cfg, params = converted[style]
    t5, variables = T5(cfg), {"params": params}
    em, dm, dec = jnp.asarray(inputs["enc_mask"]), inputs["dec_mask"], jnp.asarray(inputs["dec"])
    enc = t5.apply(variables, jnp.asarray(inputs["embeds"]), em, method=T5.encode)
    teacher = np.asarray(t5.apply(variables, dec, enc, em, method=T5.decode))
    max_len = dec.shape[1] + 3

    @jax.jit
    def run(enc, em, dec):
        cache = t5.apply(variables, enc, em, max_len, method=T5.init_cache)

        def body(cache, tok):
            logits, cache = t5.apply(variables, tok, cache, method=T5.decode_step)
            return cache, logits

        cache, logits = jax.lax.scan(body, cache, dec.T)
        return jnp.swapaxes(logits, 0, 1), cache

    stepped, cache = run(enc, em, dec)
    leaves = jax.tree_util.tree_leaves(cache)
    assert all(x.shape[0] == dec.shape[0] for x in leaves)  # batch-major: beam search can gather
    np.testing.assert_array_equal(cache["index"], [dec.shape[1]] * dec.shape[0])
    # head-major: the one-token attention reads keys/values without a transpose
    assert cache["block_0"]["self_k"].shape == (dec.shape[0], cfg.num_heads, max_len, cfg.d_kv)
    assert cache["block_0"]["cross_k"].shape == (dec.shape[0], cfg.num_heads, enc.shape[1], cfg.d_kv)
    err = rel_err(np.asarray(stepped)[dm], teacher[dm])
    print(f"{style}: cached vs teacher-forced rel err {err:.2e}")
    assert err <= 1e-5

    # Reordering the cache along the batch (as beam search does) reorders what follows.
    n = 4
    step = jax.jit(lambda tok, c: t5.apply(variables, tok, c, method=T5.decode_step))
    cache = t5.apply(variables, enc, em, max_len, method=T5.init_cache)
    for i in range(n):
        _, cache = step(dec[:, i], cache)
    perm = jnp.array([1, 0])
    swapped = jax.tree_util.tree_map(lambda x: jnp.take(x, perm, axis=0), cache)
    logits, _ = step(dec[perm, n], swapped)
    np.testing.assert_allclose(np.asarray(logits), teacher[np.asarray(perm), n], rtol=1e-5, atol=1e-5)


def test_dropout_only_when_not_deterministic(converted, inputs):
    cfg, params = converted["flan"]
    assert cfg.dropout_rate > 0
    t5, variables = T5(cfg), {"params": params}
    args = dict(inputs_embeds=jnp.asarray(inputs["embeds"]), attention_mask=jnp.asarray(inputs["enc_mask"]),
                decoder_input_ids=jnp.asarray(inputs["dec"]))
    a = t5.apply(variables, **args)
    b = t5.apply(variables, **args, deterministic=True, rngs={"dropout": jax.random.PRNGKey(1)})
    c = t5.apply(variables, **args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 32)):
            ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional, nb, md).numpy()
            ours = relative_position_bucket(jnp.asarray(rel), bidirectional, nb, md)
            np.testing.assert_array_equal(ours, ref)


def test_shift_right_matches_hf_semantics():
    labels = jnp.array([[5, 6, -100, -100], [7, 8, 9, 1]])
    np.testing.assert_array_equal(shift_right(labels, 0, 0), [[0, 5, 6, 0], [0, 7, 8, 9]])
    np.testing.assert_array_equal(shift_right(labels, 3, 2), [[3, 5, 6, 2], [3, 7, 8, 9]])


def test_config_from_hf_and_round_trip(hf_dirs):
    flan_hf = json.load(open(os.path.join(hf_dirs["flan"], "config.json")))
    # transformers 5 writes tie_word_embeddings: true even for untied models: scale_decoder_outputs decides.
    assert flan_hf["tie_word_embeddings"] is True and flan_hf["scale_decoder_outputs"] is False
    assert not T5Config.from_hf(flan_hf).tie_word_embeddings
    hub_style = {k: v for k, v in flan_hf.items() if k != "scale_decoder_outputs"}
    assert not T5Config.from_hf(dict(hub_style, tie_word_embeddings=False)).tie_word_embeddings
    assert T5Config.from_hf(dict(hub_style, tie_word_embeddings=True)).tie_word_embeddings
    cfg = T5Config.from_hf(dict(hub_style, num_decoder_layers=None))
    assert cfg.num_decoder_layers == cfg.num_layers
    assert T5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf(dict(flan_hf, feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        T5Config.from_hf(dict(flan_hf, is_encoder_decoder=False))
    with pytest.raises(ValueError, match="num_heads"):
        T5Config.from_hf(dict(flan_hf, num_heads=0))
    with pytest.raises(ValueError, match="bogus"):
        T5Config.from_dict(dict(cfg.to_dict(), bogus=1))


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy an HF folder, editing its tensors dict and/or config dict."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_bad_checkpoints_name_the_tensor(hf_dirs, tmp_path):
    flan, v1 = hf_dirs["flan"], hf_dirs["v1"]
    wo = "encoder.block.1.layer.1.DenseReluDense.wo.weight"

    def misshape(t):
        t[wo] = t[wo][:, :-1].copy()

    def drop(t):
        del t["decoder.final_layer_norm.weight"]

    def add(t):
        t["encoder.block.7.layer.0.SelfAttention.q.weight"] = np.zeros((64, 64), np.float32)

    def drop_head(t):
        del t["lm_head.weight"]

    def add_head(t):
        t["lm_head.weight"] = t["shared.weight"] + 1.0

    cases = [
        (flan, misshape, "mis-shaped.*" + wo.replace(".", r"\.")),
        (flan, drop, r"missing.*decoder\.final_layer_norm\.weight"),
        (flan, add, r"unexpected.*encoder\.block\.7\.layer\.0\.SelfAttention\.q\.weight"),
        (flan, drop_head, r"missing.*lm_head\.weight"),  # untied config without its lm_head
        (v1, add_head, r"lm_head\.weight differs"),  # tied config with a different lm_head
    ]
    for i, (src, edit, pattern) in enumerate(cases):
        folder = _rewrite(src, str(tmp_path / f"bad{i}"), edit_tensors=edit)
        with pytest.raises(CheckpointError, match=f"(?s){pattern}"):
            convert_t5(HFCheckpoint(folder))

    folder = _rewrite(flan, str(tmp_path / "badcfg"), edit_config=lambda c: c.update(feed_forward_proj="gelu"))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        convert_t5(HFCheckpoint(folder))


def test_tied_copies_are_ignored(hf_dirs, converted, tmp_path):
    def add_copies(t):
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            t[name] = t["shared.weight"].copy()

    folder = _rewrite(hf_dirs["v1"], str(tmp_path / "v1copies"), edit_tensors=add_copies)
    cfg, params = convert_t5(HFCheckpoint(folder))
    np.testing.assert_array_equal(params["shared"]["embedding"], converted["v1"][1]["shared"]["embedding"])
    assert "lm_head" not in params
    names = {e.sources[0] for e in name_table(cfg)}
    assert len(names) == len(name_table(cfg)) and "lm_head.weight" not in names


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("style", ["flan", "v1"])
def test_scanned_layout_matches_hf_and_decodes_with_its_cache(style, remat, hf_dirs, converted, inputs):
    """`scan_layers`: the converted params stacked (models/scan_layout.py) give the HF outputs at
    1e-4, and cached decoding (layer-major cache, scanned step) matches teacher forcing."""
    from speechverse_jax.models.scan_layout import tree_to_layout
    from speechverse_jax.models.t5 import reorder_cache

    cfg, params = converted[style]
    stacked = tree_to_layout(params, scanned=True)
    assert "block_0" not in stacked["encoder"]
    assert stacked["encoder"]["blocks"]["mlp_norm"]["scale"].shape == (cfg.num_layers, cfg.d_model)
    t5, variables = T5(cfg, scan_layers=True, remat=remat), {"params": stacked}
    em, dm, dec = jnp.asarray(inputs["enc_mask"]), inputs["dec_mask"], jnp.asarray(inputs["dec"])
    enc = t5.apply(variables, jnp.asarray(inputs["embeds"]), em, method=T5.encode)
    logits = np.asarray(t5.apply(variables, dec, enc, em, decoder_mask=jnp.asarray(dm), method=T5.decode))
    ref_enc, ref_logits = hf_forward(hf_dirs[style], inputs)
    enc_err = rel_err(np.asarray(enc)[inputs["enc_mask"]], ref_enc[inputs["enc_mask"]])
    logit_err = rel_err(logits[dm], ref_logits[dm])
    print(f"{style} scanned (remat {remat}): encoder rel err {enc_err:.2e}, logits rel err {logit_err:.2e}")
    assert enc_err <= TOL and logit_err <= TOL
    # back to the unrolled layout: the same tree as converted
    back = tree_to_layout(stacked, scanned=False)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)

    max_len = dec.shape[1] + 3

    @jax.jit
    def run(enc, em, dec):
        cache = t5.apply(variables, enc, em, max_len, method=T5.init_cache)

        def body(cache, tok):
            out, cache = t5.apply(variables, tok, cache, method=T5.decode_step)
            return cache, out

        cache, out = jax.lax.scan(body, cache, dec.T)
        return jnp.swapaxes(out, 0, 1), cache

    stepped, cache = run(enc, em, dec)
    assert cache["blocks"]["self_k"].shape == (cfg.num_decoder_layers, dec.shape[0], cfg.num_heads, max_len, cfg.d_kv)
    assert rel_err(np.asarray(stepped)[dm], logits[dm]) <= 1e-5
    # reordering the batch of a layer-major cache
    step = jax.jit(lambda tok, c: t5.apply(variables, tok, c, method=T5.decode_step))
    cache = t5.apply(variables, enc, em, max_len, method=T5.init_cache)
    for i in range(4):
        _, cache = step(dec[:, i], cache)
    perm = jnp.array([1, 0])
    out, _ = step(dec[perm, 4], reorder_cache(cache, perm))
    np.testing.assert_allclose(np.asarray(out), logits[np.asarray(perm), 4], rtol=1e-5, atol=1e-5)
