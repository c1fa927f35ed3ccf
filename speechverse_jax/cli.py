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


USAGE_TRAIN = """usage: speechverse-jax train|curriculum --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]
    [--compile-only]                          compile the step for the config's mesh from shapes, print memory + FLOPs
    [--compile-target=auto|tpu|cpu]           compile-only: TPU compiler via libtpu (auto when a topology is known)
    [--topology=v5e:4x4]                      compile-only: the TPU topology (default: the slice preset's)
    [--coordinator HOST:PORT --num_processes N --process_id I]   multi-process start (TPU VMs: automatic)
  e.g. --config.optim.lr=3e-4 --config.data.batch_size=64"""


def _config_from_flags(argv: List[str]):
    """`--config FILE[:arg] [--config.a.b=value ...]` (ml_collections config_flags), `--workdir`, and the
    multi-process / compile-only flags. Returns (config, workdir, options)."""
    from absl import flags
    from ml_collections import config_flags

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE_TRAIN)
        raise SystemExit(0 if argv else 2)
    compile_only = any(a in ("--compile-only", "--compile_only") for a in argv)
    argv = [a for a in argv if a not in ("--compile-only", "--compile_only")]
    aot_opts = {"target": "auto", "topology": None}
    for key, flag in (("target", "--compile-target="), ("topology", "--topology=")):
        for a in [a for a in argv if a.startswith(flag)]:
            aot_opts[key] = a[len(flag):]
            argv.remove(a)
    values = flags.FlagValues()
    argv = ["speechverse-jax"] + list(argv)
    config_flags.DEFINE_config_file("config", None, "config module (get_config)", flag_values=values,
                                    lock_config=True, sys_argv=argv)  # overrides are read from sys_argv
    flags.DEFINE_string("workdir", None, "run folder (local or gs://)", flag_values=values)
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-process runs)", flag_values=values)
    flags.DEFINE_integer("num_processes", None, "processes in the run", flag_values=values)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=values)
    values(argv)
    if values.config is None or (not values.workdir and not compile_only):
        raise SystemExit(USAGE_TRAIN)
    options = {"compile_only": compile_only, "coordinator": values.coordinator,
               "num_processes": values.num_processes, "process_id": values.process_id, **aot_opts}
    return values.config, values.workdir, options


def _start(config, workdir, options) -> bool:
    """Multi-process start-up, or the compile-only check (then returns True: nothing else to run)."""
    if options["compile_only"]:
        from speechverse_jax import fs
        from speechverse_jax.train import aot

        target, _, _ = aot.resolve_target(config, options.get("target", "auto"), options.get("topology"))
        if target == "cpu":
            aot.force_cpu_devices(aot.mesh_devices(config))
        hlo = None
        if workdir and not workdir.startswith("gs://"):
            fs.makedirs(workdir)
            hlo = f"{workdir.rstrip('/')}/compile_only.hlo.txt.gz"
        report = aot.compile_train_step(config, target=target, topology=options.get("topology"), hlo_out=hlo)
        if workdir:
            fs.makedirs(workdir)
            fs.write_text(f"{workdir.rstrip('/')}/compile_only.json", json.dumps(report, indent=2))
            print(f"report: {workdir.rstrip('/')}/compile_only.json")
        return True
    from speechverse_jax.train import distributed

    distributed.initialize(options["coordinator"], options["num_processes"], options["process_id"])
    return False


def _train(args: argparse.Namespace) -> int:
    from speechverse_jax.train.curriculum import run_stage

    config, workdir, options = _config_from_flags(args.rest)
    if not _start(config, workdir, options):
        run_stage(config, workdir)
    return 0


