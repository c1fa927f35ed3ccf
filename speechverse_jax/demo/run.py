"""`speechverse-jax demo`: a tiny SpeechVerse trained and evaluated end to end on 2 CPU cores.

    1. corpus     espeak-ng speaks a multi-task corpus (demo/corpus.py)
    2. backbones  the WavLM + T5 (or, with `layout='decoder'`, + the decoder-only LM) shipped in the
                  package (demo/pretrained/, made by `speechverse-jax demo-backbones`; demo/shipped.py):
                  checksums checked, converted with `speechverse-jax convert --verify` like downloaded
                  weights (once per output folder, then reused).
                  `--pretrain-backbones` runs the recipe here instead and converts its release.
    3. cache      the frozen encoder's hidden states, computed once for every clip
    4. curriculum stage1 -> stage2_warmup -> stage2_multitask (configs/demo.py)
    5. evaluate   every task on the test split: seen and unseen instructions, free and constrained
                  decoding, joint decoding; results table, plots, example predictions; then the
                  robustness splits (voices beyond the corpus's ranges, shuffled word orders)

Everything lands in one folder, printed at the end.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import numpy as np

from speechverse_jax import configs
from speechverse_jax.errors import UserError


def demo_config(profile: str = "full"):
    return configs.load("demo", profile)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def backbones_folder(config) -> str:
    """The shipped backbones to convert: `backbones.dir`, by default the packaged release."""
    from speechverse_jax.demo import shipped

    return config.backbones.dir or shipped.PRETRAINED_DIR


def check_backbones(config) -> None:
    """Before the corpus is spoken: the shipped backbones are intact and held out this corpus's
    dev/test sentences (a bad folder fails in a second, not after the corpus)."""
    from speechverse_jax.demo import shipped

    if str(config.layout) not in shipped.LAYOUT_LLM:
        raise UserError(f"layout must be one of {sorted(shipped.LAYOUT_LLM)}, got {config.layout!r}")
    if not config.backbones.pretrain:
        manifest = shipped.verify_checksums(backbones_folder(config))
        shipped.check_corpus_compatible(manifest, int(config.seed))
        absent = [f for f in shipped.LM_FILES if f not in manifest["files"]] if config.layout == "decoder" else []
        if absent:
            raise UserError(f"{backbones_folder(config)}: this release has no decoder-only LM ({absent[0]}) for "
                            "layout=decoder")


def build_backbones(config, out_dir: str, progress: bool = True) -> Dict[str, Any]:
    """The converted base in `out_dir/base` (`layout` 'decoder': the WavLM + the decoder-only LM in
    `out_dir/base_decoder`): from the shipped backbones, or with `backbones.pretrain`
    from the recipe (`speechverse-jax demo-backbones`, the config's profile, the corpus's seed) run
    into `out_dir/recipe`. Either release folder is checked and converted like downloaded weights."""
    from speechverse_jax.demo import shipped

    if config.backbones.pretrain:
        from speechverse_jax.demo.recipe import run_recipe

        recipe = configs.load("demo_backbones", config.profile)
        recipe.split_seed = int(config.seed)  # the recipe holds out the dev/test sentences of this corpus
        folder = run_recipe(recipe, os.path.join(out_dir, "recipe"), progress=progress)["release_dir"]
        origin = "pretrained here (--pretrain-backbones)"
    else:
        folder = backbones_folder(config)
        origin = "shipped" if folder == shipped.PRETRAINED_DIR else "backbones.dir"
    shipped.check_corpus_compatible(shipped.read_manifest(folder), int(config.seed))
    layout = str(config.layout)
    base = os.path.join(out_dir, "base" if layout == "t5" else f"base_{layout}")
    return dict(shipped.convert_shipped(folder, base, progress, layout=layout), origin=origin)


def encoder_cache(config, base_dir: str, corpus_dir: str, out_path: str, progress: bool = True):
    """The frozen encoder's states for every clip of every split (computed once, then loaded)."""
    from speechverse_jax import checkpoints
    from speechverse_jax.data.encoder_cache import EncoderCache, build_cache, source_fingerprint

    manifests = [os.path.join(corpus_dir, f"{s}.jsonl") for s in ("train", "dev", "test")]
    manifests += robust_manifests(corpus_dir).values()
    fingerprint = source_fingerprint(base_dir, manifests)
    if os.path.exists(out_path):
        cache = EncoderCache.load(out_path)
        if cache.fingerprint == fingerprint:
            return cache
        _say(f"{out_path} was computed from another corpus or encoder: computing it again")
    model_cfg = checkpoints.model_config_for(config.stage1.model, base_dir)
    params = checkpoints.load_base_params(base_dir)["wavlm"]
    cache = build_cache(model_cfg, params, manifests, batch_size=16,
                        bucket_seconds=tuple(config.stage1.data.audio_buckets_seconds), progress=progress)
    cache.save(out_path, fingerprint)
    return cache


