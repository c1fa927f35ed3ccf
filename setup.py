"""speechverse-jax: SpeechVerse (frozen WavLM + Flan-T5 with LoRA) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="speechverse-jax",
    version="0.1.0",
    description="JAX/Flax, TPU-first reimplementation of SpeechVerse (arXiv 2405.08295)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["speechverse_jax", "speechverse_jax.*"]),
    # the demo's backbones release (speechverse-jax demo-backbones; demo/shipped.py checks it)
    package_data={"speechverse_jax.demo": ["pretrained/MANIFEST.json", "pretrained/**/*"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "librosa>=0.11.0",
        "soundfile",
        "ml-collections>=1.1.0",
        "transformers>=5.0",
        "safetensors>=0.8.0",
        "sentencepiece>=0.2.3",
        "jiwer>=4.0.0",
        "sacrebleu",
        "tqdm",
        "absl-py",
        "matplotlib",
        "tensorboardX",
        "numpy",
    ],
    extras_require={
        # PyTorch only verifies conversions and runs the parity tests; pinned to the CPU wheel.
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "libtpu==0.0.42.1"],  # libtpu: deviceless TPU compiles
        # Accelerator runtimes at the locked jax version (requirements/cpu.lock): libtpu / CUDA 12 plugin.
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda": ["jax[cuda12]==0.10.2"],
        # gs:// paths (etils.epath -> fsspec): run folders, manifests and audio on Cloud Storage.
        "gcs": ["gcsfs==2026.10.1"],
    },
    entry_points={"console_scripts": ["speechverse-jax=speechverse_jax.cli:main"]},
)