def _curriculum(args: argparse.Namespace) -> int:
    from speechverse_jax.train.curriculum import run_curriculum, stage_configs

    config, workdir, options = _config_from_flags(args.rest)
    if options["compile_only"]:  # the last (largest) stage: LoRA and all tasks
        config = list(stage_configs(config).values())[-1]
    if not _start(config, workdir, options):
        run_curriculum(config, workdir)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from speechverse_jax.data.prepare import run_prepare

    options = {}
    for item in args.option or []:
        if "=" not in item:
            raise SystemExit(f"--option takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key] = value
    summary = run_prepare(args.dataset, args.src, args.out, **options)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.profile == "convert-only":
        from speechverse_jax.demo.smoke import run_demo as run_smoke

        run_smoke(out_dir=args.out)
        return 0
    from speechverse_jax.demo.run import run_demo

    run_demo(out_dir=args.out, profile=args.profile, progress=not args.no_progress)
    return 0


def _load_model(checkpoint: str):
    import os

    from speechverse_jax.api import SpeechVerseModel

    if os.path.exists(os.path.join(checkpoint, "config.json")):
        return SpeechVerseModel.from_run(checkpoint)
    return SpeechVerseModel.from_base(checkpoint)  # an untrained (converted) base: adaptor at init


def _infer(args: argparse.Namespace) -> int:
    from speechverse_jax.decode.constraints import load_labels

    model = _load_model(args.checkpoint)
    labels = load_labels(args.labels) if args.labels else None
    answers = model.generate(args.audio, [args.instruction] * len(args.audio), num_beams=args.beams,
                             max_new_tokens=args.max_new_tokens, labels=labels, task=args.task)
    for audio, answer in zip(args.audio, answers):
        if args.json:
            print(json.dumps({"audio": audio, "instruction": args.instruction, "answer": answer}))
        else:
            print(f"{audio}\t{answer}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from speechverse_jax.eval.evaluate import EvalSetting, evaluate, write_reports

    model = _load_model(args.checkpoint)
    splits = ("seen", "unseen") if args.split == "both" else (args.split,)
    settings = [EvalSetting(s, constrained=c, joint=args.joint, num_beams=args.beams, max_new_tokens=args.max_new_tokens)
                for s in splits for c in ((False, True) if args.constrained == "both" else (args.constrained == "yes",))]
    predictions, table = evaluate(model, args.manifest, settings, tasks=args.tasks.split(",") if args.tasks else None,
                                  batch_size=args.batch_size)
    paths = write_reports(args.out, predictions, table)
    print(open(paths["markdown"]).read())
    print(f"predictions: {paths['predictions']}\nmetrics: {paths['json']}, {paths['markdown']}")
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

    for name, func, text in (("train", _train, "run one training stage"),
                             ("curriculum", _curriculum, "run the curriculum stages in order")):
        p = sub.add_parser(name, help=text, description=f"{text}: --config FILE[:arg] --workdir DIR [--config.a.b=v ...]",
                           prefix_chars="+")  # every --flag goes to ml_collections / absl
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)

    p = sub.add_parser("prepare", help="write manifests for a public corpus from its downloaded layout")
    p.add_argument("dataset", help="librispeech | commonvoice | voxpopuli | slurp | covost2 | msppodcast | fisher")
    p.add_argument("src", help="the corpus as downloaded")
    p.add_argument("out", help="output folder for the manifests")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="recipe option (repeatable)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("infer", help="answer an instruction about audio files")
    p.add_argument("--checkpoint", required=True, help="a training run folder (or a converted base folder)")
    p.add_argument("--audio", nargs="+", required=True, help="audio files (any format; resampled to 16 kHz)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--labels", help="restrict the answer to these labels: 'a,b,c' or a file with one per line")
    p.add_argument("--task", help="a task name whose label set constrains the answer (e.g. ic, sns)")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_infer)

    p = sub.add_parser("eval", help="generate on manifests and score every task")
    p.add_argument("--checkpoint", required=True, help="a training run folder")
    p.add_argument("--manifest", nargs="+", required=True)
    p.add_argument("--out", default="outputs/eval", help="folder for predictions.jsonl and metrics.{json,md}")
    p.add_argument("--split", default="seen", choices=("seen", "unseen", "both"), help="instruction wordings")
    p.add_argument("--constrained", default="no", choices=("no", "yes", "both"), help="label-constrained decoding")
    p.add_argument("--joint", action="store_true", help="joint decoding: transcript first, then the answer")
    p.add_argument("--tasks", help="only these tasks (comma-separated)")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the end-to-end demo on CPU: corpus, backbones, curriculum, evaluation")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--profile", default="full", choices=("full", "quick", "convert-only"),
                   help="full (about 30 min on 2 cores), quick (CI smoke), convert-only (conversion + API only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