def robust_manifests(corpus_dir: str) -> Dict[str, str]:
    """{split: manifest} of the robustness splits this corpus has (demo/corpus.py plan_robust)."""
    from speechverse_jax.demo.corpus import ROBUST_SPLITS

    paths = {sp: os.path.join(corpus_dir, f"{sp}.jsonl") for sp in ROBUST_SPLITS}
    return {sp: p for sp, p in paths.items() if os.path.exists(p)}


def run_curriculum_cached(config, base_dir: str, corpus_dir: str, cache, workdir: str, progress: bool = True):
    """The three stages on cached encoder states."""
    from speechverse_jax import checkpoints
    from speechverse_jax.data.encoder_cache import CachedFeatureData
    from speechverse_jax.train.curriculum import make_data, run_curriculum

    wavlm_cfg = checkpoints.load_base_config(base_dir)[1]
    with config.unlocked():
        config.base_checkpoint = base_dir
        for stage in config.order:
            multitask = stage == "stage2_multitask"  # stage 1 and the LoRA warm-up see ASR only
            data = config[stage].data
            data.train_manifests = os.path.join(corpus_dir, "train.jsonl" if multitask else "by_task/train.asr.jsonl")
            data.eval_manifests = os.path.join(corpus_dir, "dev.jsonl" if multitask else "by_task/dev.asr.jsonl")
            data.tokenizer = base_dir

    def data_factory(stage_config):
        return CachedFeatureData(make_data(stage_config), cache, wavlm_cfg)

    return run_curriculum(config, workdir, progress=progress, data_factory=data_factory)


def evaluate_demo(run_dir: str, corpus_dir: str, cache, out_dir: str, profile: str = "full",
                  progress: bool = True) -> Dict[str, Any]:
    """Every task on the test split: seen / unseen instructions (full profile), free and constrained
    decoding, and joint decoding for IC."""
    from speechverse_jax.api import SpeechVerseModel
    from speechverse_jax.demo.corpus import baselines
    from speechverse_jax.eval.evaluate import EvalSetting, EvalSkips, evaluate, write_reports

    model = SpeechVerseModel.from_run(run_dir)
    test = [os.path.join(corpus_dir, "test.jsonl")]
    settings = [EvalSetting("seen"), EvalSetting("seen", constrained=True)]
    if profile == "full":
        settings += [EvalSetting("unseen"), EvalSetting("unseen", constrained=True)]
    skips = EvalSkips()  # clips the cache could not encode, bad manifest lines: skipped and counted
    predictions, table = evaluate(model, test, settings, cache=cache, progress=progress, skips=skips)
    joint_preds, joint_table = evaluate(model, test, [EvalSetting("seen", joint=True)], tasks=["ic"], cache=cache,
                                        progress=progress, skips=skips)
    for task, rows in joint_table.items():
        table[task].update(rows)
    base = baselines(corpus_dir)
    paths = write_reports(out_dir, predictions + joint_preds, table, base, skips=skips)
    robust = {}
    for split, manifest in robust_manifests(corpus_dir).items():  # never trained on: voices / word orders
        split_skips = EvalSkips()
        preds, robust[split] = evaluate(model, [manifest], [EvalSetting("seen"), EvalSetting("seen", constrained=True)],
                                        cache=cache, progress=progress, skips=split_skips)
        write_reports(os.path.join(out_dir, split), preds, robust[split], skips=split_skips)
    if robust:
        paths["robustness"] = os.path.join(out_dir, "robustness.md")
        with open(paths["robustness"], "w") as f:
            f.write(robustness_table(table, robust))
    return {"table": table, "baselines": base, "paths": paths, "model": model, "robust": robust}


