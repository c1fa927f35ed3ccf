"""Decoder-only LMs (Llama 3.x, Qwen2, Gemma 2, Gemma 3): HF parity, conversion, export, LoRA,
KV-cache generation token-exact against HF `generate(inputs_embeds=...)`, preset sizes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speechverse_jax import hf_tiny  # noqa: E402
from speechverse_jax.convert.decoder_lm import convert_decoder_lm, export_decoder_lm  # noqa: E402
from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint  # noqa: E402
from speechverse_jax.convert.verify_decoder_lm import padded_batch, verify_decoder_lm  # noqa: E402
from speechverse_jax.decode.constraints import label_constraint  # noqa: E402
from speechverse_jax.decode.generate import GenerateConfig  # noqa: E402
from speechverse_jax.decode.generate_decoder import generate_lm  # noqa: E402
from speechverse_jax.models import presets  # noqa: E402
from speechverse_jax.models.decoder_lm import DecoderLM, DecoderLMConfig, RopeConfig, abstract_params  # noqa: E402
from speechverse_jax.models.layers import LoRAConfig  # noqa: E402
from speechverse_jax import tree  # noqa: E402

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """family -> (HF folder, config, converted params)."""
    root = tmp_path_factory.mktemp("lms")
    out = {}
    for f in FAMILIES:
        d = hf_tiny.save_decoder_lm(str(root / f), f)
        cfg, params = convert_decoder_lm(HFCheckpoint(d), dtype=np.float32)
        out[f] = (d, cfg, params)
    return out


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hidden_state_and_logits_match_hf(lms, family):
    """Padded batch (right-padded, left-padded and unpadded rows), position ids skipping pads."""
    folder, cfg, params = lms[family]
    results = verify_decoder_lm(folder, cfg, params, tolerance=1e-4)
    assert len(results) == cfg.num_hidden_layers + 2  # embeddings, n layers (last normed), logits
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert max(r["max_rel"] for r in results) <= 1e-4


def test_config_reads_family_traits(lms):
    cfgs = {f: lms[f][1] for f in FAMILIES}
    assert cfgs["llama"].rope.rope_type == "llama3" and cfgs["llama"].rope.factor == 8.0
    assert cfgs["llama"].rope.original_max_position_embeddings == 64 and not cfgs["llama"].tie_word_embeddings
    assert cfgs["qwen2"].attention_bias and not cfgs["qwen2"].attention_out_bias and cfgs["qwen2"].tie_word_embeddings
    g2 = cfgs["gemma2"]
    assert g2.layer_types == ("sliding_attention", "full_attention") and g2.sliding_window == 4
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (50.0, 30.0, 24)
    assert g2.hidden_act == "gelu_tanh" and g2.is_gemma and not g2.qk_norm
    g3 = cfgs["gemma3"]
    assert g3.qk_norm and g3.rope.rope_type == "linear" and g3.rope.theta == 1e6 and g3.rope_local.theta == 1e4
    assert g3.layer_rope(0) is g3.rope_local and g3.layer_rope(1) is g3.rope
    p3 = lms["gemma3"][2]["layers_0"]["self_attention"]
    assert set(p3) == {"q", "k", "v", "o", "q_norm", "k_norm"}
    assert lms["llama"][2]["layers_0"]["self_attention"]["k"]["kernel"].shape == (64, 32)  # 2 KV heads x 16


def test_llama3_rope_read_from_either_key_and_used(lms):
    """rope_parameters (transformers 5) and rope_scaling + rope_theta (older files) give the same
    config; the factor is read, not assumed, and dropping the scaling breaks parity."""
    folder, cfg, params = lms["llama"]
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    old = dict(d)
    block = dict(old.pop("rope_parameters"))
    old["rope_theta"] = block.pop("rope_theta")
    old["rope_scaling"] = dict(block, type=block.pop("rope_type"))
    assert DecoderLMConfig.from_hf(old).rope == cfg.rope
    other = dict(d, rope_parameters=dict(d["rope_parameters"], factor=32.0))
    assert DecoderLMConfig.from_hf(other).rope.factor == 32.0
    inv8, inv32 = cfg.rope.inv_freq(16), DecoderLMConfig.from_hf(other).rope.inv_freq(16)
    assert inv8[0] == inv32[0] and inv8[-1] * 8 == pytest.approx(inv32[-1] * 32)  # high freqs kept, low ones scaled
    with pytest.raises(ValueError, match="factor"):
        DecoderLMConfig.from_hf(dict(d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}))
    unscaled = DecoderLMConfig.from_dict(dict(cfg.to_dict(), rope=RopeConfig(theta=cfg.rope.theta)))
    results = verify_decoder_lm(folder, unscaled, params, tolerance=1e-4)
    assert not all(r["ok"] for r in results)


def test_padding_invariance_position_ids_skip_pads(lms):
    """A sequence gives the same logits unpadded, left-padded and right-padded."""
    _, cfg, params = lms["gemma2"]
    model = DecoderLM(cfg)
    rng = np.random.default_rng(3)
    seq = rng.integers(3, cfg.vocab_size, 7)
    ids = np.zeros((3, 10), np.int32)
    mask = np.zeros((3, 10), bool)
    ids[0, :7], mask[0, :7] = seq, True
    ids[1, 3:], mask[1, 3:] = seq, True
    ids[2, :7], mask[2, :7] = seq, True
    ids[2, 7:] = 5  # junk under the mask
    fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m).logits)
    out = np.asarray(fwd(params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[1, 3:], out[0, :7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[2, :7], out[0, :7], rtol=0, atol=1e-5)
    # the default position ids count real tokens only (RoPE is relative, so a constant shift
    # of positions changes nothing beyond rounding; the ids matter for where generation continues)
    from speechverse_jax.models.decoder_lm import positions_from_mask

    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    assert pos[1, 3:].tolist() == list(range(7)) and pos[0, :7].tolist() == list(range(7))
    assert pos[1, :3].tolist() == [0, 0, 0] and pos[2, 7:].tolist() == [0, 0, 0]


def test_sharded_and_bin_checkpoints_convert_identically(lms, tmp_path):
    folder, cfg, params = lms["qwen2"]
    sharded = hf_tiny.save_decoder_lm(str(tmp_path / "sharded"), "qwen2", max_shard_size="50KB")
    binary = hf_tiny.save_decoder_lm(str(tmp_path / "bin"), "qwen2", safe_serialization=False)
    assert HFCheckpoint(sharded).weights_format == "safetensors-sharded"
    assert HFCheckpoint(binary).weights_format == "pytorch-bin"
    for d in (sharded, binary):
        _, p = convert_decoder_lm(HFCheckpoint(d), dtype=np.float32)
        jax.tree_util.tree_map(np.testing.assert_array_equal, p, params)


def test_multimodal_gemma3_folder_converts_its_text_model(tmp_path):
    """Gemma-3-4B+ checkpoints are `Gemma3ForConditionalGeneration`: the text model is converted,
    the vision tower ignored, and the result matches HF; export writes a text-only model."""
    folder = hf_tiny.save_gemma3_multimodal(str(tmp_path / "mm"))
    cfg, params = convert_decoder_lm(HFCheckpoint(folder), dtype=np.float32)
    assert cfg.family == "gemma3" and cfg.qk_norm and cfg.rope_local is not None
    results = verify_decoder_lm(folder, cfg, params, tolerance=1e-4, lengths=(8, 5), left=(False, True))
    assert all(r["ok"] for r in results), results
    out = export_decoder_lm(cfg, params, str(tmp_path / "text"))
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "gemma3_text"
    _, again = convert_decoder_lm(HFCheckpoint(out), dtype=np.float32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def _rewrite(folder, out, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def test_bad_checkpoints_are_refused_naming_tensors(lms, tmp_path):
    folder = lms["llama"][0]

    def drop_and_break(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    bad = _rewrite(folder, str(tmp_path / "bad"), drop_and_break)
    with pytest.raises(CheckpointError) as e:
        convert_decoder_lm(HFCheckpoint(bad))
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "missing" in msg
    assert "model.layers.0.mlp.up_proj.weight" in msg and "mis-shaped" in msg
    assert "model.layers.0.self_attn.q_proj.bias" in msg and "unexpected" in msg

    qwen = lms["qwen2"][0]

    def untie(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0

    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        convert_decoder_lm(HFCheckpoint(_rewrite(qwen, str(tmp_path / "untied"), untie)))
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    cfg_bad = str(tmp_path / "cfgbad")
    shutil.copytree(folder, cfg_bad)
    with open(os.path.join(cfg_bad, "config.json"), "w") as f:
        json.dump(dict(d, num_key_value_heads=3), f)
    with pytest.raises(CheckpointError, match="config.json.*num_key_value_heads"):
        convert_decoder_lm(HFCheckpoint(cfg_bad))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_export_round_trip_loads_in_transformers(lms, family, tmp_path):
    folder, cfg, params = lms[family]
    out = export_decoder_lm(cfg, params, str(tmp_path / "export"))
    cfg2, params2 = convert_decoder_lm(HFCheckpoint(out), dtype=np.float32)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    ids, mask, pos = padded_batch(cfg, (6, 4), (True, False))
    with torch.no_grad():
        a = _hf(folder)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos)).logits.numpy()
        b = _hf(out)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos)).logits.numpy()
    np.testing.assert_allclose(b[mask.astype(bool)], a[mask.astype(bool)], rtol=0, atol=1e-5)


def test_lora_targets_q_and_v_by_default_and_any_linear_by_regex(lms):
    """The default LoRA regex adapts q and v of every layer; a custom one any linear map. (The
    adapters' numbers are checked against HF + peft in test_lora_loss_and_gradients_match_hf_peft.)"""
    from flax import linen as nn

    _, cfg, _ = lms["qwen2"]
    ids = jnp.zeros((1, 4), jnp.int32)

    def adapted(lora):
        shapes = jax.eval_shape(lambda r: DecoderLM(cfg, lora=lora).init(r, input_ids=ids), jax.random.PRNGKey(1))
        flat = traverse_util.flatten_dict(nn.unbox(shapes)["params"], sep="/")
        return sorted(k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_a"))

    assert adapted(LoRAConfig(rank=4)) == sorted(
        f"layers_{i}/self_attention/{p}" for i in range(cfg.num_hidden_layers) for p in "qv")
    assert {k.rsplit("/", 1)[1] for k in adapted(LoRAConfig(rank=2, target_regex=r".*/mlp/(gate|up|down)$"))} == {
        "gate", "up", "down"}


def _prompt(cfg, params, lengths, seed=1):
    """Left-padded prompt embeddings `[b, t, hidden]` (through our embedding, Gemma-scaled) and mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(3, cfg.vocab_size, n)
        mask[i, t - n:] = 1
    emb = DecoderLM(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), method=DecoderLM.embed)
    return np.asarray(emb), mask


def _hf_generate(model, emb, mask, max_new, beams, eos, **kw):
    with torch.no_grad():
        out = model.generate(inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new, num_beams=beams, do_sample=False, pad_token_id=0,
                             eos_token_id=eos, **kw)
    return out.numpy()


def _ours(out):
    return [list(map(int, row[:n])) for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]


def _strip(ref, eos):
    """Cut HF's rows after the first EOS (`eos`: an id or a list of ids)."""
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    rows = []
    for row in ref.tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        rows.append(row[:cut])
    return rows


# beam search: Gemma 3 here (sliding + global layers), Llama with constraints below
GENERATION_CASES = [(f, 1) for f in FAMILIES] + [("gemma3", 3)]


@pytest.mark.parametrize("family,beams", GENERATION_CASES)
def test_generation_matches_hf_generate(lms, family, beams):
    """Greedy and beam search after left-padded prompts, token for token. Two EOS ids (as Llama 3
    Instruct has), tokens the unconstrained greedy run emits mid-way, so rows stop at different steps."""
    folder, cfg, params = lms[family]
    hf = _hf(folder)
    emb, mask = _prompt(cfg, params, (7, 5, 3))
    free = _hf_generate(hf, emb, mask, 10, 1, eos=2)
    eos = [int(free[0, 4]), int(free[1, 2])]
    ref = _strip(_hf_generate(hf, emb, mask, 10, beams, eos), eos)
    out = generate_lm(DecoderLM(cfg), params, jnp.asarray(emb), jnp.asarray(mask),
                      GenerateConfig(max_new_tokens=10, num_beams=beams), eos_token_id=eos, pad_token_id=0)
    assert _ours(out) == ref
    if beams == 1:
        assert len(ref[0]) <= 5 and len(ref[1]) <= 3 and ref[0][-1] in eos  # EOS reached
        assert np.all(np.asarray(out.tokens)[0, len(ref[0]):] == 0)  # pad after EOS


def test_constrained_beam_search_matches_hf_prefix_allowed_tokens(lms):
    folder, cfg, params = lms["llama"]
    labels = {"alpha": [5, 6], "beta": [7, 8, 9], "gamma": [5, 10, 11]}
    eos = 2
    constraint = label_constraint(list(labels), lambda s: labels[s], eos)
    seqs = list(labels.values())

    def allowed(batch_id, generated):
        prefix = generated.tolist()
        nxt = {s[len(prefix)] for s in seqs if len(s) > len(prefix) and s[:len(prefix)] == prefix}
        if any(s == prefix for s in seqs):
            nxt.add(eos)
        return sorted(nxt) or [eos]

    emb, mask = _prompt(cfg, params, (6, 4), seed=5)
    hf = _hf(folder)
    for beams in (2,):
        ref = _strip(_hf_generate(hf, emb, mask, 6, beams, eos, prefix_allowed_tokens_fn=allowed), eos)
        out = generate_lm(DecoderLM(cfg), params, jnp.asarray(emb), jnp.asarray(mask),
                          GenerateConfig(max_new_tokens=6, num_beams=beams), constraint=constraint, eos_token_id=eos)
        assert _ours(out) == ref
        assert all(r[:-1] in seqs and r[-1] == eos for r in _ours(out))


def test_right_padded_prompts_are_refused(lms):
    _, cfg, params = lms["llama"]
    emb, mask = _prompt(cfg, params, (4, 2))
    with pytest.raises(ValueError, match="left-padded"):
        generate_lm(DecoderLM(cfg), params, jnp.asarray(emb), jnp.asarray(mask[:, ::-1].copy()))


# Parameter counts of the published checkpoints: the sum of tensor sizes of the HF model built
# from the same config (tied embeddings once), which is what each model page shows rounded
# (presets.DECODER_LM_PUBLISHED_SIZES); checked here against HF on the meta device too.
PUBLISHED_COUNTS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952,
}


def _rounded(n: int) -> str:
    if n >= 1e9 and not str(n).startswith("99"):
        return f"{n / 1e9:.2f}B"
    return f"{round(n / 1e6)}M"


def test_preset_parameter_counts_equal_published_sizes():
    hf_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}
    assert set(presets.DECODER_LM) == set(PUBLISHED_COUNTS)
    for name, d in presets.DECODER_LM.items():
        ours = tree.count(abstract_params(DecoderLMConfig.from_hf(d)))
        assert ours == PUBLISHED_COUNTS[name], name
        assert _rounded(ours) == presets.DECODER_LM_PUBLISHED_SIZES[name], name
        with torch.device("meta"):
            ref = transformers.AutoModelForCausalLM.from_config(
                hf_cls[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"}))
        assert sum(p.numel() for p in ref.parameters()) == ours, name


def test_params_carry_logical_axes():
    """Params are born with logical axis names, so the mesh rules shard them like the T5 path."""
    from flax import linen as nn

    cfg = DecoderLMConfig.from_hf(dict(hf_tiny.TINY_DECODER_LMS["qwen2"], model_type="qwen2", tie_word_embeddings=False))
    boxed = jax.eval_shape(lambda r: DecoderLM(cfg).init(r, input_ids=jnp.zeros((1, 2), jnp.int32)),
                           jax.random.PRNGKey(0))["params"]
    specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
    assert tuple(specs["embed_tokens/embedding"]) == ("vocab", "embed")
    assert tuple(specs["layers_0/self_attention/q/kernel"]) == ("embed", "heads")
    assert tuple(specs["layers_0/self_attention/q/bias"]) == ("heads",)
    assert tuple(specs["layers_0/self_attention/o/kernel"]) == ("heads", "embed")
    assert tuple(specs["layers_0/mlp/down/kernel"]) == ("mlp", "embed")
    assert tuple(specs["lm_head/kernel"]) == ("embed", "vocab")
    assert tuple(specs["final_norm/scale"]) == ("norm",)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "gemma-3-1b"])
