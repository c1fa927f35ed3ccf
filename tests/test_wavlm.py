"""WavLM vs Hugging Face PyTorch: both families, padded batches, old/new/prefixed checkpoints."""

import dataclasses
import functools
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint  # noqa: E402
from speechverse_jax.convert.wavlm import convert_wavlm  # noqa: E402
from speechverse_jax.models import presets  # noqa: E402
from speechverse_jax.models.wavlm import WavLM, WavLMConfig, feature_lengths  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_buckets=32,
    max_bucket_distance=64,
)
FAMILIES = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}
LENGTHS = (3200, 2100)  # samples; 159 and 104 frames


def _hf_config(family: str) -> "transformers.WavLMConfig":
    return transformers.WavLMConfig(**TINY, **FAMILIES[family])


def _perturb(model) -> None:
    """Move norms and gate constants off their init values so the comparison sees them used."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "gru_rel_pos_const" in name:
                p.add_(0.1 * torch.randn_like(p))


def _batch(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    audio = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros(audio.shape, np.int32)
    for i, n in enumerate(lengths):
        audio[i, :n] = rng.standard_normal(n) * 0.1
        mask[i, :n] = 1
    return audio, mask


def _hf_states(model, audio, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(audio), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


@functools.lru_cache(maxsize=None)
def _apply(cfg: WavLMConfig, dtype=jnp.float32):
    return jax.jit(WavLM(cfg, dtype=dtype).apply)


def _ours(cfg, params, audio, mask, dtype=jnp.float32):
    return _apply(cfg, dtype)({"params": params}, jnp.asarray(audio), None if mask is None else jnp.asarray(mask))


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _assert_states_match(ours, ref, tol):
    assert len(ours) == len(ref)
    rels = [_rel(o, r) for o, r in zip(ours, ref)]
    assert max(rels) <= tol, rels
    return max(rels)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Per family: the torch model, its saved folder, and our converted (cfg, params)."""
    root = tmp_path_factory.mktemp("wavlm")
    out = {}
    for seed, family in enumerate(FAMILIES):
        torch.manual_seed(seed)
        model = transformers.WavLMModel(_hf_config(family)).eval()
        _perturb(model)
        folder = str(root / family)
        model.save_pretrained(folder)
        cfg, params = convert_wavlm(HFCheckpoint(folder))
        out[family] = SimpleNamespace(model=model, folder=folder, cfg=cfg, params=params)
    return out


def _rewrite(src: str, dst: str, edit=None, config_edit=None) -> str:
    """Copy an HF folder, editing its tensors (a dict of numpy arrays) and/or config on the way."""
    os.makedirs(dst)
    ckpt = HFCheckpoint(src)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    safetensors.numpy.save_file(edit(tensors) if edit else tensors, os.path.join(dst, "model.safetensors"))
    config = dict(ckpt.config)
    if config_edit:
        config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


# (a), (b): both families on a padded batch; every hidden state, padded frames included.


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_hf(hf, family):
    m = hf[family]
    audio, mask = _batch()
    ref, ref_last = _hf_states(m.model, audio, mask)
    out = _ours(m.cfg, m.params, audio, mask)
    rel = _assert_states_match(out.hidden_states, ref, 1e-4)
    assert _rel(out.last_hidden_state, ref_last) <= 1e-4
    assert len(out.hidden_states) == m.cfg.num_hidden_states == 3
    hf_mask = m.model._get_feature_vector_attention_mask(ref[0].shape[1], torch.from_numpy(mask))
    np.testing.assert_array_equal(np.asarray(out.frame_mask), hf_mask.numpy())
    print(f"{family}: max rel diff {rel:.2e}")


def test_no_mask_matches_hf(hf):
    m = hf["base"]
    audio, _ = _batch((2100,))
    with torch.no_grad():
        ref = m.model(torch.from_numpy(audio), output_hidden_states=True).hidden_states
    out = _ours(m.cfg, m.params, audio, None)
    _assert_states_match(out.hidden_states, [h.numpy() for h in ref], 1e-4)
    assert bool(out.frame_mask.all())


