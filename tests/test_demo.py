"""The demo's quick profile end to end (the CI smoke test): every stage ran, every task has a metric.

A pipeline check, not a quality bar: the quick profile trains for a few steps only.
"""

import pytest
import json
import os

from speechverse_jax.data import tasks
from speechverse_jax.demo.run import run_demo

# The demo WavLM's conv stack (50 Hz frames): hf_tiny's default (800 Hz) makes 6 s clips slow.
DEMO_CONV = dict(conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2])


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, make_fake_release):
    """The quick profile on a release folder of tiny random backbones (quality is not asserted): the
    release is checked, converted with --verify, and the whole curriculum and evaluation run on it."""
    from speechverse_jax.configs.demo import get_config
    from speechverse_jax.demo.corpus import corpus_texts, make_corpus

    out = str(tmp_path / "demo")
    config = get_config("quick")
    # the corpus first (the demo reuses it), so the fake tokenizer is trained on its texts
    make_corpus(os.path.join(out, "corpus"), config.corpus.sizes.to_dict(), seed=0, progress=False)
    release = make_fake_release(tmp_path / "release", corpus_texts(os.path.join(out, "corpus")), vocab_size=200,
                                t5_vocab=256, held_out_seed=0, wavlm_overrides=DEMO_CONV)
    config.backbones.dir = release
    summary = run_demo(out_dir=out, progress=False, config=config)
    for name in ("summary.json", "loss_curves.png", "task_metrics.png", "eval/metrics.md", "eval/predictions.jsonl",
                 "backbones/base/model_config.json", "backbones/base/spiece.model", "backbones/base.source.json"):
        assert os.path.exists(os.path.join(out, name)), name
    backbones = summary["backbones"]
    assert backbones["origin"] == "backbones.dir" and backbones["source"] == release
    assert 0 <= backbones["max_rel_diff_vs_hf"] <= 1e-4
    assert backbones["gates"] == {"wavlm_dev_cer": {"value": 97.5, "threshold": 100.0, "op": "<=", "passed": True}}
    assert backbones["recipe"]["wavlm"]["hidden_size"] == 64
    assert set(summary["stages"]) == {"stage1", "stage2_warmup", "stage2_multitask"}
    for stage in summary["stages"].values():
        assert stage["steps"] > 0 and stage["skipped_steps"] == 0
    metrics = summary["metrics"]
    assert set(metrics) == {"asr", "ic", "sf", "kws", "kwe", "ac", "sc", "sns", "open"}
    for task, settings in metrics.items():
        metric = tasks.get_task(task).metric
        assert metric in settings["seen/free"], (task, settings)
        if tasks.get_task(task).labels or task in ("ic", "ac"):
            assert "seen/constrained" in settings, task
    assert "seen/free/joint" in metrics["ic"]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["infer_example"]["command"].startswith("speechverse-jax infer")


def test_the_decoder_layout_needs_a_release_with_the_lm(tmp_path, make_fake_release):
    """`layout='decoder'` converts the release's decoder-only LM: a release without one (before
    release 4) is refused before the corpus is spoken, and so is an unknown layout."""
    import pytest

    from speechverse_jax.configs.demo import get_config
    from speechverse_jax.demo.run import check_backbones
    from speechverse_jax.errors import UserError

    config = get_config("quick")
    config.backbones.dir = make_fake_release(tmp_path / "release", ["turn on the radio"], held_out_seed=0)
    check_backbones(config)  # the T5 layout: fine
    config.layout = "decoder"
    with pytest.raises(UserError, match="no decoder-only LM"):
        check_backbones(config)
    config.layout = "encoder"
    with pytest.raises(UserError, match="layout must be one of"):
        check_backbones(config)


def test_compare_table_gives_each_layouts_best_scores_and_the_difference():
    from speechverse_jax.demo.run import compare_table

    def summary(wer, acc):
        return {"metrics": {"asr": {"seen/free": {"wer": wer}, "unseen/free": {"wer": wer + 10}},
                            "ic": {"seen/free": {"accuracy": acc - 5}, "seen/constrained": {"accuracy": acc}}},
                "robustness": {"robust_order": {"asr": {"seen/free": {"wer": 90.0}}}}}

    table = compare_table({"T5": summary(20.0, 70.0), "decoder": summary(25.0, 72.0)})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["asr"][2:4] == ["20.0", "25.0"] and rows["asr"][4:6] == ["30.0", "35.0"]
    assert rows["asr"][-1].strip(" |") == "-5.0"  # WER: lower is better, so the decoder is 5 points worse
    assert rows["ic"][2:4] == ["70.0", "72.0"] and rows["ic"][-1].strip(" |") == "+2.0"  # best decoding
    assert rows["asr"][8:10] == ["90.0", "90.0"] and rows["ic"][8:10] == ["", ""]
    assert "decoder vs T5, seen" in table.splitlines()[0]
