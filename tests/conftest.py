"""Test-wide settings: CPU only, a persistent compilation cache, quiet and deterministic torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "SPEECHVERSE_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # torch is a test-only dependency; keep it from fighting JAX for the 2 cores.
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
except ImportError:  # pragma: no cover
    pass


import pytest  # noqa: E402

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
