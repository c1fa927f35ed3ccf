"""`speechverse-jax convert` end to end: formats, --verify, --dtype, and failures that leave nothing behind."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np

from speechverse_jax import checkpoints, hf_tiny
from speechverse_jax.cli import main


def _leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_convert_verify_writes_a_loadable_folder_and_report(tiny_hf, tmp_path):
    out, report = str(tmp_path / "base"), str(tmp_path / "report.json")
    rc = main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", tiny_hf["t5"], "--out", out,
               "--verify", "--report", report])
    assert rc == 0
    rep = json.loads(open(report).read())
    assert rep["verify"]["passed"]
    names = [r["tensor"] for r in rep["verify"]["results"]]
    assert names.count("t5.logits") == 1 and sum(n.startswith("wavlm.hidden_states") for n in names) == 3
    for r in rep["verify"]["results"]:
        assert r["max_rel"] <= 1e-4 and r["max_abs"] >= 0
    assert os.path.isfile(os.path.join(out, "spiece.model"))
    assert os.path.isfile(os.path.join(out, "verify_report.json"))
    wcfg, tcfg, meta = checkpoints.load_model_config(out)
    assert wcfg.num_hidden_layers == 2 and tcfg.feed_forward_proj == "gated-gelu" and meta["dtype"] == "float32"
    params = checkpoints.load_base_params(out)
    assert set(params) == {"wavlm", "t5"}
    assert not glob.glob(str(tmp_path / "base.partial-*"))


def test_verify_failure_exits_nonzero_and_writes_nothing(tiny_hf, tmp_path):
    out = str(tmp_path / "base")
    rc = main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", tiny_hf["t5"], "--out", out,
               "--verify", "--tolerance", "1e-15", "--report", str(tmp_path / "r.json")])
    assert rc == 1
    assert not os.path.exists(out)
    assert not json.loads(open(tmp_path / "r.json").read())["verify"]["passed"]


def test_bfloat16_storage(tiny_hf, tmp_path):
    out = str(tmp_path / "bf16")
    assert main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", tiny_hf["t5"], "--out", out, "--dtype", "bfloat16"]) == 0
    params = checkpoints.load_base_params(out)
    assert {str(v.dtype) for v in _leaves(params).values()} == {"bfloat16"}


def test_existing_output_needs_overwrite(tiny_base, tiny_hf, capsys):
    # a user error: one line on stderr, exit 2 (checkpoints.BaseCheckpointError underneath)
    assert main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", tiny_hf["t5"], "--out", tiny_base]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_mismatched_checkpoint_leaves_no_output(tiny_hf, tmp_path, capsys):
    # A T5 folder whose config disagrees with its weights (d_ff changed after saving).
    bad = tmp_path / "bad_t5"
    hf_tiny.save_t5(str(bad), flan=True)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["d_ff"] = cfg["d_ff"] * 2
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", str(bad), "--out", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and re.search(r"mis-shaped.*wi_0", err[0]), err  # one line (long lists cut short)
    assert not out.exists() and not glob.glob(str(tmp_path / "out.partial-*"))


def test_pytorch_bin_checkpoint_gives_the_same_params(tiny_hf, tiny_base, tmp_path):
    import torch
    from safetensors.torch import load_file

    bin_dir = tmp_path / "t5_bin"
    bin_dir.mkdir()
    for f in os.listdir(tiny_hf["t5"]):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_hf["t5"], f), bin_dir / f)
    torch.save(load_file(os.path.join(tiny_hf["t5"], "model.safetensors")), bin_dir / "pytorch_model.bin")
    out = str(tmp_path / "from_bin")
    assert main(["convert", "--wavlm", tiny_hf["wavlm"], "--t5", str(bin_dir), "--out", out]) == 0
    a, b = _leaves(checkpoints.load_base_params(out)), _leaves(checkpoints.load_base_params(tiny_base))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_safetensors_conversion_never_imports_torch(tiny_hf, tmp_path):
    code = (
        "import sys; from speechverse_jax.cli import main; "
        f"rc = main(['convert', '--wavlm', {tiny_hf['wavlm']!r}, '--t5', {tiny_hf['t5']!r}, '--out', {str(tmp_path / 'o')!r}]); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'; print('no-torch-ok')"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no-torch-ok" in res.stdout
