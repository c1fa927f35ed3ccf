"""Read a Hugging Face model folder without torch: `config.json` plus weights.

Weights may be a single `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin` (the last needs torch, imported only then).
Safetensors files are parsed from their header and memory-mapped, so tensors are read one at a
time and peak memory stays near the size of what is being converted.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterator, Tuple

import ml_dtypes
import numpy as np

from speechverse_jax import fs

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint does not fit what we expect; the message names the offending files/tensors."""


def _read_safetensors_header(path: str) -> Tuple[int, dict]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return 8 + header_len, header


class _SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        self.data_start, self.header = _read_safetensors_header(path)
        self.size = os.path.getsize(path)
        self._mmap = None

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if self.data_start + end > self.size:
            raise CheckpointError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self.data_start + begin : self.data_start + end]
        # Copy: the converted array must outlive the memory map and be writable.
        return np.array(buf.view(dtype).reshape(info["shape"]))


class HFCheckpoint:
    """A Hugging Face model folder: `config` (dict), tensor names/shapes, and lazy `get(name)`."""

    def __init__(self, folder: str):
        self.folder = folder
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
        with open(config_path) as f:
            self.config: dict = json.load(f)
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._loaders: Dict[str, Callable[[], np.ndarray]] = {}
        self.weights_format = self._index_weights()

    def _index_weights(self) -> str:
        single = os.path.join(self.folder, "model.safetensors")
        index = os.path.join(self.folder, "model.safetensors.index.json")
        torch_bin = os.path.join(self.folder, "pytorch_model.bin")
        torch_index = os.path.join(self.folder, "pytorch_model.bin.index.json")
        if os.path.isfile(single):
            self._add_safetensors(single)
            return "safetensors"
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(self.folder, shard)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index} names shard {shard}, which is missing")
                self._add_safetensors(path)
            missing = sorted(set(weight_map) - set(self._shapes))
            if missing:
                raise CheckpointError(f"{index}: tensors listed but absent from their shards: {missing[:10]}")
            return "safetensors-sharded"
        if os.path.isfile(torch_bin) or os.path.isfile(torch_index):
            self._add_torch_bins(torch_bin, torch_index)
            return "pytorch-bin"
        raise CheckpointError(
            f"{self.folder}: no weights found (looked for model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin)"
        )

    def _add_safetensors(self, path: str) -> None:
        st = _SafetensorsFile(path)
        for name in st.header:
            self._shapes[name] = st.shape(name)
            self._loaders[name] = lambda n=name, s=st: s.get(n)

    def _add_torch_bins(self, single: str, index: str) -> None:
        try:
            import torch  # noqa: F401  (only .bin checkpoints need torch)
        except ImportError:
            raise CheckpointError(
                f"{self.folder} holds pytorch_model.bin weights, which need torch to read. "
                "Install it with `pip install torch==2.13.0` (CPU), or convert the folder to "
                "safetensors first."
            ) from None
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(self.folder, p) for p in files]
        else:
            paths = [single]
        for path in paths:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                self._shapes[name] = tuple(tensor.shape)
                self._loaders[name] = lambda t=tensor: _torch_to_numpy(t)

    def names(self) -> Iterator[str]:
        return iter(sorted(self._shapes))

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def get(self, name: str) -> np.ndarray:
        if name not in self._loaders:
            raise CheckpointError(f"{self.folder}: no tensor named {name}")
        return self._loaders[name]()


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)
    return tensor.detach().numpy().copy()


TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def tokenizer_files(folder: str) -> list[str]:
    """The tokenizer (and generation) files present in an HF folder."""
    return [os.path.join(folder, n) for n in TOKENIZER_FILES if fs.exists(os.path.join(folder, n))]