def best_score(task: str, settings: Dict[str, Dict[str, Any]], prefix: str = "seen/") -> Optional[float]:
    """The task's metric under its best decoding among the `prefix` settings (lowest WER, else highest)."""
    from speechverse_jax.data import tasks as tasks_lib

    metric = tasks_lib.get_task(task).metric
    scores = [v[metric] for k, v in settings.items() if k.startswith(prefix) and v.get(metric) is not None]
    if not scores:
        return None
    return min(scores) if metric == "wer" else max(scores)


def compare_table(summaries: Dict[str, Dict[str, Any]]) -> str:
    """Markdown: each task's best score per demo run (`{name: summary.json dict}`, e.g. the T5 and the
    decoder-only layout on one corpus) on the test split (seen and unseen instructions) and the
    robustness splits, with the second run's difference from the first (positive: better)."""
    from speechverse_jax.data import tasks as tasks_lib

    names = list(summaries)
    columns = [("seen", "metrics", "seen/"), ("unseen", "metrics", "unseen/"),
               ("robust voices", "robust_voices", "seen/"), ("robust word order", "robust_order", "seen/")]

    def score(summary, source, task, prefix):
        table = summary["metrics"] if source == "metrics" else summary.get("robustness", {}).get(source, {})
        return best_score(task, table[task], prefix) if task in table else None

    head = [f"{col} {name}" for col, _, _ in columns for name in names]
    lines = ["| task | metric | " + " | ".join(head) + (f" | {names[-1]} vs {names[0]}, seen |" if len(names) == 2 else " |"),
             "|---" * (2 + len(head) + (len(names) == 2)) + "|"]
    tasks = sorted(set().union(*(s["metrics"] for s in summaries.values())))
    for task in tasks:
        metric = tasks_lib.get_task(task).metric
        cells = []
        for _, source, prefix in columns:
            for name in names:
                value = score(summaries[name], source, task, prefix)
                cells.append("" if value is None else f"{value:.1f}")
        row = f"| {task} | {metric} | " + " | ".join(cells)
        if len(names) == 2:
            a, b = (score(summaries[n], "metrics", task, "seen/") for n in names)
            diff = "" if a is None or b is None else f"{(a - b if metric == 'wer' else b - a):+.1f}"
            row += f" | {diff}"
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def robustness_table(test: Dict[str, Any], robust: Dict[str, Dict[str, Any]]) -> str:
    """Markdown: per task, the test split's seen-instruction score (best decoding) next to each
    robustness split's, and the difference."""
    from speechverse_jax.data import tasks as tasks_lib

    splits = sorted(robust)
    lines = ["| task | metric (%) | test | " + " | ".join(f"{sp} | change" for sp in splits) + " |",
             "|---|---|---|" + "---|---|" * len(splits)]
    for task in sorted(test):
        if not any(task in robust[sp] for sp in splits):
            continue
        ref = best_score(task, test[task])
        cells = []
        for sp in splits:
            got = best_score(task, robust[sp].get(task, {}))
            cells += ["-", "-"] if got is None else [f"{got:.1f}", "-" if ref is None else f"{got - ref:+.1f}"]
        lines.append(f"| {task} | {tasks_lib.get_task(task).metric} | " + ("-" if ref is None else f"{ref:.1f}")
                     + " | " + " | ".join(cells) + " |")
    return ("Robustness: test sentences in voices beyond the corpus's ranges (robust_voices) and in word "
            "orders no template makes (robust_order), seen instructions, best decoding. WER: lower is better.\n\n"
            + "\n".join(lines) + "\n")


