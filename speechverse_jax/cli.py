"""`speechverse-jax` command line: one config system for every sub-command.

Each sub-command reads a config module (`get_config(arg)`, speechverse_jax/configs/): `--config
NAME[:arg]` (a packaged config) or `--config FILE.py[:arg]`, and `--config.a.b=value` overrides any
field. convert, prepare, infer, eval, demo and demo-backbones have a packaged default config, and
their short flags (`--out DIR`, `--verify`, `--audio a.wav b.wav`, `--pretrain-backbones`) are
spelled-out `--config.<name>=value` overrides (FIELD_ALIASES: flags whose field is nested).
Sub-commands only parse and call the library.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from speechverse_jax.errors import UserError, run_cli

USAGE = """usage: speechverse-jax COMMAND [--config NAME[:arg] | --config FILE.py[:arg]] [--config.a.b=value ...] [flags]

commands (default config in brackets; `speechverse-jax COMMAND --help` lists its fields):
  convert     [convert]   HF WavLM + T5 (--t5) or decoder-only LLM (--llm) folders -> one base checkpoint
  prepare     [prepare]   manifests for a public corpus: prepare DATASET SRC OUT [--option KEY=VALUE]
  train       (required)  run one training stage; --workdir DIR
  curriculum  (required)  run the curriculum stages in order; --workdir DIR
  infer       [infer]     answer an instruction about audio files
  eval        [eval]      generate on manifests and score every task
  demo        [demo]      the end-to-end demo on CPU (--profile full|quick, or --profile convert-only) on the
                          shipped backbones; --pretrain-backbones makes them first with the demo-backbones recipe
  demo-backbones [demo_backbones]
                          pretrain the demo's WavLM + T5 backbones, the release the package ships
                          (--profile full|quick, --out DIR: the release lands in DIR/release)