def test_last_state_is_before_the_final_norm_in_the_pre_ln_family(hf):
    """transformers 5 collects the last layer's output, not `last_hidden_state`, unless configured."""
    m = hf["large"]
    audio, mask = _batch()
    out = _ours(m.cfg, m.params, audio, mask)
    assert _rel(out.hidden_states[-1], out.last_hidden_state) > 0.1
    tied = dataclasses.replace(m.cfg, tie_last_hidden_states=True)
    m.model.config.tie_last_hidden_states = True
    try:
        ref, _ = _hf_states(m.model, audio, mask)
    finally:
        m.model.config.tie_last_hidden_states = None
    _assert_states_match(_ours(tied, m.params, audio, mask).hidden_states, ref, 1e-4)


def test_layer_norm_family_padded_clip_equals_clip_alone(hf):
    m = hf["large"]
    audio, mask = _batch()
    batch = _ours(m.cfg, m.params, audio, mask)
    n = LENGTHS[1]
    alone = _ours(m.cfg, m.params, audio[1:, :n], None)
    frames = int(feature_lengths(m.cfg, n))
    assert alone.hidden_states[0].shape[1] == frames == int(np.asarray(batch.frame_mask[1]).sum())
    for b, a in zip(batch.hidden_states, alone.hidden_states):
        np.testing.assert_allclose(np.asarray(b[1, :frames]), np.asarray(a[0]), atol=1e-5, rtol=1e-5)


# (c), (d): old weight-norm names and prefixed task checkpoints.


def test_old_weight_norm_names_convert_and_match(hf, tmp_path):
    m = hf["large"]
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}

    def to_old(tensors):
        out = {}
        for name, value in tensors.items():
            for new, old in renames.items():
                name = name.replace(new, old)
            out[name] = value
        return out

    folder = _rewrite(m.folder, str(tmp_path / "old"), to_old)
    assert "encoder.pos_conv_embed.conv.weight_g" in HFCheckpoint(folder)
    cfg, params = convert_wavlm(HFCheckpoint(folder))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, m.params)
    audio, mask = _batch()
    ref, _ = _hf_states(m.model, audio, mask)
    _assert_states_match(_ours(cfg, params, audio, mask).hidden_states, ref, 1e-4)


def test_prefixed_task_checkpoint_converts(tmp_path):
    torch.manual_seed(3)
    ctc = transformers.WavLMForCTC(transformers.WavLMConfig(**TINY, **FAMILIES["large"], vocab_size=12)).eval()
    _perturb(ctc)
    ctc.save_pretrained(str(tmp_path / "ctc"))
    ckpt = HFCheckpoint(str(tmp_path / "ctc"))
    assert "wavlm.feature_projection.projection.weight" in ckpt and "lm_head.weight" in ckpt
    cfg, params = convert_wavlm(ckpt)
    audio, mask = _batch()
    ref, _ = _hf_states(ctc.wavlm, audio, mask)
    _assert_states_match(_ours(cfg, params, audio, mask).hidden_states, ref, 1e-4)


# (e): bad checkpoints and configs.


Q1 = "encoder.layers.1.attention.q_proj.weight"


@pytest.mark.parametrize(
    "edit, name",
    [
        (lambda t: {**t, Q1: t[Q1][:, :-1]}, Q1),
        (lambda t: {k: v for k, v in t.items() if k != "feature_projection.projection.bias"},
         "feature_projection.projection.bias"),
        (lambda t: {**t, "encoder.layers.0.attention.extra.weight": np.zeros((2, 2), np.float32)},
         "encoder.layers.0.attention.extra.weight"),
        (lambda t: {k: v for k, v in t.items() if "original1" not in k}, "weight_v"),
    ],
    ids=["misshaped", "missing", "unexpected", "missing_weight_norm_v"],
)
def test_bad_checkpoint_names_the_tensor(hf, tmp_path, edit, name):
    folder = _rewrite(hf["large"].folder, str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        convert_wavlm(HFCheckpoint(folder))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(feat_extract_activation="gelu_new"), "feat_extract_activation"),
        (dict(feat_extract_norm="batch"), "feat_extract_norm"),
        (dict(conv_kernel=[10, 3]), "conv_kernel"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_conv_pos_embedding_groups=5), "num_conv_pos_embedding_groups"),
        (dict(add_adapter=True), "add_adapter"),
        (dict(model_type="wav2vec2"), "model_type"),
    ],
)
def test_unsupported_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        WavLMConfig.from_hf({**TINY, **FAMILIES["base"], **change})