def plot_metrics(table: Dict[str, Any], baselines_: Dict[str, Any], out_png: str) -> str:
    """Per task: seen-instruction score with free and with constrained decoding, next to the best
    chance / majority baseline. Metrics are in percent; WER is drawn as 100 - WER (floored at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechverse_jax.data import tasks as tasks_lib

    names, free, constrained, base = [], [], [], []
    for task in sorted(table):
        metric = tasks_lib.get_task(task).metric
        if metric not in table[task].get("seen/free", {}):
            continue
        flip = metric == "wer"
        score = lambda v: max(0.0, 100.0 - v) if flip else v  # noqa: E731
        b = [v for k, v in baselines_.get(task, {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_labels"]
        names.append(f"{task}\n({'100 - WER' if flip else metric})")
        free.append(score(table[task]["seen/free"][metric]))
        constrained.append(score(table[task].get("seen/constrained", {}).get(metric, float("nan"))))
        base.append(100.0 * ((1 - min(b)) if flip else max(b)) if b else 0.0)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    x = np.arange(len(names))
    ax.bar(x - 0.27, free, 0.27, label="free decoding")
    ax.bar(x, constrained, 0.27, label="constrained decoding")
    ax.bar(x + 0.27, base, 0.27, label="chance / majority baseline", color="lightgray")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score, % (higher is better)")
    ax.set_title("test split, seen instructions", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def run_demo(out_dir: str = "outputs/demo", profile: str = "full", progress: bool = True,
             config=None) -> Dict[str, Any]:
    """The whole demo; returns a summary (also written to `out_dir/summary.json`). `config` is the
    demo config (`configs.load("demo", profile)` with any overrides); by default the profile's."""
    from speechverse_jax.demo.corpus import make_corpus
    from speechverse_jax.train.metrics_log import plot_losses

    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = demo_config(profile) if config is None else config
    profile = config.profile
    timings = {}

    def stamp(name, since):
        timings[name] = round(time.time() - since, 1)
        _say(f"{name}: {timings[name]}s")
        return time.time()

    check_backbones(config)
    t = time.time()
    corpus_dir = os.path.join(out_dir, "corpus")
    if os.path.exists(os.path.join(corpus_dir, "corpus.json")):
        with open(os.path.join(corpus_dir, "corpus.json")) as f:
            corpus = json.load(f)
        _say(f"reusing the corpus in {corpus_dir}")
    else:
        _say(f"1/5 speaking the {profile} corpus with espeak-ng")
        corpus = make_corpus(corpus_dir, config.corpus.sizes.to_dict(), seed=int(config.seed),
                             workers=int(config.corpus.workers), progress=progress,
                             robust_sizes=config.corpus.robust_sizes.to_dict())
    t = stamp("corpus", t)
    _say("2/5 backbones: " + ("pretraining them with the demo-backbones recipe" if config.backbones.pretrain
                             else f"the shipped WavLM + {'T5' if config.layout == 't5' else 'decoder-only LM'} "
                                  f"({backbones_folder(config)})")
         + ", converted with --verify")
    backbones = build_backbones(config, os.path.join(out_dir, "backbones"), progress=progress)
    base_dir = backbones["base_dir"]
    below = {k: g for k, g in backbones.get("gates", {}).items() if not g.get("passed", True)}
    if below:  # the release says so itself (MANIFEST.json gates): the demo runs, the reader is told
        _say("warning: these backbones are below their quality gates: " + ", ".join(
            f"{k} {g['value']:g} (needs {g['op']} {g['threshold']:g})" for k, g in below.items()))
    t = stamp("backbones", t)
    _say("3/5 caching the frozen encoder's hidden states")
    cache = encoder_cache(config, base_dir, corpus_dir, os.path.join(out_dir, "encoder_cache.npz"), progress)
    t = stamp("encoder_cache", t)
    _say("4/5 curriculum: stage1 (ASR, adaptor) -> stage2_warmup (ASR, + LoRA) -> stage2_multitask (all tasks)")
    runs = os.path.join(out_dir, "runs")
    stages = run_curriculum_cached(config, base_dir, corpus_dir, cache, runs, progress=progress)
    t = stamp("curriculum", t)
    plot_losses({s: os.path.join(runs, s, "metrics.jsonl") for s in config.order}, os.path.join(out_dir, "loss_curves.png"))
    _say("5/5 evaluating every task on the test split")
    final = os.path.join(runs, config.order[-1])
    result = evaluate_demo(final, corpus_dir, cache, os.path.join(out_dir, "eval"), profile, progress=progress)
    plot_metrics(result["table"], result["baselines"], os.path.join(out_dir, "task_metrics.png"))
    t = stamp("evaluation", t)

    examples = _examples(result["paths"]["predictions"])
    infer_cmd, infer_out = _infer_example(result["model"], final, corpus_dir)
    summary = {
        "out_dir": out_dir, "profile": profile, "layout": str(config.layout), "seconds": round(time.time() - t0, 1),
        "timings": timings,
        "corpus": {k: corpus.get(k) for k in ("counts", "total_audio_seconds", "vocabulary_size")},
        "backbones": {k: backbones.get(k) for k in ("origin", "source", "layout", "manifest_sha256",
                                                     "tokenizer_pieces", "max_rel_diff_vs_hf", "gates", "recipe")},
        "stages": stages, "metrics": result["table"], "baselines": result["baselines"],
        "robustness": result["robust"],
        "examples": examples, "infer_example": {"command": infer_cmd, "output": infer_out},
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print()
    print(open(result["paths"]["markdown"]).read())
    if "robustness" in result["paths"]:
        print(open(result["paths"]["robustness"]).read())
    elif config.corpus.robust_sizes.to_dict():
        _say(f"{corpus_dir} has no robustness splits (made by an older version): delete it to make them")
    print("A few predictions (seen instructions, free decoding):")
    for e in examples:
        print(f"  [{e['task']}] {e['audio']}\n      ref: {e['reference']}\n      hyp: {e['hypothesis']}")
    print(f"\nTry it yourself:\n  {infer_cmd}\n  -> {infer_out}")
    print(f"\nDemo finished in {summary['seconds']}s. Everything is in {out_dir}:")
    print("  summary.json, eval/metrics.md, eval/robustness.md, eval/predictions.jsonl, loss_curves.png, task_metrics.png, runs/, backbones/")
    return summary


def _examples(predictions_path: str, per_task: int = 1):
    """The first `per_task` seen/free predictions of each task."""
    rows, count = [], {}
    with open(predictions_path) as f:
        for line in f:
            p = json.loads(line)
            if p["setting"] == "seen/free" and count.get(p["task"], 0) < per_task:
                count[p["task"]] = count.get(p["task"], 0) + 1
                rows.append({k: p[k] for k in ("task", "audio", "instruction", "reference", "hypothesis")})
    return rows


def _infer_example(model, run_dir: str, corpus_dir: str):
    from speechverse_jax.demo.corpus import read_rows

    row = next(r for r in read_rows(os.path.join(corpus_dir, "test.jsonl")) if r["task"] == "asr")
    audio = os.path.join(corpus_dir, row["audio"])
    instruction = "Transcribe the preceding audio."
    out = model.generate([audio], [instruction])[0]
    cmd = f'speechverse-jax infer --checkpoint {run_dir} --audio {audio} --instruction "{instruction}"'
    return cmd, out
