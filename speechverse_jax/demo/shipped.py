"""The demo's backbones as a release artifact: made once by `speechverse-jax demo-backbones`, shipped
inside the package, checked by checksums and converted like downloaded weights.

A backbones folder (the packaged `PRETRAINED_DIR`, or the `release/` folder the recipe writes):

    wavlm/config.json, wavlm/model.safetensors     HF `WavLMModel` layout (convert/export.py)
    t5/config.json, t5/model.safetensors,          HF `T5ForConditionalGeneration` layout, with the
    t5/spiece.model, t5/tokenizer_config.json ...  tokenizer `save_pretrained` writes
    lm/config.json, lm/model.safetensors,          HF `LlamaForCausalLM` layout (the decoder-only
    lm/tokenizer.json, lm/chat_template.jinja ...  LM, from release 4 on), with its own tokenizer
    MANIFEST.json                                  see `write_manifest`

    write_manifest(folder, recipe, profile, gates, held_out, wall_seconds) -> manifest   # the recipe, last
    verify_checksums(folder) -> manifest          # every file listed, present and unchanged
    check_corpus_compatible(manifest, corpus_seed)
    convert_shipped(folder, out_base_dir, layout) -> report   # `convert --verify`, reused when unchanged
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from typing import Any, Dict, List, Mapping, Optional

from speechverse_jax.errors import UserError

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
MANIFEST = "MANIFEST.json"
FORMAT = 1
# Files the demo cannot do without; the tokenizer may add more (all of them are checksummed).
REQUIRED_FILES = ("wavlm/config.json", "wavlm/model.safetensors", "t5/config.json", "t5/model.safetensors",
                  "t5/spiece.model")
# What the demo's decoder-only layout (`layout='decoder'`) needs besides the WavLM.
LM_FILES = ("lm/config.json", "lm/model.safetensors", "lm/tokenizer.json")
LAYOUT_LLM = {"t5": "t5", "decoder": "lm"}  # the release subfolder each demo layout converts
MANIFEST_KEYS = ("format", "files", "recipe", "profile", "commit", "wall_seconds", "machine", "gates", "held_out")
GATE_OPS = ("<=", ">=")
CONVERTED_STAMP = ".source.json"  # beside the converted base: `<base>.source.json`


# ---------------------------------------------------------------------------------------------
# Writing (the recipe)

def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(folder: str) -> List[str]:
    """Every file under `folder` but MANIFEST.json, as sorted '/'-separated relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_table(folder: str) -> Dict[str, str]:
    """{relative path: sha256 hex} of every file under `folder` but MANIFEST.json."""
    return {rel: sha256_file(os.path.join(folder, rel)) for rel in list_files(folder)}