train / curriculum also take --compile-only (compile the step for the config's mesh from shapes and
print memory, FLOPs, collectives and a step-time estimate; --compile-target auto|tpu|cpu and
--topology v5e:4x4 pick the TPU compiler through libtpu, by default the slice preset's topology) and
--coordinator HOST:PORT --num_processes N --process_id I (multi-process)."""

DEFAULT_CONFIG = {"convert": "convert", "prepare": "prepare", "infer": "infer", "eval": "eval", "demo": "demo",
                  "demo-backbones": "demo_backbones", "train": None, "curriculum": None}
# Flags that are not config fields: name -> takes a value.
COMMAND_FLAGS = {
    "train": {"workdir": True, "coordinator": True, "num_processes": True, "process_id": True, "compile_only": False,
              "compile_target": True, "topology": True},
    "curriculum": {"workdir": True, "coordinator": True, "num_processes": True, "process_id": True,
                   "compile_only": False, "compile_target": True, "topology": True},
    "demo": {"profile": True, "no_progress": False},
    "demo-backbones": {"profile": True, "no_progress": False, "part": True},
    "prepare": {"option": True},
}
# Short flags that spell out a nested config field: flag -> field.
FIELD_ALIASES = {"demo": {"pretrain_backbones": "backbones.pretrain"}}
LIST_FIELDS = {"infer": ("audio",), "eval": ("manifest",)}  # several values after one flag


class UsageError(UserError):
    """A command line that cannot run: reported as one line, exit status 2."""


def split_args(command: str, argv: Sequence[str]) -> Tuple[Optional[str], List[str], Dict[str, object], List[str]]:
    """-> (config spec, ['--config.a=b', ...] overrides, {flag: value} command flags, positionals).

    `--name value` / `--name=value` / `--switch` become `--config.name=...` when `name` is not one of
    the command's own flags (COMMAND_FLAGS); LIST_FIELDS take every value up to the next flag.
    """
    spec, overrides, flags, positional = None, [], {}, []
    own = COMMAND_FLAGS.get(command, {})
    lists = LIST_FIELDS.get(command, ())
    aliases = FIELD_ALIASES.get(command, {})
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if not a.startswith("--"):
            positional.append(a)
            continue
        name, eq, value = a[2:].partition("=")
        if name == "config":
            if not eq:
                if i >= len(args):
                    raise UsageError("--config needs a value: NAME[:arg] or FILE.py[:arg]")
                value, i = args[i], i + 1
            spec = value
        elif name.startswith("config."):
            if not eq:
                if i >= len(args) or args[i].startswith("--"):
                    raise UsageError(f"{a} needs a value ({a}=VALUE)")
                value, i = args[i], i + 1
            overrides.append(f"--{name}={value}")
        else:
            key = name.replace("-", "_")
            canonical = key if key in own else None
            if canonical is not None and not own[canonical]:
                flags[canonical] = True
                continue
            values = [value] if eq else []
            if not eq:
                while i < len(args) and not args[i].startswith("--"):
                    values.append(args[i])
                    i += 1
                    if key not in lists:
                        break
            if canonical is not None:
                if not values:
                    raise UsageError(f"--{name} needs a value")
                if canonical == "option":
                    flags.setdefault("option", []).append(values[0])
                else:
                    flags[canonical] = values[0]
            elif not values:  # a switch: a boolean field
                overrides.append(f"--config.{aliases.get(key, key)}=True")
            else:
                overrides.append(f"--config.{aliases.get(key, key)}={','.join(values)}")
    return spec, overrides, flags, positional


def load_config(spec: str, overrides: Sequence[str], arg: Optional[str] = None):
    """The config named by `spec` (+ `arg`) with `--config.a.b=value` overrides applied (ml_collections
    config_flags: types are checked against the config's fields)."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    from speechverse_jax import configs

    try:
        resolved = configs.resolve(spec)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if arg is not None:
        resolved = resolved.split(":", 1)[0] + ":" + arg
    try:  # the config module's own errors (a bad arg, say) come out as they are, not wrapped by absl
        configs.load(resolved)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UsageError(f"config {spec}: {_message(e)}") from None
    values = absl_flags.FlagValues()
    argv = ["speechverse-jax", f"--config={resolved}", *overrides]
    config_flags.DEFINE_config_file("config", None, "config module (get_config)", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (KeyError, AttributeError) as e:
        raise UsageError(f"config {spec}: unknown config field {_message(e)}") from None
    except (absl_flags.Error, TypeError, ValueError, OSError) as e:
        raise UsageError(f"config {spec}: {_message(e)}") from None


def _message(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else type(e).__name__


def _help(command: str, spec: Optional[str]) -> int:
    from speechverse_jax import configs

    print(USAGE if not spec else f"speechverse-jax {command} --config {spec}")
    if spec:
        config = configs.load(spec)
        print("fields (--config.NAME=value, or --NAME value):")
        for k, v in sorted(config.items()):
            print(f"  {k} = {v!r}" if not hasattr(v, "items") else f"  {k}.* (section)")
    return 0


# ----------------------------------------------------------------------------------------------
# Sub-commands: config in, library call out.

def _convert(config, flags, positional) -> int:
    for field in ("wavlm", "out"):
        if not config[field]:
            raise UsageError(f"convert: --{field} is required (config field {field})")
    if bool(config.t5) == bool(config.llm):
        raise UsageError("convert: pass exactly one of --t5 and --llm")
    if config.llm:
        from speechverse_jax.convert.pipeline_decoder import convert_decoder_checkpoints as convert_fn

        llm_kw = dict(llm_dir=config.llm)
    else:
        from speechverse_jax.convert.pipeline import convert_checkpoints as convert_fn

        llm_kw = dict(t5_dir=config.t5)
    report = convert_fn(
        wavlm_dir=config.wavlm, out_dir=config.out, dtype=config.dtype, verify=config.verify,
        report_path=config.report or None, overwrite=config.overwrite, tolerance=config.tolerance, **llm_kw,
    )
    if config.verify and not report["verify"]["passed"]:
        print(f"verification FAILED (max relative difference above {config.tolerance}); nothing written to "
              f"{config.out}", file=sys.stderr)
        return 1
    return 0


def _start(config, workdir, flags) -> bool:
    """Multi-process start-up, or the compile-only check (then returns True: nothing else to run)."""
    if flags.get("compile_only"):
        from speechverse_jax import fs
        from speechverse_jax.train import aot

        target, _, _ = aot.resolve_target(config, flags.get("compile_target", "auto"), flags.get("topology"))
        if target == "cpu":
            aot.force_cpu_devices(aot.mesh_devices(config))
        hlo = None
        if workdir and not fs.is_remote(workdir):
            fs.makedirs(workdir)
            hlo = f"{workdir.rstrip('/')}/compile_only.hlo.txt.gz"
        report = aot.compile_train_step(config, target=target, topology=flags.get("topology"), hlo_out=hlo)
        if workdir:
            fs.makedirs(workdir)
            fs.write_text(f"{workdir.rstrip('/')}/compile_only.json", json.dumps(report, indent=2))
            print(f"report: {workdir.rstrip('/')}/compile_only.json")
        return True
    from speechverse_jax.train import distributed

    distributed.initialize(flags.get("coordinator"), _int_flag(flags, "num_processes"),
                           _int_flag(flags, "process_id"))
    return False


def _int_flag(flags, name) -> Optional[int]:
    if flags.get(name) is None:
        return None
    try:
        return int(flags[name])
    except ValueError:
        raise UsageError(f"--{name} takes an integer, got {flags[name]!r}") from None


def _workdir(flags) -> Optional[str]:
    if not flags.get("workdir") and not flags.get("compile_only"):
        raise UsageError("--workdir DIR is required (the run folder, local or gs://)")
    return flags.get("workdir")


def _train(config, flags, positional) -> int:
    from speechverse_jax.train.curriculum import run_stage

    workdir = _workdir(flags)
    if not _start(config, workdir, flags):
        run_stage(config, workdir)
    return 0


def _curriculum(config, flags, positional) -> int:
    from speechverse_jax.train.curriculum import run_curriculum, stage_configs

    workdir = _workdir(flags)
    if flags.get("compile_only"):  # the last (largest) stage: LoRA and all tasks
        config = list(stage_configs(config).values())[-1]
    if not _start(config, workdir, flags):
        run_curriculum(config, workdir)
    return 0


def _prepare(config, flags, positional) -> int:
    from speechverse_jax.data.prepare import run_prepare

    if not (config.dataset and config.src and config.out):
        raise UsageError("usage: speechverse-jax prepare DATASET SRC OUT [--option KEY=VALUE ...]")
    options = {k: v for k, v in config.options.items() if v != ""}
    summary = run_prepare(config.dataset, config.src, config.out, **options)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _demo(config, flags, positional) -> int:
    out = config.out
    if flags.get("profile") == "convert-only":
        from speechverse_jax.demo.smoke import run_demo as run_smoke

        run_smoke(out_dir=out)
        return 0
    from speechverse_jax.demo.run import run_demo

    run_demo(out_dir=out, progress=not flags.get("no_progress"), config=config)
    return 0


def _demo_backbones(config, flags, positional) -> int:
    from speechverse_jax.demo.recipe import run_recipe

    summary = run_recipe(config, config.out, progress=not flags.get("no_progress"), part=flags.get("part") or "all")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _load_model(checkpoint: str):
    from speechverse_jax.api import SpeechVerseModel

    if not checkpoint:
        raise UsageError("--checkpoint is required (a training run folder or a converted base folder)")
    if os.path.exists(os.path.join(checkpoint, "config.json")):
        return SpeechVerseModel.from_run(checkpoint)
    return SpeechVerseModel.from_base(checkpoint)  # an untrained (converted) base: adaptor at init


def _list(value: str) -> List[str]:
    return [x for x in str(value).split(",") if x]


def _infer(config, flags, positional) -> int:
    """Each file answered on its own line; a bad file gets one `error:` line and exit status 1."""
    from speechverse_jax.decode.constraints import load_labels
    from speechverse_jax.infer import answer_files

    audio = _list(config.audio)
    if not audio or not config.instruction:
        raise UsageError("infer needs --audio FILE [FILE ...] and --instruction TEXT")
    model = _load_model(config.checkpoint)
    labels = load_labels(config.labels) if config.labels else None
    results = answer_files(model, audio, config.instruction, num_beams=int(config.beams),
                           max_new_tokens=int(config.max_new_tokens), labels=labels, task=config.task or None)
    for r in results:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
        if config.json:
            print(json.dumps({"audio": r["audio"], "instruction": config.instruction,
                              **{k: v for k, v in r.items() if k != "audio"}}))
        elif "error" not in r:
            print(f"{r['audio']}\t{r['answer']}")
    return 1 if any("error" in r for r in results) else 0


def _eval(config, flags, positional) -> int:
    """Skips and counts bad rows (or stops at the first with `strict`); resumes a killed run in `out`."""
    from speechverse_jax.eval.evaluate import EvalSetting, EvalSkips, evaluate, write_reports

    manifests = _list(config.manifest)
    if not manifests:
        raise UsageError("eval needs --manifest FILE [FILE ...]")
    for field, allowed in (("split", ("seen", "unseen", "both")), ("constrained", ("no", "yes", "both"))):
        if config[field] not in allowed:
            raise UsageError(f"--{field} must be one of {allowed}, got {config[field]!r}")
    model = _load_model(config.checkpoint)
    splits = ("seen", "unseen") if config.split == "both" else (config.split,)
    modes = (False, True) if config.constrained == "both" else (config.constrained == "yes",)
    settings = [EvalSetting(s, constrained=c, joint=config.joint, num_beams=int(config.beams),
                            max_new_tokens=int(config.max_new_tokens)) for s in splits for c in modes]
    skips = EvalSkips(strict=bool(config.strict))
    predictions, table = evaluate(model, manifests, settings, tasks=_list(config.tasks) or None,
                                  batch_size=int(config.batch_size), out_dir=config.out, skips=skips,
                                  fingerprint_extra={"checkpoint": os.path.abspath(config.checkpoint)})
    paths = write_reports(config.out, predictions, table, skips=skips)
    print(open(paths["markdown"]).read())
    print(f"predictions: {paths['predictions']}\nmetrics: {paths['json']}, {paths['markdown']}\n"
          f"skipped rows: {skips.report()['total']} ({paths['skipped']})")
    return 0


COMMANDS = {"convert": _convert, "prepare": _prepare, "train": _train, "curriculum": _curriculum,
            "infer": _infer, "eval": _eval, "demo": _demo, "demo-backbones": _demo_backbones}


def parse(argv: Sequence[str]):
    """argv (without the program name) -> (command, config, command flags, positionals)."""
    if not argv:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0)
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    wants_help = any(a in ("-h", "--help") for a in rest)
    spec, overrides, flags, positional = split_args(command, [a for a in rest if a not in ("-h", "--help")])
    spec = spec or DEFAULT_CONFIG[command]
    if wants_help:
        raise SystemExit(_help(command, spec))
    if spec is None:
        raise UsageError(f"{command} needs --config NAME[:arg] or --config FILE.py[:arg] (packaged configs: "
                         "stage1, stage2_warmup, stage2_multitask, curriculum)")
    arg = None
    if command == "prepare":
        if len(positional) != 3:
            raise UsageError("usage: speechverse-jax prepare DATASET SRC OUT [--option KEY=VALUE ...]")
        arg = positional[0]
        overrides = [f"--config.src={positional[1]}", f"--config.out={positional[2]}", *overrides]
        for item in flags.get("option", []):
            if "=" not in item:
                raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            overrides.append(f"--config.options.{key}={value}")
        positional = []
    elif flags.get("profile") and not (command == "demo" and flags["profile"] == "convert-only"):
        arg = flags["profile"]  # demo, demo-backbones: the config's argument
    if positional:
        raise UsageError(f"{command}: unexpected arguments {positional}")
    config = load_config(spec, overrides, arg)
    return command, config, flags, positional


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    def run() -> int:
        command, config, flags, positional = parse(argv)
        return COMMANDS[command](config, flags, positional)

    return run_cli(run)  # user errors: one line on stderr, exit 2; bugs keep their traceback


if __name__ == "__main__":
    sys.exit(main())
