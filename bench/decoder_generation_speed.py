"""Generation speed of the decoder-only path: our jitted KV-cache greedy / beam search vs HF `generate`.

    python bench/decoder_generation_speed.py                      # Llama-style, hidden 512, 4 layers, vocab 32000
    python bench/decoder_generation_speed.py --family gemma2 --repeats 5 --new-tokens 32

Both sides decode the same random HF model (converted for ours) from the same left-padded prompt
embeddings (`inputs_embeds`), float32, with `min_new_tokens = max_new_tokens` (EOS banned) so
every run does exactly `new_tokens` steps; tokens/s counts batch x new tokens. One warm-up call
per side (ours includes the compile, reported apart), then `--repeats` alternating rounds,
median per side; process CPU seconds are reported next to wall seconds (steadier on a busy
machine). HF runs with `torch.set_num_threads(1)` and with all cores; the faster is compared.
Also reports how many of our tokens equal HF's. Writes bench/results/decoder_generation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llama", choices=("llama", "qwen2", "gemma2", "gemma3"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decoder_generation_speed.json"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from speechverse_jax import hf_tiny
    from speechverse_jax.convert.decoder_lm import convert_decoder_lm
    from speechverse_jax.convert.hf_io import HFCheckpoint
    from speechverse_jax.decode.generate import GenerateConfig
    from speechverse_jax.decode.generate_decoder import generate_lm
    from speechverse_jax.models.decoder_lm import DecoderLM

    heads = max(args.hidden // 64, 1)
    folder = tempfile.mkdtemp(prefix="declm_bench_")
    hf_tiny.save_decoder_lm(folder, args.family, vocab_size=args.vocab, hidden_size=args.hidden,
                            intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=64)
    cfg, params = convert_decoder_lm(HFCheckpoint(folder), dtype=np.float32)
    model = DecoderLM(cfg)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt))
    mask = np.ones((args.batch, args.prompt), np.int64)
    for i in range(args.batch):  # left padding of different amounts
        mask[i, : i * (args.prompt // (2 * args.batch))] = 0
    emb = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=DecoderLM.embed))
    results = []
    for beams in args.beams:
        gcfg = GenerateConfig(max_new_tokens=args.new_tokens, num_beams=beams, min_new_tokens=args.new_tokens)

        def ours():
            out = generate_lm(model, params, jnp.asarray(emb), jnp.asarray(mask), gcfg, eos_token_id=2, pad_token_id=0)
            jax.block_until_ready(out.tokens)
            ours.tokens = np.asarray(out.tokens)

        def theirs():
            with torch.inference_mode():
                theirs.tokens = hf.generate(inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(mask),
                                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                            num_beams=beams, do_sample=False, eos_token_id=2, pad_token_id=0).numpy()

        first, _ = _timed(ours)
        row = {"num_beams": beams}
        timings = {"ours": []}
        threads = sorted({1, os.cpu_count() or 1})
        for n in threads:
            torch.set_num_threads(n)
            _timed(theirs)
            timings[f"hf_{n}"] = []
        for _ in range(args.repeats):
            timings["ours"].append(_timed(ours))
            for n in threads:
                torch.set_num_threads(n)
                timings[f"hf_{n}"].append(_timed(theirs))
        tokens = args.batch * args.new_tokens
        for side, ts in timings.items():
            wall = statistics.median(t[0] for t in ts)
            cpu = statistics.median(t[1] for t in ts)
            row[side] = {"wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall}
        row["ours_compile_s"] = first - row["ours"]["wall_s"]
        best_hf = min((k for k in row if k.startswith("hf_")), key=lambda k: row[k]["wall_s"])
        row["speedup_vs_best_hf"] = row[best_hf]["wall_s"] / row["ours"]["wall_s"]
        row["tokens_equal_hf"] = float(np.mean(ours.tokens == theirs.tokens[:, : ours.tokens.shape[1]]))
        results.append(row)
        print(json.dumps(row))
    report = {"family": args.family, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
              "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "torch": torch.__version__, "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