def test_unsupported_config_in_a_folder_raises(hf, tmp_path):
    folder = _rewrite(hf["base"].folder, str(tmp_path / "relu"), config_edit=lambda c: c.update(hidden_act="relu"))
    with pytest.raises(ValueError, match="hidden_act"):
        convert_wavlm(HFCheckpoint(folder))


def test_config_round_trip_and_presets(hf):
    cfg = hf["large"].cfg
    assert WavLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.conv_dim == (16, 16, 16) and cfg.do_stable_layer_norm and cfg.feat_extract_norm == "layer"
    large = WavLMConfig.from_hf(presets.WAVLM["wavlm-large"])
    assert (large.hidden_size, large.num_hidden_states) == (1024, 25)
    with pytest.raises(ValueError, match="unknown"):
        WavLMConfig.from_dict({**cfg.to_dict(), "nope": 1})


# (f), (g)


def test_feature_lengths_match_hf(hf):
    m = hf["base"]
    lengths = np.arange(0, 5000, 7)
    want = m.model._get_feat_extract_output_lengths(torch.from_numpy(lengths)).numpy()
    np.testing.assert_array_equal(feature_lengths(m.cfg, lengths), want)
    np.testing.assert_array_equal(np.asarray(feature_lengths(m.cfg, jnp.asarray(lengths))), want)
    assert feature_lengths(m.cfg, 16000) == int(m.model._get_feat_extract_output_lengths(16000))
    big = WavLMConfig.from_hf(presets.WAVLM["wavlm-large"])
    assert feature_lengths(big, 16000) == 49  # 20 ms frames


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_compute_stays_close(hf, family):
    m = hf[family]
    audio, mask = _batch()
    ref, _ = _hf_states(m.model, audio, mask)
    out = _ours(m.cfg, m.params, audio, mask, dtype=jnp.bfloat16)
    assert all(h.dtype == jnp.bfloat16 for h in out.hidden_states)
    rel = _assert_states_match(out.hidden_states, ref, 5e-2)
    print(f"{family} bf16: max rel diff {rel:.2e}")


def test_param_tree_has_logical_axes_and_hf_param_count(hf):
    cfg = hf["base"].cfg
    boxed = jax.eval_shape(WavLM(cfg).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 400), jnp.float32))
    leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)
    ours = sum(int(np.prod(x.value.shape)) for x in leaves)
    # The weight norm's g (one per tap) is folded into our kernel.
    skip = ("masked_spec_embed", "encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    theirs = sum(p.numel() for n, p in hf["base"].model.named_parameters() if n not in skip)
    assert ours == theirs
    layer0 = hf["base"].params["encoder"]["layers_0"]["attention"]
    assert layer0["q"]["kernel"].shape == (32, 32) and layer0["rel_attn_embed"].shape == (32, 4)
    assert "rel_attn_embed" not in hf["base"].params["encoder"]["layers_1"]["attention"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_layers_match_hf(family, tmp_path):
    """`scan_layers`: layer 0 (owner of rel_attn_embed) stays unrolled, layers 1..3 run under
    nn.scan on stacked params; every hidden state matches HF at 1e-4."""
    from speechverse_jax.models.scan_layout import tree_to_layout

    torch.manual_seed(7)
    model = transformers.WavLMModel(transformers.WavLMConfig(**dict(TINY, num_hidden_layers=4),
                                                             **FAMILIES[family])).eval()
    _perturb(model)
    model.save_pretrained(str(tmp_path / family))
    cfg, params = convert_wavlm(HFCheckpoint(str(tmp_path / family)))
    stacked = tree_to_layout(params, scanned=True)
    assert set(stacked["encoder"]) >= {"layers_0", "layers"} and "layers_1" not in stacked["encoder"]
    assert "rel_attn_embed" in stacked["encoder"]["layers_0"]["attention"]
    audio, mask = _batch()
    ref, ref_last = _hf_states(model, audio, mask)
    out = jax.jit(WavLM(cfg, scan_layers=True).apply)({"params": stacked}, jnp.asarray(audio), jnp.asarray(mask))
    rel = _assert_states_match(out.hidden_states, ref, 1e-4)
    assert _rel(out.last_hidden_state, ref_last) <= 1e-4
    print(f"{family} scanned: max rel diff {rel:.2e}")
