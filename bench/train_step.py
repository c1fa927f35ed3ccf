"""Train step and encoder speed: ours (JAX) vs a PyTorch reference of the same model, same weights.

    python bench/train_step.py                                 # tiny, small, medium
    python bench/train_step.py --sizes small --steps 6
    python bench/train_step.py --layout decoder --sizes tiny   # decoder-only LLM (HF Llama + peft)

Per size, two worker processes (one per side, so peak memory does not mix) are built from the
same random HF backbones (`hf_tiny`) and the same trainable init (ours, copied into torch): frozen
WavLM + layer combination + conv downsampler + frozen T5 with LoRA on q, v (bench/torch_reference.py).
Dropout is off on both sides (needed for parity; the speed of a dropout mask is not the question).

1. Parity: one train step (forward + backward + clip + AdamW, constant lr) from the same state on
   the same batch; compared: loss, gradient norm, the clipped gradients (Adam's first moment after
   one step is 0.1 x the clipped gradient, read from both optimizers' states) and the updated
   trainable params. (A first Adam step moves each value by about lr x sign(gradient), so where a
   gradient is near zero float32 rounding can move an updated value by up to lr: the gradient
   comparison is the precise one.)
2. Timing: warm-up, then rounds alternating the two sides (so both see the same machine load),
   each round running `k` steps of one side; step time = the best round's time / k (the median
   and every round are in the JSON).
   Our compile time (lower + compile) is reported apart. Then the same for the encoder-only
   forward (frozen WavLM, all hidden states, as the encoder cache computes them). Torch runs at
   the faster of 1 thread and all cores (`--torch-threads`), picked per size from one timed step
   each: on a busy machine its OpenMP threads can stall for seconds (a tiny step took 12.7 s with
   2 threads and 1.4 s with 1 when two other processes kept both cores busy).
3. FLOPs: the analytic model count of `speechverse_jax/train/flops.py` (matmuls and convs, 2 per
   multiply-add, what the step must compute); XLA's cost analysis of the compiled step (which adds
   elementwise work) is reported next to it and used when the analytic count is unavailable. The
   count divided by each side's step time gives FLOP/s, against the best float32 matmul (2048^3,
   jnp and torch, best of 10) measured in the same workers before and after the timing rounds:
   CPU MFU.
4. Memory: peak RSS of each worker process (`ru_maxrss`, setup and compilation included) and its
   RSS after setup; for ours also XLA's planned temp buffer size of the step.

Prints a table; writes bench/results/train_step.json with the machine description.

`--layout decoder` (`--family llama` default, or `qwen2`) does all of the above for the
decoder-only layout (`models/speechverse_decoder.py`): the LLM is a random HF `LlamaForCausalLM` /
`Qwen2ForCausalLM` (`hf_tiny.save_decoder_lm`, sizes in `DECODER_SIZES`) with peft LoRA on q_proj,
v_proj; the torch side packs `[prefix | audio | instruction | answer]` as ours (right padding,
position ids from the mask) and puts the LM head and the loss on the answer positions only
(bench/torch_reference.py `TorchSpeechVerseDecoder`). Results: bench/results/train_step_decoder.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from speechverse_jax.data.audio import SAMPLE_RATE

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Model + batch per size. 'tiny' takes its backbones from configs/demo_backbones.py (profile 'full').
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(  # backbones, vocab, layer combination and LoRA rank / alpha from the demo config
        from_demo=True, batch=16, seconds=4.0, instruction_len=16, target_len=32),
    "small": dict(
        wavlm=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                   conv_dim=[128] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                   conv_bias=False, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
                   num_buckets=320, max_bucket_distance=800),
        t5=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
                num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128),
        layer_combination="weighted", lora=(16, 32.0),
        batch=8, seconds=4.0, instruction_len=16, target_len=32),
    "medium": dict(
        wavlm=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                   conv_dim=[192] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                   conv_bias=False, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                   num_buckets=320, max_bucket_distance=800),
        t5=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=4, num_decoder_layers=4,
                num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128),
        layer_combination="weighted", lora=(16, 32.0),
        batch=8, seconds=4.0, instruction_len=16, target_len=32),
}
# The decoder-only layout (`--layout decoder`): the same WavLM per size; the LLM is a random HF
# Llama (or `--family qwen2`) causal LM, with hf_tiny's family settings (GQA, the family's RoPE),
# scaled to the T5 size's width. The prompt is `[prefix (prefix_len) | audio | instruction | answer]`.
DECODER_SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(  # the T5 tiny's WavLM, layer combination and LoRA; an LLM as wide as its T5
        from_demo=True, llm=dict(vocab_size=1000, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                                 max_position_embeddings=512),
        batch=16, seconds=4.0, prefix_len=4, instruction_len=16, target_len=32),
    "small": dict(
        wavlm=SIZES["small"]["wavlm"],
        llm=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512),
        layer_combination="weighted", lora=(16, 32.0),
        batch=8, seconds=4.0, prefix_len=4, instruction_len=16, target_len=32),
    "medium": dict(
        wavlm=SIZES["medium"]["wavlm"],
        llm=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=512),
        layer_combination="weighted", lora=(16, 32.0),
        batch=8, seconds=4.0, prefix_len=4, instruction_len=16, target_len=32),
}
LLM_FAMILIES = ("llama", "qwen2")  # what bench/torch_reference.py's decoder side covers
LR = 1e-3  # the paper's peak; constant (no warm-up) so both sides apply the same first update
PEAK_N, PEAK_REPEATS = 2048, 10


def size_spec(name: str, layout: str = "t5", family: str = "llama") -> Dict[str, Any]:
    """The size's model and batch; layout 'decoder' adds `llm` (HF config overrides), `family`, `prefix_len`."""
    if layout not in ("t5", "decoder"):
        raise ValueError(f"layout must be 't5' or 'decoder', got {layout!r}")
    if layout == "decoder":
        if family not in LLM_FAMILIES:
            raise ValueError(f"family must be one of {LLM_FAMILIES}, got {family!r}")
        spec = dict(DECODER_SIZES[name])
        spec["llm"] = dict(spec["llm"])
        if spec.pop("from_demo", False):
            demo = size_spec(name)
            spec.update(wavlm=demo["wavlm"], layer_combination=demo["layer_combination"], lora=demo["lora"])
        spec.update(name=name, layout="decoder", family=family)
        return spec
    spec = dict(SIZES[name])
    if spec.pop("from_demo", False):
        from speechverse_jax import configs

        demo = configs.load("demo", "full")
        recipe = configs.load("demo_backbones", "full")  # the shipped backbones' architectures
        wavlm = {k: v for k, v in recipe.wavlm.model.to_dict().items()
                 if k not in ("feat_extract_norm", "do_stable_layer_norm")}
        t5 = {k: v for k, v in recipe.t5.model.to_dict().items() if k not in ("feed_forward_proj", "tie_word_embeddings",
                                                                               "dropout_rate")}
        t5["vocab_size"] = recipe.tokenizer.vocab_size
        stage = demo[demo.order[-1]].model
        spec.update(wavlm=wavlm, t5=t5, layer_combination=stage.layer_combination,
                    lora=(int(stage.lora.rank), float(stage.lora.alpha)))
    spec["name"] = name
    return spec