def check_gates(gates: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """{name: {value, threshold, op}} -> the same with `passed` computed (a given `passed` must agree)."""
    out = {}
    for name, gate in gates.items():
        missing = [k for k in ("value", "threshold", "op") if k not in gate]
        if missing:
            raise ValueError(f"gate {name!r}: missing {missing} (needs value, threshold, op)")
        if gate["op"] not in GATE_OPS:
            raise ValueError(f"gate {name!r}: op must be one of {GATE_OPS}, got {gate['op']!r}")
        value, threshold = float(gate["value"]), float(gate["threshold"])
        passed = value <= threshold if gate["op"] == "<=" else value >= threshold
        if "passed" in gate and bool(gate["passed"]) != passed:
            raise ValueError(f"gate {name!r}: passed={gate['passed']} but {value} {gate['op']} {threshold} is {passed}")
        out[str(name)] = {"value": value, "threshold": threshold, "op": gate["op"], "passed": passed}
    return out


def git_commit() -> str:
    """The source tree's commit (HEAD), with '+dirty' when tracked files under the package or configs/
    differ from it (the release was made by uncommitted code), or 'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "speechverse_jax",
                                  "configs"], cwd=top or here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    if out.returncode != 0 or len(sha) != 40:
        return "unknown"
    # the release folder itself is written into the package before it is committed: not a code change
    code = [line for line in changed.stdout.splitlines() if "/demo/pretrained/" not in line]
    return sha + "+dirty" if changed.returncode == 0 and code else sha


def machine_info() -> Dict[str, Any]:
    """Where the recipe ran: OS, CPU count, Python and JAX versions, the JAX devices."""
    info: Dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()})
        info["device_count"] = jax.device_count()
    except Exception as e:  # noqa: BLE001 - provenance only: a broken backend must not lose the release
        info["jax_error"] = f"{type(e).__name__}: {e}"
    return info


def write_manifest(folder: str, recipe: Mapping[str, Any], profile: str, gates: Mapping[str, Mapping[str, Any]],
                   held_out: Mapping[str, Any], wall_seconds: float,
                   reported: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """Write `folder/MANIFEST.json` over the files already in `folder`; returns the manifest.

    recipe: the full recipe config (a ConfigDict or dict; stored as plain JSON); profile: 'full' or
    'quick'; gates: {name: {'value', 'threshold', 'op': '<=' | '>='}} (`passed` is computed);
    held_out: {'seed': int, 'fingerprint': corpus.held_out_fingerprint(seed)}; reported: measurements
    without a gate (e.g. the encoder's CER on voices beyond the corpus). Fills in the sha256
    of every file, the git commit and the machine. Call it last: any later change to a file
    fails `verify_checksums`.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such backbones folder")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(f"{folder}: missing {missing}: not the backbones layout (shipped.REQUIRED_FILES)")
    if set(held_out) != {"seed", "fingerprint"}:
        raise ValueError(f"held_out must be {{'seed', 'fingerprint'}}, got keys {sorted(held_out)}")
    recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
    manifest = {
        "format": FORMAT,
        "files": file_table(folder),
        "recipe": json.loads(json.dumps(recipe)),  # plain JSON: tuples become lists, as a reader sees them
        "profile": str(profile),
        "commit": git_commit(),
        "wall_seconds": round(float(wall_seconds), 1),
        "machine": machine_info(),
        "gates": check_gates(gates),
        "reported": {str(k): float(v) for k, v in sorted((reported or {}).items())},
        "held_out": {"seed": int(held_out["seed"]), "fingerprint": str(held_out["fingerprint"])},
    }
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading and checking (the demo)

def read_manifest(folder: str) -> Dict[str, Any]:
    """`folder/MANIFEST.json`, its keys and types checked."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing: {folder} is not a backbones release folder (made by "
                        "`speechverse-jax demo-backbones`, or --pretrain-backbones to make one)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: must hold a JSON object, got {type(manifest).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path}: missing keys {missing}")
    if manifest["format"] != FORMAT:
        raise UserError(f"{path}: format {manifest['format']!r}, this code reads format {FORMAT}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
        raise UserError(f"{path}: 'files' must map relative paths to sha256 hex digests")
    outside = [k for k in files if k.startswith("/") or ".." in k.split("/")]
    if outside:
        raise UserError(f"{path}: 'files' names paths outside the folder: {outside[:3]}")
    held = manifest["held_out"]
    if not isinstance(held, dict) or not isinstance(held.get("fingerprint"), str) or "seed" not in held:
        raise UserError(f"{path}: 'held_out' must be {{'seed': int, 'fingerprint': str}}")
    if not isinstance(manifest["gates"], dict) or not isinstance(manifest["recipe"], dict):
        raise UserError(f"{path}: 'gates' and 'recipe' must be JSON objects")
    return manifest


def verify_checksums(folder: str) -> Dict[str, Any]:
    """The manifest, once every file it lists is present with its sha256 and no other file is there."""
    manifest = read_manifest(folder)
    listed = manifest["files"]
    unlisted = [f for f in REQUIRED_FILES if f not in listed]
    if unlisted:
        raise UserError(f"{os.path.join(folder, MANIFEST)}: does not list {unlisted} (the backbones layout)")
    on_disk = set(list_files(folder))
    for rel in sorted(listed):
        if rel not in on_disk:
            raise UserError(f"{os.path.join(folder, rel)}: missing (listed in {MANIFEST})")
    for rel in sorted(on_disk):
        if rel not in listed:
            raise UserError(f"{os.path.join(folder, rel)}: not listed in {MANIFEST} (a file added after the "
                            "release was made)")
    for rel in sorted(listed):
        actual = sha256_file(os.path.join(folder, rel))
        if actual != listed[rel]:
            raise UserError(f"{os.path.join(folder, rel)}: sha256 {actual[:16]}... differs from {MANIFEST} "
                            f"({listed[rel][:16]}...): the file changed after the release was made")
    return manifest


def check_corpus_compatible(manifest: Mapping[str, Any], corpus_seed: int) -> None:
    """Refuse backbones whose pretraining did not hold out this corpus's dev/test sentences."""
    from speechverse_jax.demo.corpus import held_out_fingerprint

    held = manifest["held_out"]
    if held["fingerprint"] != held_out_fingerprint(int(corpus_seed)):
        raise UserError(
            f"the backbones (MANIFEST.json held_out.fingerprint) held out the dev/test sentences of the corpus "
            f"of seed {held['seed']}, not those of this corpus (seed {corpus_seed}): their pretraining may have "
            f"seen this corpus's dev/test sentences. Use --pretrain-backbones (backbones for this corpus) or "
            f"the recipe's seed (--config.seed={held['seed']})")


def manifest_sha256(folder: str) -> str:
    """Names the whole release: the manifest holds every file's sha256."""
    return sha256_file(os.path.join(folder, MANIFEST))


# ---------------------------------------------------------------------------------------------
# Converting (the same path as downloaded weights)

def recipe_summary(manifest: Mapping[str, Any], folder: str) -> Dict[str, Any]:
    """Provenance and sizes for a report: profile, commit, seed, time, machine, and the architectures
    read from the HF configs (the LM's when the release has one)."""
    def config(name):
        with open(os.path.join(folder, name, "config.json"), encoding="utf-8") as f:
            return json.load(f)

    wavlm, t5 = config("wavlm"), config("t5")
    out = {
        "profile": manifest["profile"], "commit": manifest["commit"], "seed": manifest["recipe"].get("seed"),
        "wall_seconds": manifest["wall_seconds"], "machine": manifest["machine"],
        "held_out_seed": manifest["held_out"]["seed"],
        "wavlm": {k: wavlm.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        "t5": {k: t5.get(k) for k in ("d_model", "num_layers", "num_decoder_layers", "num_heads", "vocab_size")},
    }
    if os.path.isfile(os.path.join(folder, "lm", "config.json")):
        lm = config("lm")
        out["lm"] = {k: lm.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "vocab_size")}
    return out


def convert_shipped(folder: str, out_base_dir: str, progress: bool = True, layout: str = "t5") -> Dict[str, Any]:
    """Checksums, then `speechverse-jax convert --verify` of `folder` into `out_base_dir`: the WavLM
    with the T5 (`layout` 't5') or with the decoder-only LM ('decoder'). A base already converted
    from the same MANIFEST.json and layout (`<out_base_dir>.source.json`) is reused.

    Returns the report: base_dir, source, layout, manifest_sha256, tokenizer_pieces,
    max_rel_diff_vs_hf, gates, recipe (recipe_summary), seconds, reused.
    """
    from speechverse_jax.convert.pipeline import convert_checkpoints
    from speechverse_jax.convert.pipeline_decoder import convert_decoder_checkpoints
    from speechverse_jax.data.tokenizer import load_tokenizer

    if layout not in LAYOUT_LLM:
        raise UserError(f"layout must be one of {sorted(LAYOUT_LLM)}, got {layout!r}")
    say = (lambda msg: print(f"[backbones] {msg}", flush=True)) if progress else (lambda msg: None)
    t0 = time.time()
    folder, out_base_dir = os.path.abspath(folder), os.path.abspath(out_base_dir)
    manifest = verify_checksums(folder)
    if layout == "decoder":
        absent = [f for f in LM_FILES if f not in manifest["files"]]
        if absent:
            raise UserError(f"{folder}: this release has no decoder-only LM ({absent[0]} is not in {MANIFEST}; "
                            "releases before 4 have none): use the shipped release or make one with "
                            "`speechverse-jax demo-backbones`")
    digest = manifest_sha256(folder)
    stamp = out_base_dir.rstrip("/") + CONVERTED_STAMP
    if os.path.isfile(os.path.join(out_base_dir, "model_config.json")) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("manifest_sha256") == digest and previous.get("layout", "t5") == layout:
            say(f"reusing {out_base_dir} (converted from the same {MANIFEST})")
            return dict(previous, reused=True)
    if os.path.exists(stamp):
        os.remove(stamp)  # the base is about to change: never leave a stamp naming the old one
    llm_dir = os.path.join(folder, LAYOUT_LLM[layout])
    say(f"converting {os.path.join(folder, 'wavlm')} + {llm_dir} with --verify (checksums passed)")
    convert = convert_checkpoints if layout == "t5" else convert_decoder_checkpoints
    result = convert(os.path.join(folder, "wavlm"), llm_dir, out_base_dir, verify=True, overwrite=True)
    checks = result["verify"]["results"]
    if not result["verify"]["passed"]:
        failed = [r for r in checks if not r.get("ok")]
        raise UserError(f"{folder}: conversion failed verification against HF PyTorch (tolerance "
                        f"{result['verify']['tolerance']}): {failed[:3]}; nothing written to {out_base_dir}")
    report = {
        "base_dir": out_base_dir, "source": folder, "layout": layout, "manifest_sha256": digest,
        "tokenizer_pieces": len(load_tokenizer(llm_dir)),
        "max_rel_diff_vs_hf": max(r["max_rel"] for r in checks),
        "verify_tolerance": result["verify"]["tolerance"],
        "gates": manifest["gates"], "recipe": recipe_summary(manifest, folder),
        "seconds": round(time.time() - t0, 1),
    }
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return dict(report, reused=False)
