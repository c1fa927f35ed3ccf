"""The demo's quick profile end to end (the CI smoke test): every stage ran, every task has a metric.

A pipeline check, not a quality bar: the quick profile trains for a few steps only. The CTC scoring
tests below check demo/backbones.py, which the backbones recipe (`speechverse-jax demo-backbones`) uses.
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from speechverse_jax.data import tasks
from speechverse_jax.demo import backbones as bb
from speechverse_jax.demo.run import run_demo

# The demo WavLM's conv stack (50 Hz frames): hf_tiny's default (800 Hz) makes 6 s clips slow.
DEMO_CONV = dict(conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2])


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


class _SpelledCTC:
    """A stand-in for `WavLMForCTC`: one frame per 160 samples, logits read from `params` (which spell
    chosen strings); frames past each clip's end hold a letter that must never be decoded."""

    def apply(self, variables, audio, audio_mask):
        table = variables["params"]  # [16, max frames, alphabet + 1]
        frames = audio.shape[1] // 160
        return table[:, :frames], audio_mask[:, ::160][:, :frames]


def _spell(texts, clip_frames, frames=100, rows=16):
    """Logits whose greedy CTC decoding is `texts[r]` within `clip_frames[r]` frames, 'z' after them."""
    table = np.zeros((rows, frames, len(bb.CTC_ALPHABET) + 1), np.float32)
    table[:, :, bb.CTC_ALPHABET.index("z") + 1] = 1.0  # padding frames and padding rows: 'zzzz'
    for r, text in enumerate(texts):
        ids = [i for c in bb.ctc_ids(text) for i in (c, 0)]  # each character, then a blank
        assert len(ids) <= clip_frames[r]
        table[r, : clip_frames[r]] = 0.0
        table[r, np.arange(clip_frames[r]), 0] = 1.0  # blank
        table[r, np.arange(len(ids)), ids] = 2.0
    return jnp.asarray(table)


def test_ctc_cer_scores_greedy_decoding_of_each_clip_within_its_length():
    refs = ["play jazz", "set an alarm", "hi"]
    clips = [np.zeros(n, np.float32) for n in (6400, 9600, 4800)]  # 40, 60 and 30 frames
    frames = [c.size // 160 for c in clips]
    model = _SpelledCTC()
    assert bb.ctc_cer(model, _spell(refs, frames), clips, refs) == 0.0
    assert bb.ctc_cer(model, _spell(["", "", ""], frames), clips, refs) == 100.0  # all blank: all deleted
    n_chars = sum(len(r) for r in refs)
    one_wrong = ["play jazz", "set an alarn", "hi"]  # one substitution
    assert bb.ctc_cer(model, _spell(one_wrong, frames), clips, refs) == round(100 / n_chars, 2)
    # repeats need a blank between them; uppercase and punctuation are dropped from the references
    assert bb.ctc_cer(model, _spell(["aa", "b", "c"], frames), clips[:3], ["AA!", "b", "c"]) == 0.0