# ---------------------------------------------------------------------------------------------
# Shared set-up (used by the workers and by tests/test_torch_reference.py).

def is_decoder(spec: Dict[str, Any]) -> bool:
    return "llm" in spec


def make_backbones(spec: Dict[str, Any], folder: str) -> Dict[str, str]:
    """Random HF WavLM (large family) and Flan-style T5 (or decoder-only LM) folders with the spec's shapes."""
    from speechverse_jax import hf_tiny

    if is_decoder(spec):
        return {"wavlm": hf_tiny.save_wavlm(os.path.join(folder, "wavlm"), family="large", **spec["wavlm"]),
                "llm": hf_tiny.save_decoder_lm(os.path.join(folder, "llm"), spec.get("family", "llama"),
                                               **spec["llm"])}
    return {"wavlm": hf_tiny.save_wavlm(os.path.join(folder, "wavlm"), family="large", **spec["wavlm"]),
            "t5": hf_tiny.save_t5(os.path.join(folder, "t5"), flan=True, **spec["t5"])}


def make_batch(spec: Dict[str, Any], seed: int = 0) -> Dict[str, np.ndarray]:
    """The train step's batch; decoder-only adds `prefix_ids` / `prefix_mask` (the prompt before the audio)."""
    from speechverse_jax.data.synthetic import random_batch

    vocab = spec["llm" if is_decoder(spec) else "t5"]["vocab_size"]
    batch = random_batch(seed, spec["batch"], int(spec["seconds"] * SAMPLE_RATE), spec["instruction_len"],
                         spec["target_len"], vocab, min_fraction=0.75)
    if is_decoder(spec):
        rng = np.random.default_rng(seed + 1000)
        n = int(spec["prefix_len"])
        lens = rng.integers(max(1, n // 2), n + 1, spec["batch"])
        mask = np.arange(n)[None] < lens[:, None]
        batch["prefix_ids"] = (rng.integers(3, vocab, (spec["batch"], n)) * mask).astype(np.int32)
        batch["prefix_mask"] = mask
    return batch


def optim_config():
    from speechverse_jax.train import config as train_cfg_lib

    optim = train_cfg_lib.train_config(max_steps=1000, lr=LR, warmup_steps=0).optim
    optim.decay = "constant"
    optim.total_steps = 1000  # the schedule stands alone here (no train section beside it)
    return optim


def model_config(spec: Dict[str, Any], wavlm_cfg, llm_cfg):
    """Our composed config: `SpeechVerseConfig` (llm_cfg a `T5Config`) or `SpeechVerseDecoderConfig`."""
    from speechverse_jax.models import config as model_cfg_lib

    rank, alpha = spec["lora"]
    model = model_cfg_lib.model_config(layer_combination=spec["layer_combination"], strides=(2, 2), lora_rank=rank)
    model.layout = "decoder" if is_decoder(spec) else "t5"
    model.lora.alpha = float(alpha)
    model.lora.dropout = 0.0
    model.t5_dropout_rate = 0.0
    return model_cfg_lib.build_model_config(model, wavlm_cfg, llm_cfg)


class JaxSide:
    """Our model, params (converted frozen backbones + our trainable init), jitted step."""

    def __init__(self, spec: Dict[str, Any], folders: Dict[str, str], seed: int = 0, lora_b_scale: float = 0.02):
        import jax
        from flax import traverse_util

        from speechverse_jax.train import config as train_cfg_lib
        from speechverse_jax.convert.hf_io import HFCheckpoint
        from speechverse_jax.convert.wavlm import convert_wavlm
        from speechverse_jax.models.composed import init_params, init_params_subset, llm_key, module_for
        from speechverse_jax.train import optimizer as opt_lib

        wavlm_cfg, wavlm = convert_wavlm(HFCheckpoint(folders["wavlm"]), dtype=np.float32)
        if is_decoder(spec):
            from speechverse_jax.convert.decoder_lm import convert_decoder_lm

            llm_cfg, llm = convert_decoder_lm(HFCheckpoint(folders["llm"]), dtype=np.float32)
        else:
            from speechverse_jax.convert.t5 import convert_t5

            llm_cfg, llm = convert_t5(HFCheckpoint(folders["t5"]), dtype=np.float32)
        self.cfg = model_config(spec, wavlm_cfg, llm_cfg)
        self.model = module_for(self.cfg)
        boxed = jax.eval_shape(lambda r: init_params(self.cfg, r), jax.random.PRNGKey(0))
        import flax.linen as nn

        abstract = nn.unbox(boxed)
        self.labels = opt_lib.label_params(abstract, train_cfg_lib.RULES_STAGE2)
        train_paths = {k for k, v in self.labels.items() if v == opt_lib.TRAIN}
        trainable = traverse_util.flatten_dict(
            init_params_subset(self.cfg, jax.random.PRNGKey(seed), keep=train_paths.__contains__), sep="/")
        trainable = {k: np.asarray(v) for k, v in trainable.items()}
        rng = np.random.default_rng(seed + 1)
        for k in trainable:  # a fresh LoRA has b = 0: give it values so the parity check sees the path
            if k.endswith("/lora_b") and lora_b_scale:
                trainable[k] = (rng.standard_normal(trainable[k].shape) * lora_b_scale).astype(np.float32)
        self.trainable_init = trainable
        # on the device once, as the train loop has them (numpy leaves would be copied in every call)
        self.frozen = jax.device_put({"wavlm": wavlm, llm_key(self.cfg): llm})
        del wavlm, llm
        flat_frozen = traverse_util.flatten_dict(self.frozen, sep="/")
        want = {k for k, v in self.labels.items() if v == opt_lib.FREEZE}
        if set(flat_frozen) != want:
            raise ValueError(f"frozen params differ: {sorted(set(flat_frozen) ^ want)[:5]}")
        self.tx, self.schedule = opt_lib.make_optimizer(optim_config())

    def init_state(self):
        import jax
        from flax import traverse_util

        from speechverse_jax.train.step import init_state

        params = traverse_util.unflatten_dict({k: np.array(v) for k, v in self.trainable_init.items()}, sep="/")
        return jax.jit(lambda p: init_state(p, self.tx, 0))(params)

    def compile_step(self, state, batch):
        """(compiled step, compile seconds, XLA flops, XLA temp bytes)."""
        import jax

        from speechverse_jax.train.step import make_train_step

        step = jax.jit(make_train_step(self.model, self.tx, self.schedule), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = step.lower(state, self.frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        return compiled, compile_s, xla_flops(compiled), temp_bytes(compiled)

    def grads(self, batch):
        """(loss, grads of the trainable tree, flat) the way the train step takes them (no update)."""
        import jax
        from flax import traverse_util

        from speechverse_jax.tree import merge
        from speechverse_jax.train.step import _loss_sums

        params = traverse_util.unflatten_dict(dict(self.trainable_init), sep="/")

        def loss(p):
            nll, tokens, _, _ = _loss_sums(self.model, merge(p, self.frozen), batch, True, None, 1)
            return nll / tokens

        value, g = jax.jit(jax.value_and_grad(loss))(params)
        return float(value), {k: np.asarray(v) for k, v in traverse_util.flatten_dict(g, sep="/").items()}


def adam_first_moments(opt_state) -> Dict[str, np.ndarray]:
    """optax's Adam `mu` (flat paths) from our optimizer state."""
    from flax import traverse_util

    found = []

    def walk(node):
        if hasattr(node, "mu") and hasattr(node, "nu"):
            found.append(node.mu)
        elif isinstance(node, (tuple, list)):
            for child in node:
                walk(child)
        elif hasattr(node, "inner_state"):  # optax.masked and friends
            walk(node.inner_state)

    walk(opt_state)
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(found[0], sep="/").items()}


def xla_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan")))


def temp_bytes(compiled) -> int:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return -1


def analytic_flops(cfg, spec: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Model FLOPs (matmuls and convs only) of the train step and of the encoder forward, from
    `speechverse_jax/train/flops.py`; None where that module is missing or its API differs."""
    samples = int(spec["seconds"] * SAMPLE_RATE)
    try:
        from speechverse_jax.train import flops

        step = flops.train_step_flops(cfg, spec["batch"], samples, spec["instruction_len"], spec["target_len"],
                                      prefix_len=int(spec.get("prefix_len", 0)))
        return {"train": float(step["total"]), "encoder": float(step["wavlm_forward"])}
    except Exception:  # noqa: BLE001
        return {"train": None, "encoder": None}


def model_flops(analytic: Optional[float], xla_count: float) -> Dict[str, Any]:
    """The FLOPs MFU is computed from: the analytic model count when there is one, else XLA's."""
    if analytic:
        return {"flops": analytic, "method": "analytic model FLOPs (speechverse_jax/train/flops.py)",
                "xla_flops": xla_count}
    return {"flops": xla_count, "method": "XLA cost analysis of the compiled step", "xla_flops": xla_count}


def compare_trees(ours: Dict[str, np.ndarray], theirs: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Max abs difference over all leaves, and max over leaves of (max abs diff / max abs value)."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    worst_abs, worst_rel, worst_key = 0.0, 0.0, None
    for k in sorted(ours):
        a, b = np.asarray(ours[k], np.float64), np.asarray(theirs[k], np.float64)
        assert a.shape == b.shape, (k, a.shape, b.shape)
        d = float(np.max(np.abs(a - b))) if a.size else 0.0
        rel = d / max(float(np.max(np.abs(b))), 1e-30)
        worst_abs = max(worst_abs, d)
        if rel > worst_rel:
            worst_rel, worst_key = rel, k
    return {"max_abs": worst_abs, "max_rel": worst_rel, "worst_leaf": worst_key, "leaves": len(ours)}


# ---------------------------------------------------------------------------------------------
# Workers: one process per side and size, driven over stdin/stdout (one JSON object per line).

def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _maxrss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


class JaxWorker:
    def __init__(self, spec, work):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.spec, self.work = spec, work
        with open(os.path.join(work, "folders.json")) as f:
            folders = json.load(f)
        self.side = JaxSide(spec, folders)
        np.savez(os.path.join(work, "trainable_init.npz"), **self.side.trainable_init)
        batch = dict(np.load(os.path.join(work, "batch.npz")))
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.state = self.side.init_state()
        self.step, self.compile_s, self.flops, self.temp = self.side.compile_step(self.state, self.batch)
        self.encoder_fn = self.encoder_compile_s = None

    def setup_info(self):
        return {"compile_s": self.compile_s, "xla_flops": self.flops, "xla_temp_bytes": self.temp,
                "analytic_flops": analytic_flops(self.side.cfg, self.spec), "rss_after_setup": _rss_bytes()}

    def parity(self):
        self.state, m = self.step(self.state, self.side.frozen, self.batch)
        from flax import traverse_util

        flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(self.state.params, sep="/").items()}
        np.savez(os.path.join(self.work, "params_jax.npz"), **flat)
        np.savez(os.path.join(self.work, "mu_jax.npz"), **adam_first_moments(self.state.opt_state))
        return {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}

    def train(self, n):
        def run(n):
            for _ in range(n):
                self.state, m = self.step(self.state, self.side.frozen, self.batch)
            self.jax.block_until_ready(m["loss"])
        return {"seconds": _timed(run, n)}

    def encoder(self, n):
        if self.encoder_fn is None:
            model, params = self.side.model, {"wavlm": self.side.frozen["wavlm"]}
            fn = self.jax.jit(lambda p, a, m: model.apply({"params": p}, a, m, method=type(model).encode_audio))
            t0 = time.perf_counter()
            compiled = fn.lower(params, self.batch["audio"], self.batch["audio_mask"]).compile()
            self.encoder_compile_s = time.perf_counter() - t0
            self.encoder_flops = xla_flops(compiled)
            self.encoder_fn = lambda: compiled(params, self.batch["audio"], self.batch["audio_mask"])

        def run(n):
            for _ in range(n):
                out = self.encoder_fn()
            self.jax.block_until_ready(out)
        return {"seconds": _timed(run, n), "compile_s": self.encoder_compile_s, "xla_flops": self.encoder_flops}

    def matmul_peak(self):
        jnp = self.jnp
        a = jnp.asarray(np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N)), jnp.float32)
        f = self.jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        best = min(_timed(lambda _: f(a, a).block_until_ready(), 1) for _ in range(PEAK_REPEATS))
        return {"flops_per_s": 2 * PEAK_N ** 3 / best}

    def memory(self):
        stats = self.jax.devices()[0].memory_stats()
        return {"maxrss": _maxrss_bytes(), "rss": _rss_bytes(),
                "device_peak_bytes": (stats or {}).get("peak_bytes_in_use")}


class TorchWorker:
    def __init__(self, spec, work):
        import torch

        sys.path.insert(0, HERE)
        import torch_reference as ref

        torch.set_num_threads(_cores())
        self.torch, self.ref = torch, ref
        self.spec, self.work = spec, work
        with open(os.path.join(work, "folders.json")) as f:
            folders = json.load(f)
        from speechverse_jax.convert.hf_io import HFCheckpoint
        from speechverse_jax.models.wavlm import WavLMConfig

        wavlm_cfg = WavLMConfig.from_hf(HFCheckpoint(folders["wavlm"]).config)
        if is_decoder(spec):
            from speechverse_jax.models.decoder_lm import DecoderLMConfig

            cfg = model_config(spec, wavlm_cfg, DecoderLMConfig.from_hf(HFCheckpoint(folders["llm"]).config))
            self.model = ref.TorchSpeechVerseDecoder(folders["wavlm"], folders["llm"], cfg)
        else:
            from speechverse_jax.models.t5 import T5Config

            cfg = model_config(spec, wavlm_cfg, T5Config.from_hf(HFCheckpoint(folders["t5"]).config))
            self.model = ref.TorchSpeechVerse(folders["wavlm"], folders["t5"], cfg)
        ref.load_ours(self.model, dict(np.load(os.path.join(work, "trainable_init.npz"))))
        self.model.train()
        optim = optim_config()
        self.opt = ref.make_optimizer(self.model, float(optim.lr), float(optim.b1), float(optim.b2),
                                      float(optim.eps), float(optim.weight_decay))
        self.clip = float(optim.clip_norm)
        self.batch = ref.torch_batch(dict(np.load(os.path.join(work, "batch.npz"))))

    def setup_info(self):
        return {"rss_after_setup": _rss_bytes(), "torch_threads": self.torch.get_num_threads()}

    def threads(self, n):
        self.torch.set_num_threads(int(n))
        return {"torch_threads": self.torch.get_num_threads()}

    def parity(self):
        loss, norm = self.ref.train_step(self.model, self.opt, self.batch, self.clip)
        np.savez(os.path.join(self.work, "params_torch.npz"), **self.ref.to_ours(self.model))
        np.savez(os.path.join(self.work, "mu_torch.npz"), **self.ref.adam_first_moments(self.model, self.opt))
        return {"loss": loss, "grad_norm": norm}

    def train(self, n):
        def run(n):
            for _ in range(n):
                self.ref.train_step(self.model, self.opt, self.batch, self.clip)
        return {"seconds": _timed(run, n)}

    def encoder(self, n):
        def run(n):
            for _ in range(n):
                self.model.encode_audio(self.batch["audio"], self.batch["audio_mask"])
        return {"seconds": _timed(run, n)}

    def matmul_peak(self):
        torch = self.torch
        a = torch.from_numpy(np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N)).astype(np.float32))
        torch.mm(a, a)
        best = min(_timed(lambda _: torch.mm(a, a), 1) for _ in range(PEAK_REPEATS))
        return {"flops_per_s": 2 * PEAK_N ** 3 / best}

    def memory(self):
        return {"maxrss": _maxrss_bytes(), "rss": _rss_bytes()}


