"""`speechverse-jax` command line: sub-commands parse flags and call the library."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _convert(args: argparse.Namespace) -> int:
    from speechverse_jax.convert.pipeline import convert_checkpoints

    report = convert_checkpoints(
        wavlm_dir=args.wavlm, t5_dir=args.t5, out_dir=args.out, dtype=args.dtype,
        verify=args.verify, report_path=args.report, overwrite=args.overwrite,
        tolerance=args.tolerance,
    )
    if args.verify and not report["verify"]["passed"]:
        print(f"verification FAILED (max relative difference above {args.tolerance}); nothing written to {args.out}",
              file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from speechverse_jax.demo import run_demo

    run_demo(out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechverse-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF WavLM + T5 folders -> one converted base checkpoint")
    p.add_argument("--wavlm", required=True, help="HF WavLM folder (config.json + safetensors or .bin)")
    p.add_argument("--t5", required=True, help="HF T5 folder (config.json + weights [+ tokenizer])")
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="storage dtype of the frozen weights")
    p.add_argument("--verify", action="store_true", help="compare against the HF PyTorch models (needs torch)")
    p.add_argument("--report", help="write the verification / conversion report as JSON here")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed float32 relative difference")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("demo", help="the small end-to-end demo on CPU")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
