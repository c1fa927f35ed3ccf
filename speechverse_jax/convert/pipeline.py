"""`speechverse-jax convert`: two HF folders -> one converted base checkpoint (+ verification)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_dtypes
import numpy as np

from speechverse_jax import checkpoints, fs
from speechverse_jax.convert.hf_io import HFCheckpoint, tokenizer_files
from speechverse_jax.convert.t5 import convert_t5
from speechverse_jax.convert.wavlm import convert_wavlm

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass(frozen=True)
class LLMSource:
    """How one kind of LLM folder converts: `key` in the base folder ('t5' | 'llm'), the converter,
    the HF checker (imported lazily: it needs torch), the tokenizer files to carry over, and the
    files whose presence means a usable tokenizer."""

    key: str
    convert: Callable
    verify: Callable[[], Callable]
    tokenizer_files: Callable[[str], Sequence[str]]
    tokenizer_markers: Tuple[str, ...]
    metadata: Dict = dataclasses.field(default_factory=dict)


def _verify_t5():
    from speechverse_jax.convert.verify import verify_t5

    return verify_t5


T5_SOURCE = LLMSource("t5", convert_t5, _verify_t5, tokenizer_files, ("spiece.model", "tokenizer.json"))


def convert_checkpoints(
    wavlm_dir: str,
    t5_dir: str,
    out_dir: str,
    dtype: str = "float32",
    verify: bool = False,
    report_path: Optional[str] = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
) -> Dict:
    """HF WavLM + T5 folders: convert, optionally verify against HF PyTorch in float32, then save in
    `dtype`. Returns the report dict. When verification fails nothing is written to `out_dir`."""
    return convert_base(wavlm_dir, t5_dir, T5_SOURCE, out_dir, dtype, verify, report_path, overwrite, tolerance)


def convert_base(wavlm_dir: str, llm_dir: str, source: LLMSource, out_dir: str, dtype: str = "float32",
                 verify: bool = False, report_path: Optional[str] = None, overwrite: bool = False,
                 tolerance: float = 1e-4) -> Dict:
    """WavLM + an LLM of kind `source` -> one base folder (the shared path of every `convert`)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if fs.exists(out_dir) and not overwrite:
        raise checkpoints.BaseCheckpointError(f"{out_dir} exists; pass --overwrite to replace it")
    t0 = time.time()
    report: Dict = {"out": str(out_dir), "dtype": dtype}
    parts = {}
    for name, folder, fn in (("wavlm", wavlm_dir, convert_wavlm), (source.key, llm_dir, source.convert)):
        ckpt = HFCheckpoint(folder)
        cfg, params = fn(ckpt, dtype=np.float32)
        parts[name] = (cfg, params)
        report[name] = {"source": str(folder), "format": ckpt.weights_format, "params": _count(params)}
        print(f"converted {name}: {folder} ({ckpt.weights_format}), {_count(params):,} params")
    if hasattr(parts[source.key][0], "family"):
        report[source.key]["family"] = parts[source.key][0].family

    if verify:
        from speechverse_jax.convert import verify as verify_lib

        results = verify_lib.verify_wavlm(wavlm_dir, *parts["wavlm"], tolerance=tolerance)
        results += source.verify()(llm_dir, *parts[source.key], tolerance=tolerance)
        report["verify"] = {"tolerance": tolerance, "compared_in": "float32",
                            "passed": all(r["ok"] for r in results), "results": results}
        _print_verify_table(results)

    if report_path:
        fs.write_text(report_path, json.dumps(report, indent=2))
    if verify and not report["verify"]["passed"]:
        return report

    storage = STORAGE_DTYPES[dtype]
    params = {name: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(storage), p) for name, (_, p) in parts.items()}
    extra = tuple(source.tokenizer_files(llm_dir))
    if not any(f.endswith(source.tokenizer_markers) for f in extra):
        print(f"note: no tokenizer files in {llm_dir}; training and inference need one in {out_dir}")
    metadata = {"dtype": dtype, **source.metadata, "source": {"wavlm": str(wavlm_dir), source.key: str(llm_dir)}}
    checkpoints.save_base(out_dir, parts["wavlm"][0], parts[source.key][0], params, extra, metadata, overwrite,
                          llm_key=source.key)
    if verify:
        fs.write_text(f"{out_dir}/verify_report.json", json.dumps(report, indent=2))
    print(f"wrote {out_dir} in {time.time() - t0:.1f}s")
    return report


def _print_verify_table(results) -> None:
    print(f"{'tensor':32s} {'max_abs':>12s} {'max_rel':>12s}  ok")
    for r in results:
        if "error" in r:
            print(f"{r['tensor']:32s} {'-':>12s} {'-':>12s}  NO ({r['error']})")
        else:
            print(f"{r['tensor']:32s} {r['max_abs']:12.3e} {r['max_rel']:12.3e}  {'yes' if r['ok'] else 'NO'}")