def worker_main(side: str, spec_path: str) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, the protocol owns the real stdout
    sys.stdout = sys.stderr
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("cores"):  # before jax / torch size their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(spec["cores"])])
    work = os.path.dirname(spec_path)
    try:
        w = (JaxWorker if side == "jax" else TorchWorker)(spec, work)
        proto.write(json.dumps({"ok": True, **w.setup_info()}) + "\n")
    except Exception as e:  # noqa: BLE001 - report to the parent, then exit
        import traceback

        traceback.print_exc()
        proto.write(json.dumps({"ok": False, "error": repr(e)}) + "\n")
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            out = getattr(w, cmd["cmd"])(*cmd.get("args", ()))
            proto.write(json.dumps({"ok": True, **out}) + "\n")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            proto.write(json.dumps({"ok": False, "error": repr(e)}) + "\n")


class Worker:
    def __init__(self, side: str, spec_path: str):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", side, "--spec", spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT)
        self.ready = self._read()

    def _read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit {self.proc.wait()})")
        out = json.loads(line)
        if not out.pop("ok"):
            raise RuntimeError(f"{self.side} worker: {out['error']}")
        return out

    def __call__(self, cmd: str, *args) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# The driver.

def _interleaved(workers: Dict[str, Worker], cmd: str, n_total: int, rounds: int) -> Dict[str, Dict[str, Any]]:
    """`rounds` rounds alternating the sides (order flips each round).

    Step time = the best round's time / k: on a shared machine a round that another process
    disturbs only gets slower, and the interleaving gives both sides the same chances."""
    k = max(1, math.ceil(n_total / rounds))
    per: Dict[str, List[float]] = {s: [] for s in workers}
    extra: Dict[str, Dict[str, Any]] = {s: {} for s in workers}
    names = list(workers)
    for r in range(rounds):
        for s in (names if r % 2 == 0 else names[::-1]):
            out = workers[s](cmd, k)
            per[s].append(out.pop("seconds") / k)
            extra[s] = out
    return {s: {"step_s": min(per[s]), "step_s_median": statistics.median(per[s]), "step_s_rounds": per[s],
                "steps": k * rounds, **extra[s]} for s in workers}


