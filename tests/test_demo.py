"""The demo's quick profile end to end (the CI smoke test): every stage ran, every task has a metric.

A pipeline check, not a quality bar: the quick profile trains for a few steps only.
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from speechverse_jax.data import tasks
from speechverse_jax.data.audio import load_audio
from speechverse_jax.demo import backbones as bb
from speechverse_jax.demo.corpus import read_rows
from speechverse_jax.demo.run import run_demo


def test_quick_demo_runs_end_to_end(tmp_path, monkeypatch):
    out = str(tmp_path / "demo")
    cer_calls = []
    real_ctc_cer = bb.ctc_cer

    def spy_ctc_cer(model, params, clips, transcripts, **kw):
        value = real_ctc_cer(model, params, clips, transcripts, **kw)
        cer_calls.append(([len(c) for c in clips], list(transcripts), value))
        return value

    monkeypatch.setattr(bb, "ctc_cer", spy_ctc_cer)
    summary = run_demo(out_dir=out, profile="quick", progress=False)
    for name in ("summary.json", "loss_curves.png", "task_metrics.png", "eval/metrics.md", "eval/predictions.jsonl",
                 "backbones/base/model_config.json", "backbones/hf/wavlm/model.safetensors",
                 "backbones/hf/t5/spiece.model"):
        assert os.path.exists(os.path.join(out, name)), name
    assert summary["backbones"]["max_rel_diff_vs_hf"] <= 1e-4
    # The encoder's dev CER: greedy CTC over every single-voice dev clip with a transcript (SC mixes two
    # voices; test_demo_corpus checks the dev sentences are held out). 20 CTC steps cannot transcribe
    # (> 0; 0 would mean the references were scored against themselves); an encoder spraying characters
    # would pass 100 (insertions). test_ctc_cer_* below checks the scoring itself.
    corpus = os.path.join(out, "corpus")
    dev = [r for r in read_rows(os.path.join(corpus, "dev.jsonl")) if r.get("transcript") and r["task"] != "sc"]
    assert dev
    assert len(cer_calls) == 1
    lengths, transcripts, value = cer_calls[0]
    assert transcripts == [r["transcript"] for r in dev]
    assert lengths == [load_audio(os.path.join(corpus, r["audio"])).size for r in dev]
    assert summary["wavlm_pretraining"]["extra"]["dev_cer"] == value
    assert 0.0 < value <= 100.0, value
    t5 = summary["t5_pretraining"]
    assert len(t5["text_tasks"]) == len(t5["extra"]["phase_losses"]) == 2  # copying, then the task mix
    assert set(t5["text_tasks"][0]) == {"copy", "copy_random", "copy_stretched"}
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
