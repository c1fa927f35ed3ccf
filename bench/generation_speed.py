"""Generation speed: our jitted greedy / beam search vs Hugging Face PyTorch `generate`.

    python bench/generation_speed.py                 # d_model 512, 4+4 layers, vocab 32128, 64 new tokens
    python bench/generation_speed.py --repeats 5 --new-tokens 32

Both sides decode the same converted random Flan-style T5 from the same T5 encoder output
(HF gets it as `encoder_outputs`, so neither side times the encoder), in float32, with
`min_new_tokens = max_new_tokens` (EOS banned until the end), so every run does exactly
`new_tokens` decoder steps; the script counts the generated tokens of both sides and stops if
they differ. Tokens/s = generated tokens of the returned sequences (batch x new tokens), for
greedy and beam alike; it also reports how many of our tokens equal HF's.

Timing: one warm-up call per side (ours: includes the compile, reported apart as `compile s`
= first call minus the median steady call; the bench checks that the timed calls compiled
nothing), then `--repeats` rounds alternating the sides, median per side. HF runs under
`torch.inference_mode()` with `torch.set_num_threads(n)` for n = 1 and n = all cores, and the
faster counts (both are reported): on a small shared machine torch's OpenMP threads can stall
on each other (a 1x512 @ 512x512 matmul took 15 ms with 2 threads and 0.01 ms with 1 on the
2-core box), which would flatter us. Process CPU seconds are reported next to the wall times
(on a busy machine they are the steadier number). Writes bench/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np


def _timed(fn: Callable[[], None]):
    """(wall s, process CPU s) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def run(args) -> Dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    from speechverse_jax import hf_tiny
    from speechverse_jax.convert.hf_io import HFCheckpoint
    from speechverse_jax.convert.t5 import convert_t5
    from speechverse_jax.decode import generate as generate_module
    from speechverse_jax.decode.generate import GenerateConfig, generate
    from speechverse_jax.models.t5 import T5

    size = dict(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // 8, d_ff=2 * args.d_model,
                num_layers=args.layers, num_decoder_layers=args.layers, num_heads=8,
                relative_attention_num_buckets=32, relative_attention_max_distance=128)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_tiny.save_t5(os.path.join(tmp, "t5"), flan=True, seed=0, **size)
        cfg, params = convert_t5(HFCheckpoint(folder))
        hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval().to(args.torch_device)
    # device arrays, as a user holds them
    params = jax.device_put(params)
    model = T5(cfg)
    n_params = sum(p.numel() for p in hf.parameters())
    encode = jax.jit(lambda e, m: model.apply({"params": params}, e, m, method=T5.encode))

    rows: List[Dict] = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        lengths = rng.integers(args.enc_len * 3 // 4, args.enc_len + 1, batch)
        lengths[0] = args.enc_len
        mask = np.arange(args.enc_len)[None] < lengths[:, None]
        embeds = rng.standard_normal((batch, args.enc_len, args.d_model)).astype(np.float32)
        enc = encode(jnp.asarray(embeds), jnp.asarray(mask))
        enc_np = np.asarray(enc)
        mask_torch = torch.from_numpy(mask.astype(np.int64)).to(args.torch_device)
        for beams in args.beams:
            gen_cfg = GenerateConfig(args.new_tokens, num_beams=beams, min_new_tokens=args.new_tokens)
            result = {}

            def ours():
                result["ours"] = jax.block_until_ready(generate(model, params, enc, jnp.asarray(mask), gen_cfg))

            def theirs():
                # generate expands `encoder_outputs` for beams in place: give it a fresh one each call
                enc_torch = BaseModelOutput(last_hidden_state=torch.from_numpy(enc_np.copy()).to(args.torch_device))
                with torch.inference_mode():
                    result["hf"] = hf.generate(encoder_outputs=enc_torch, attention_mask=mask_torch, do_sample=False,
                                               num_beams=beams, max_new_tokens=args.new_tokens,
                                               min_new_tokens=args.new_tokens)

            first, _ = _timed(ours)  # compiles
            compiled = generate_module._generate._cache_size()
            thread_counts = sorted({1, os.cpu_count()})
            for threads in thread_counts:  # HF warm-up at each thread count
                torch.set_num_threads(threads)
                theirs()
            ours_t, hf_t = [], {n: [] for n in thread_counts}
            for _ in range(args.repeats):  # alternate the sides, so load changes hit both
                ours_t.append(_timed(ours))
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    hf_t[threads].append(_timed(theirs))
            torch.set_num_threads(os.cpu_count())
            recompiles = generate_module._generate._cache_size() - compiled
            if recompiles:
                raise RuntimeError(f"generate compiled {recompiles} more program(s) inside the timed region")

            # same number of generated tokens on both sides (HF's sequences start with the start token)
            ours_tokens = np.asarray(result["ours"].tokens)
            ours_count = int(np.asarray(result["ours"].lengths).sum())
            hf_tokens = result["hf"].cpu().numpy()[:, 1:]
            eos = hf.generation_config.eos_token_id
            hf_count = sum(int(np.argmax(row == eos)) + 1 if (row == eos).any() else row.size for row in hf_tokens)
            if ours_count != hf_count or ours_count != batch * args.new_tokens:
                raise RuntimeError(f"generated tokens differ: ours {ours_count}, HF {hf_count}, "
                                   f"expected {batch * args.new_tokens}")
            same = float(np.mean(ours_tokens == hf_tokens))

            ours_s = statistics.median(t for t, _ in ours_t)
            ours_cpu = statistics.median(c for _, c in ours_t)
            hf_by_threads = {n: statistics.median(t for t, _ in v) for n, v in hf_t.items()}
            best = min(hf_by_threads, key=hf_by_threads.get)
            theirs_s = hf_by_threads[best]
            hf_cpu = statistics.median(c for _, c in hf_t[best])
            row = dict(batch=batch, num_beams=beams, new_tokens=args.new_tokens,
                       generated_tokens=dict(ours=ours_count, hf=hf_count), tokens_equal_to_hf=same,
                       ours_s=ours_s, hf_s=theirs_s, hf_torch_threads=best, hf_s_by_torch_threads=hf_by_threads,
                       ours_cpu_s=ours_cpu, hf_cpu_s=hf_cpu,
                       ours_compile_s=max(0.0, first - ours_s), recompiles_in_timed_region=recompiles,
                       ours_tokens_per_s=ours_count / ours_s, hf_tokens_per_s=hf_count / theirs_s,
                       speedup=theirs_s / ours_s, speedup_cpu_time=hf_cpu / ours_cpu)
            rows.append(row)
            print(f"batch {batch:2d} beams {beams}: ours {ours_s * 1e3:8.1f} ms "
                  f"({row['ours_tokens_per_s']:7.0f} tok/s, cpu {ours_cpu * 1e3:.0f} ms, "
                  f"compile {row['ours_compile_s']:.1f} s)  HF {theirs_s * 1e3:8.1f} ms "
                  f"({row['hf_tokens_per_s']:7.0f} tok/s, cpu {hf_cpu * 1e3:.0f} ms, {best} thread(s))  "
                  f"x{row['speedup']:.2f} (cpu x{row['speedup_cpu_time']:.2f}), "
                  f"{same:.0%} tokens as HF", flush=True)

    return dict(
        model=dict(size, feed_forward_proj="gated-gelu", params=n_params),
        settings=dict(encoder_length=args.enc_len, new_tokens=args.new_tokens, repeats=args.repeats,
                      min_new_tokens=args.new_tokens, dtype="float32", torch_inference_mode=True,
                      torch_threads_tried=sorted({1, os.cpu_count()})),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
                     python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
                     jax_devices=[str(d) for d in jax.devices()], torch=torch.__version__,
                     transformers=transformers.__version__, load_average=os.getloadavg()),
        results=rows,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--torch-device", default="cpu", help="where HF generate runs (cuda on a GPU machine)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--enc-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "generation_speed.json"))
    args = p.parse_args()
    result = run(args)
    print()
    print(f"{'batch':>5} {'beams':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'speedup':>8} {'cpu-time x':>10} "
          f"{'compile s':>10}")
    for r in result["results"]:
        print(f"{r['batch']:>5} {r['num_beams']:>5} {r['ours_tokens_per_s']:>11.0f} {r['hf_tokens_per_s']:>9.0f} "
              f"{r['speedup']:>8.2f} {r['speedup_cpu_time']:>10.2f} {r['ours_compile_s']:>10.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