def _pick_threads(tw: Worker, cmd: str, choice: str, cores: int) -> Dict[str, Any]:
    """Time one `cmd` call of the torch worker per thread count; leave it at the fastest."""
    counts = sorted({1, cores}) if choice == "best" else [int(choice)]
    seconds = {}
    for t in counts:
        tw("threads", t)
        seconds[t] = tw(cmd, 1)["seconds"]
    best = min(seconds, key=seconds.get)
    tw("threads", best)
    return {"used": best, "seconds": seconds}


def run_size(name: str, args) -> Dict[str, Any]:
    spec = size_spec(name, args.layout, args.family)
    spec["cores"] = args.cores
    work = tempfile.mkdtemp(prefix=f"bench_train_{name}_")
    t0 = time.perf_counter()
    folders = make_backbones(spec, work)
    batch = make_batch(spec)
    np.savez(os.path.join(work, "batch.npz"), **batch)
    with open(os.path.join(work, "folders.json"), "w") as f:
        json.dump(folders, f)
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    print(f"[{name}] backbones written in {time.perf_counter() - t0:.1f}s; starting workers", flush=True)
    workers: Dict[str, Worker] = {}
    try:
        workers["jax"] = jw = Worker("jax", spec_path)  # writes trainable_init.npz, which torch loads
        workers["torch"] = tw = Worker("torch", spec_path)
        print(f"[{name}] ours compiled in {jw.ready['compile_s']:.1f}s", flush=True)
        # 1. parity: one step each from the same state
        pj, pt = jw("parity"), tw("parity")
        init = dict(np.load(os.path.join(work, "trainable_init.npz")))
        after_j = dict(np.load(os.path.join(work, "params_jax.npz")))
        after_t = dict(np.load(os.path.join(work, "params_torch.npz")))
        upd = compare_trees({k: after_j[k] - init[k] for k in init}, {k: after_t[k] - init[k] for k in init})
        # Adam's first moment after one step is 0.1 x the clipped gradient: the gradients compared
        mu = compare_trees(dict(np.load(os.path.join(work, "mu_jax.npz"))),
                           dict(np.load(os.path.join(work, "mu_torch.npz"))))
        parity = {"loss_ours": pj["loss"], "loss_torch": pt["loss"],
                  "loss_rel_diff": abs(pj["loss"] - pt["loss"]) / abs(pt["loss"]),
                  "grad_norm_ours": pj["grad_norm"], "grad_norm_torch": pt["grad_norm"],
                  "grad_norm_rel_diff": abs(pj["grad_norm"] - pt["grad_norm"]) / abs(pt["grad_norm"]),
                  "clipped_grads": mu, "params_after": compare_trees(after_j, after_t), "update": upd, "lr": LR}
        print(f"[{name}] parity: loss {pj['loss']:.6f} vs {pt['loss']:.6f} (rel {parity['loss_rel_diff']:.1e}), "
              f"grad norm rel {parity['grad_norm_rel_diff']:.1e}, grads max rel (per leaf) {mu['max_rel']:.1e}, "
              f"updated params max abs diff {parity['params_after']['max_abs']:.1e} (lr {LR:g})", flush=True)
        # 2. warm-up; torch runs at its faster thread count (see README: with 2 threads on a busy
        #    machine its OpenMP workers can stall for seconds); the step count from the warm-up time
        warm = {s: w("train", 1)["seconds"] for s, w in workers.items()}
        cores = args.cores or _cores()
        torch_threads = {"train": _pick_threads(tw, "train", args.torch_threads, cores)}
        warm["torch"] = min(torch_threads["train"]["seconds"].values())
        n = args.steps or int(min(20, max(4, args.seconds_per_side / max(warm.values()))))
        peaks = [jw("matmul_peak")["flops_per_s"], tw("matmul_peak")["flops_per_s"]]
        train = _interleaved(workers, "train", n, min(n, args.rounds))
        jw("encoder", 1), tw("encoder", 1)  # compile / warm-up
        torch_threads["encoder"] = _pick_threads(tw, "encoder", args.torch_threads, cores)
        enc = _interleaved(workers, "encoder", n, min(n, args.rounds))
        peaks += [jw("matmul_peak")["flops_per_s"], tw("matmul_peak")["flops_per_s"]]
        mem = {s: w("memory") for s, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(work, ignore_errors=True)
    audio_s = float(batch["audio_mask"].sum()) / SAMPLE_RATE
    flops = model_flops(jw.ready["analytic_flops"]["train"], jw.ready["xla_flops"])
    enc_flops = model_flops(jw.ready["analytic_flops"]["encoder"], enc["jax"].get("xla_flops", float("nan")))
    peak = max(peaks)
    row = {"size": name, "spec": spec, "audio_seconds_per_batch": audio_s, "parity": parity,
           "flops_per_step": flops, "encoder_flops": enc_flops, "matmul_peak_flops_per_s": peak,
           "matmul_peaks": {"jax_before": peaks[0], "torch_before": peaks[1], "jax_after": peaks[2],
                            "torch_after": peaks[3]},
           "compile_s": {"train_step": jw.ready["compile_s"], "encoder": enc["jax"].get("compile_s")},
           "warmup_step_s": warm}
    for kind, res in (("train", train), ("encoder", enc)):
        row[kind] = {}
        for s in ("jax", "torch"):
            r = res[s]
            entry = {"step_s": r["step_s"], "steps_per_s": 1 / r["step_s"], "audio_s_per_s": audio_s / r["step_s"],
                     "step_s_median": r["step_s_median"], "step_s_rounds": r["step_s_rounds"],
                     "timed_steps": r["steps"]}
            f = (flops if kind == "train" else enc_flops)["flops"]
            entry["flops_per_s"] = f / r["step_s"]
            entry["mfu"] = entry["flops_per_s"] / peak
            row[kind][s] = entry
        row[kind]["speedup"] = res["torch"]["step_s"] / res["jax"]["step_s"]
    row["memory"] = {
        "jax": {"peak_rss_bytes": mem["jax"]["maxrss"], "rss_after_setup_bytes": jw.ready["rss_after_setup"],
                "xla_step_temp_bytes": jw.ready["xla_temp_bytes"],
                "device_peak_bytes": mem["jax"]["device_peak_bytes"]},
        "torch": {"peak_rss_bytes": mem["torch"]["maxrss"], "rss_after_setup_bytes": tw.ready["rss_after_setup"]},
    }
    row["torch_threads"] = torch_threads
    print(f"[{name}] train: ours {row['train']['jax']['step_s']:.3f}s torch {row['train']['torch']['step_s']:.3f}s "
          f"(x{row['train']['speedup']:.2f}); encoder x{row['encoder']['speedup']:.2f}; "
          f"MFU {row['train']['jax']['mfu'] * 100:.1f}%; torch threads {torch_threads['train']['used']} "
          f"(train), {torch_threads['encoder']['used']} (encoder)  [{time.perf_counter() - t0:.0f}s]", flush=True)
    return row


def machine() -> Dict[str, Any]:
    import jax
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1] for l in f if l.startswith("flags")), "")
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()]
    return dict(cpu=cpu, cpu_count=os.cpu_count(), simd=simd, platform=platform.platform(),
                python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
                torch=torch.__version__, transformers=transformers.__version__, peft=peft_version,
                load_average=os.getloadavg())


