import builtins
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from speechverse_jax.convert.hf_io import CheckpointError, HFCheckpoint


def _folder(tmp_path, tensors, name="model.safetensors"):
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, str(tmp_path / name))
    return str(tmp_path)


def test_reads_each_dtype_lazily_and_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b.half": rng.standard_normal((5,)).astype(np.float16),
        "c.bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "d.int": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    ckpt = HFCheckpoint(_folder(tmp_path, tensors))
    assert ckpt.weights_format == "safetensors"
    assert sorted(ckpt.names()) == sorted(tensors)
    for k, v in tensors.items():
        assert ckpt.shape(k) == v.shape
        got = ckpt.get(k)
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got.astype(np.float64), v.astype(np.float64))


def test_sharded_index(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"x": np.ones((2,), np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": np.zeros((3,), np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.weights_format == "safetensors-sharded"
    np.testing.assert_array_equal(ckpt.get("y"), np.zeros(3))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        HFCheckpoint(str(tmp_path))


def test_truncated_file_names_the_tensor(tmp_path):
    folder = _folder(tmp_path, {"big": np.ones((1000,), np.float32)})
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="big runs past the end"):
        HFCheckpoint(folder).get("big")


def test_garbage_file_and_missing_pieces(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        HFCheckpoint(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        HFCheckpoint(str(empty))


def test_bin_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(CheckpointError, match=r"need torch.*torch==2.13.0"):
        HFCheckpoint(str(tmp_path))
