"""Export to the HF layout is the exact inverse of conversion, and HF transformers loads it."""


import jax
import numpy as np
import pytest

from speechverse_jax.convert.export import export_t5, export_wavlm
from speechverse_jax.convert.hf_io import HFCheckpoint
from speechverse_jax.convert.t5 import convert_t5
from speechverse_jax.convert.verify import verify_t5, verify_wavlm
from speechverse_jax.convert.wavlm import convert_wavlm


def _same(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-7, err_msg=str(k))


@pytest.mark.parametrize("family", ["base", "large"])
def test_wavlm_round_trip_and_hf_parity(family, tmp_path):
    from speechverse_jax import hf_tiny

    src = hf_tiny.save_wavlm(str(tmp_path / "src"), family=family)
    cfg, params = convert_wavlm(HFCheckpoint(src))
    out = export_wavlm(cfg, params, str(tmp_path / "exported"))
    cfg2, params2 = convert_wavlm(HFCheckpoint(out))
    assert cfg2 == cfg
    _same(params, params2)
    results = verify_wavlm(out, cfg2, params2)  # transformers loads the exported folder
    assert all(r["ok"] for r in results), results


@pytest.mark.parametrize("flan", [True, False])
def test_t5_round_trip_and_hf_parity(flan, tmp_path):
    from speechverse_jax import hf_tiny

    src = hf_tiny.save_t5(str(tmp_path / "src"), flan=flan)
    cfg, params = convert_t5(HFCheckpoint(src))
    out = export_t5(cfg, params, str(tmp_path / "exported"))
    cfg2, params2 = convert_t5(HFCheckpoint(out))
    assert cfg2 == cfg
    _same(params, params2)
    assert all(r["ok"] for r in verify_t5(out, cfg2, params2))


def test_export_refuses_lora_leaves(tmp_path):
    from speechverse_jax import hf_tiny

    cfg, params = convert_t5(HFCheckpoint(hf_tiny.save_t5(str(tmp_path / "src"))))
    params["encoder"]["block_0"]["self_attention"]["q"]["lora_a"] = np.zeros((64, 2), np.float32)
    with pytest.raises(KeyError, match="merge or drop LoRA"):
        export_t5(cfg, params, str(tmp_path / "x"))