def print_table(rows: List[Dict[str, Any]]) -> None:
    gib = 2.0 ** 30
    print()
    head = (f"{'size':>6} | {'train steps/s':>13} {'':>6} | {'train audio s/s':>15} {'':>6} | {'x':>5} | "
            f"{'enc audio s/s':>13} {'':>7} | {'x':>5} | {'peak RSS GiB':>12} {'':>5} | {'MFU':>6} {'':>6} | "
            f"{'compile s':>9}")
    print(head)
    print(f"{'':>6} | {'ours':>13} {'torch':>6} | {'ours':>15} {'torch':>6} | {'':>5} | {'ours':>13} {'torch':>7} | "
          f"{'':>5} | {'ours':>12} {'torch':>5} | {'ours':>6} {'torch':>6} | {'':>9}")
    for r in rows:
        t, e, m = r["train"], r["encoder"], r["memory"]
        print(f"{r['size']:>6} | {t['jax']['steps_per_s']:>13.2f} {t['torch']['steps_per_s']:>6.2f} | "
              f"{t['jax']['audio_s_per_s']:>15.1f} {t['torch']['audio_s_per_s']:>6.1f} | {t['speedup']:>5.2f} | "
              f"{e['jax']['audio_s_per_s']:>13.1f} {e['torch']['audio_s_per_s']:>7.1f} | {e['speedup']:>5.2f} | "
              f"{m['jax']['peak_rss_bytes'] / gib:>12.2f} {m['torch']['peak_rss_bytes'] / gib:>5.2f} | "
              f"{t['jax']['mfu'] * 100:>5.1f}% {t['torch']['mfu'] * 100:>5.1f}% | {r['compile_s']['train_step']:>9.1f}")
    print()
    for r in rows:
        p = r["parity"]
        print(f"{r['size']:>6}: step GFLOP {r['flops_per_step']['flops'] / 1e9:.1f} "
              f"({r['flops_per_step']['method']}; XLA counts {r['flops_per_step']['xla_flops'] / 1e9:.1f}), "
              f"matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s; "
              f"parity: loss rel {p['loss_rel_diff']:.1e}, grad norm rel {p['grad_norm_rel_diff']:.1e}, "
              f"grads max rel {p['clipped_grads']['max_rel']:.1e}, "
              f"updated params max abs {p['params_after']['max_abs']:.1e} (lr {p['lr']:g})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small,medium")
    p.add_argument("--layout", choices=("t5", "decoder"), default="t5",
                   help="t5: Flan-T5 + LoRA (HF T5ForConditionalGeneration); decoder: a decoder-only LLM + LoRA "
                        "(HF LlamaForCausalLM / Qwen2ForCausalLM, see --family)")
    p.add_argument("--family", choices=LLM_FAMILIES, default="llama", help="with --layout decoder: the LLM family")
    p.add_argument("--steps", type=int, default=0, help="timed steps per side (default: from the warm-up time)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds the timed steps are split into")
    p.add_argument("--seconds-per-side", type=float, default=12.0,
                   help="with --steps 0: aim for about this many timed seconds per side and size")
    p.add_argument("--cores", type=int, default=0,
                   help="pin each worker to this many CPUs (0 = all); 1 gives per-core numbers that a "
                        "busy shared machine disturbs less")
    p.add_argument("--torch-threads", default="best",
                   help="torch intra-op threads: a number, or 'best' = the faster of 1 and all cores")
    p.add_argument("--out", default=None,
                   help="default bench/results/train_step.json (t5), bench/results/train_step_decoder.json (decoder)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    if args.out is None:
        args.out = os.path.join(HERE, "results", "train_step_decoder.json" if args.layout == "decoder"
                                else "train_step.json")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(1)  # the driver only builds the HF folders; keep it off the workers' cores
    t0 = time.perf_counter()
    rows = [run_size(s.strip(), args) for s in args.sizes.split(",") if s.strip()]
    result = {"machine": machine(), "settings": {"layout": args.layout,
                                                 "family": args.family if args.layout == "decoder" else None,
                                                 "lr": LR, "dtype": "float32", "dropout": 0.0,
                                                 "rounds": args.rounds, "cores": args.cores or _cores(),
                                                 "torch_threads": args.torch_threads,
                                                 "wall_s": time.perf_counter() - t0},
              "results": rows}
    print_table(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