def test_preset_rope_frequencies_equal_hf(name):
    """The inverse frequencies we derive from a published config equal HF's own RoPE init."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = presets.DECODER_LM[name]
    cfg = DecoderLMConfig.from_hf(d)
    hf_cfg = {"llama": transformers.LlamaConfig, "gemma3_text": transformers.Gemma3TextConfig}[d["model_type"]](
        **{k: v for k, v in d.items() if k != "model_type"})
    if d["model_type"] == "llama":
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
        np.testing.assert_allclose(cfg.rope.inv_freq(cfg.head_dim), ref.numpy(), rtol=1e-6)
    else:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        rot = Gemma3RotaryEmbedding(hf_cfg)
        np.testing.assert_allclose(cfg.rope.inv_freq(cfg.head_dim), rot.full_attention_inv_freq.numpy(), rtol=1e-6)
        np.testing.assert_allclose(cfg.rope_local.inv_freq(cfg.head_dim), rot.sliding_attention_inv_freq.numpy(),
                                   rtol=1e-6)


def test_lora_loss_and_gradients_match_hf_peft(lms):
    """One training step's worth: answer-only loss and its gradients w.r.t. the LoRA adapters (q, v;
    rank 4, alpha 8, non-zero B) equal HF + peft's on a padded batch."""
    peft = pytest.importorskip("peft")
    from flax import linen as nn

    from speechverse_jax.models.lora import graft_lora
    from speechverse_jax.models.speechverse import token_cross_entropy

    folder, cfg, params = lms["qwen2"]
    hf = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    lora = LoRAConfig(rank=4, alpha=8.0)
    model = DecoderLM(cfg, lora=lora)
    ids, mask, pos = padded_batch(cfg, (9, 6), (False, True), seed=4)
    init = nn.unbox(jax.eval_shape(lambda r: model.init(r, input_ids=jnp.zeros((1, 2), jnp.int32)),
                                   jax.random.PRNGKey(0))["params"])
    full, _ = graft_lora(tree.flatten(params), tree.flatten(init))
    hf_params = dict(hf.named_parameters())
    for i in range(cfg.num_hidden_layers):
        for p in "qv":
            base = f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
            full[f"layers_{i}/self_attention/{p}/lora_a"] = hf_params[f"{base}.lora_A.default.weight"].detach().numpy().T
            full[f"layers_{i}/self_attention/{p}/lora_b"] = hf_params[f"{base}.lora_B.default.weight"].detach().numpy().T
    full = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in full.items()}, sep="/")
    # answer-only loss: the last 3 real tokens of each row are the "answer"
    labels = np.full_like(ids, -100)
    for row in range(ids.shape[0]):
        real = np.flatnonzero(mask[row])
        labels[row, real[-3:]] = ids[row, real[-3:]]
    out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             position_ids=torch.from_numpy(pos), labels=torch.from_numpy(labels))
    out.loss.backward()

    targets = np.concatenate([labels[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)

    def loss_fn(p):
        logits = model.apply({"params": p}, input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, bool),
                             position_ids=jnp.asarray(pos, jnp.int32)).logits
        return token_cross_entropy(logits, jnp.asarray(np.maximum(targets, 0)), jnp.asarray(targets >= 0))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(full)
    assert float(loss) == pytest.approx(float(out.loss.detach()), rel=1e-5)
    g = traverse_util.flatten_dict(grads, sep="/")
    for i in range(cfg.num_hidden_layers):
        for p in "qv":
            base = f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
            for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                ref = hf_params[f"{base}.{theirs}.default.weight"].grad.numpy().T
                got = np.asarray(g[f"layers_{i}/self_attention/{p}/{ours}"])
                assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)), (i, p, ours)


def test_sharded_on_a_mesh_by_the_logical_rules(tmp_path):
    """8 forced CPU devices, (data, fsdp, tensor) = (2, 2, 2): params are born sharded, and the logits
    equal the unsharded model's."""
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "decoder_lm_sharding_worker.py")
    res = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    row = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    assert row["specs"] == {"q": ["fsdp", "tensor"], "down": ["tensor", "fsdp"]}
    assert row["logits_max_abs"] < 1e-5
