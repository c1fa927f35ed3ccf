"""Test-wide settings: CPU only, fast XLA:CPU compiles, a persistent compilation cache, quiet and
deterministic torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite compiles hundreds of tiny programs and runs each a few times, so XLA:CPU's LLVM
# optimisation costs more than it saves (measured cold: test_train + test_t5 118 s -> 88 s, the
# quick demo + quick recipe 229 s -> 180 s). Set before jax is imported, so subprocesses inherit it;
# the CLI and bench/ keep XLA's defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()

import jax  # noqa: E402

_CACHE = os.environ.get(
    "SPEECHVERSE_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cached_env(**extra):
    """os.environ for a subprocess that runs JAX on CPU with this run's persistent compilation cache
    (programs a test compiles in several processes are compiled once)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                **extra)

try:  # torch is a test-only dependency; keep it from fighting JAX for the 2 cores.
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test of 20 s or more on 2 cores (run first; "
                                       "`-m 'not slow'` for a quick loop)")
    config.addinivalue_line("markers", "xdist_group(name): tests that share an expensive module fixture run on "
                                       "one worker (`--dist loadgroup`)")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (collection order otherwise): `-n 2 --dist loadgroup` hands tests out one
    at a time, so the long ones start at once on both workers and the short ones fill in after,
    instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

TINY_TEXTS = [
    "turn on the radio now",
    "what is the time in paris",
    "set an alarm for seven",
    "transcribe the preceding audio",
    "play some jazz music please",
] * 8


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Tiny random HF folders: {'wavlm': large-family WavLM, 't5': Flan-style T5 with a tokenizer}."""
    from speechverse_jax import hf_tiny

    root = tmp_path_factory.mktemp("hf")
    spm = hf_tiny.train_spiece(TINY_TEXTS, str(root / "tok"), vocab_size=64)
    return {
        "wavlm": hf_tiny.save_wavlm(str(root / "wavlm"), family="large"),
        "t5": hf_tiny.save_t5(str(root / "t5"), flan=True, spiece_model=spm),
    }


@pytest.fixture(scope="session")
def tiny_base(tiny_hf, tmp_path_factory):
    """A converted base checkpoint folder of the tiny backbones (no verification)."""
    from speechverse_jax.convert.pipeline import convert_checkpoints

    out = str(tmp_path_factory.mktemp("base") / "base")
    convert_checkpoints(tiny_hf["wavlm"], tiny_hf["t5"], out)
    return out


def write_fake_release(folder, texts, seed=0, vocab_size=64, t5_vocab=128, held_out_seed=0, wavlm_overrides=None):
    """Tiny random HF backbones in the shipped layout (demo/shipped.py) with a MANIFEST.json whose
    held-out fingerprint is the demo corpus's of `held_out_seed`. Returns the folder."""
    from speechverse_jax import hf_tiny
    from speechverse_jax.demo import shipped
    from speechverse_jax.demo.corpus import held_out_fingerprint

    folder = str(folder)
    spm = hf_tiny.train_spiece(texts, folder + ".spm", vocab_size=vocab_size)
    hf_tiny.save_wavlm(os.path.join(folder, "wavlm"), family="large", seed=seed, **(wavlm_overrides or {}))
    hf_tiny.save_t5(os.path.join(folder, "t5"), flan=True, seed=seed, spiece_model=spm, vocab_size=t5_vocab)
    shipped.write_manifest(folder, {"profile": "quick", "seed": held_out_seed, "fake": True}, "quick",
                           {"wavlm_dev_cer": {"value": 97.5, "threshold": 100.0, "op": "<="}},
                           {"seed": held_out_seed, "fingerprint": held_out_fingerprint(held_out_seed)}, 1.0)
    return folder


@pytest.fixture(scope="session")
def fake_release(tmp_path_factory):
    """A fake backbones release (tiny random WavLM + T5 with a tokenizer) for the demo corpus of seed 0."""
    return write_fake_release(tmp_path_factory.mktemp("release") / "release", TINY_TEXTS)


@pytest.fixture(scope="session")
def make_fake_release():
    """`write_fake_release(folder, texts, ...)` for tests that need a release of their own."""
    return write_fake_release


# -- CLI curriculum runs on tiny manifests (test_cli_train, test_decoder_train, test_faults) --------
ASR_STEPS = 3  # asr_manifest: 12 clips, batches of 4: one epoch per stage


@pytest.fixture(scope="session")
def asr_manifest(tmp_path_factory):
    """12 clips of noise (0.3-0.9 s) with ASR targets, ids u0..u11 (manifest path)."""
    import numpy as np
    import soundfile as sf

    from speechverse_jax.data.manifest import write_manifest

    texts = ["turn on the radio now", "what is the time in paris", "set an alarm for seven",
             "play some jazz music please"]
    root = tmp_path_factory.mktemp("asr")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        sf.write(str(root / f"{i}.wav"), (rng.standard_normal(int(rng.uniform(0.3, 0.9) * 16000)) * 0.1)
                 .astype(np.float32), 16000)
        rows.append({"audio": f"{i}.wav", "task": "asr", "target": texts[i % 4], "id": f"u{i}"})
    write_manifest(str(root / "train.jsonl"), rows)
    return str(root / "train.jsonl")


# 1 s clips, batches of 4, short buckets: what every stage of those runs shares.
SMALL_STAGE = ("train.log_every=1", "train.tensorboard=False", "data.batch_size=4", "data.audio_buckets_seconds=(1.0,)",
               "data.max_audio_seconds=1.0", "data.instruction_buckets=(64,128,256)", "data.target_buckets=(32,)",
               "data.max_target_tokens=32", "optim.warmup_steps=1", "optim.lr=0.01", "model.lora.rank=4")
FLOAT32 = ("model.dtype=float32", "model.frozen_param_dtype=float32")


def stage_flags(prefix="", steps=2, eval_every=2, checkpoint_every=2, extra=()):
    """`--config.<prefix>field=value` flags of one small training stage (`prefix` '' for `train`,
    'stage1.' and so on for a stage of `curriculum`)."""
    fields = (f"train.max_steps={steps}", f"train.eval_every={eval_every}",
              f"train.checkpoint_every={checkpoint_every}", *SMALL_STAGE, *extra)
    return [f"--config.{prefix}{f}" for f in fields]


def curriculum_argv(base, manifest, workdir, stages=("stage1", "stage2_warmup", "stage2_multitask"), config=None,
                    **flags):
    """`speechverse-jax curriculum` arguments: `config` (default configs/curriculum.py) on `base`, one
    manifest to train and validate on, `stage_flags(**flags)` for every stage; stage 1 without LoRA."""
    argv = ["curriculum", "--config", config or os.path.join(REPO, "configs", "curriculum.py"), "--workdir", workdir,
            f"--config.base_checkpoint={base}", f"--config.data.train_manifests={manifest}",
            f"--config.data.eval_manifests={manifest}"]
    for stage in stages:
        argv += stage_flags(f"{stage}.", **flags)
    return argv + ["--config.stage1.model.lora.rank=0"]


def check_stages_done(workdir, stages=("stage1", "stage2_warmup", "stage2_multitask"), steps=2):
    """Every stage of a curriculum run finished: its DONE.json says `steps` steps and a finite best
    validation loss. -> {stage: DONE.json}."""
    import json

    import numpy as np

    done = {}
    for stage in stages:
        with open(os.path.join(workdir, stage, "DONE.json")) as f:
            done[stage] = json.load(f)
        assert done[stage]["steps"] == steps and np.isfinite(done[stage]["best_val_loss"]), (stage, done[stage])
    return done
