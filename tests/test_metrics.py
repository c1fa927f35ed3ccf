"""Metrics against hand-computed values."""

import pytest
import sacrebleu

from speechverse_jax.eval import metrics as M


def test_registry_covers_the_task_metrics():
    from speechverse_jax.data import tasks

    needed = {t.metric for t in tasks.TASKS.values()} - {"none"}
    assert needed | {"sd_f1", "malformed_rate"} <= set(M.METRICS)
    with pytest.raises(KeyError):
        M.compute("nope", ["a"], ["a"])
    with pytest.raises(ValueError):
        M.compute("wer", ["a"], ["a", "b"])


def test_normalize_text():
    assert M.normalize_text("Don't  STOP\u2014now...") == "dont stop now"
    assert M.normalize_text("  Paris, (France)!  ") == "paris france"
    assert M.normalize_text("$5 + tax = 7%") == "$5 + tax = 7"  # symbols (S*) stay, % is punctuation (Po)


def test_wer_is_corpus_level_after_normalisation():
    refs = ["Hello, world!", "the cat sat", "Don't stop"]
    hyps = ["hello world", "the dog sat on", "dont  stop"]
    # 0 errors / 2 words; 1 substitution + 1 insertion / 3 words; 0 / 2 -> 2 / 7 (not the mean of rates)
    assert M.compute("wer", hyps, refs) == pytest.approx(100 * 2 / 7)
    assert M.wer(["a b"], ["a b"]) == 0.0
    assert M.wer(["x"], [""]) == float("inf") and M.wer([""], [""]) == 0.0


def test_bleu():
    refs = ["the cat sat on the mat", "there is a dog in the garden"]
    hyps = ["the cat sat on a mat", "a dog is in the garden"]
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < M.bleu(hyps, refs) < 100


def test_accuracy_and_uar():
    preds = ["Happy.", "sad", "angry", "surprised"]
    refs = ["happy", "sad", "neutral", "angry"]
    labels = ["neutral", "happy", "sad", "angry"]
    assert M.accuracy(preds, refs, labels=labels) == pytest.approx(50.0)
    # recalls: a 2/3, b 1/1 -> UAR 5/6, while accuracy is 3/4
    assert M.uar(["a", "a", "b", "b"], ["a", "a", "a", "b"]) == pytest.approx(100 * 5 / 6)
    assert M.accuracy(["a", "a", "b", "b"], ["a", "a", "a", "b"]) == pytest.approx(75.0)
    # per-class recall over the classes present in the references; unknown outputs count as wrong
    assert M.uar(["play_radio", "banana", "alarm_set"], ["play_radio", "alarm_set", "alarm_set"]) == pytest.approx(75.0)


SF_REFS = ["date = tomorrow; time = five pm;", "place_name = paris;", "none"]
SF_PREDS = ["date = Tomorrow; time = five;", "person = paris;", "none"]


def test_slurp_slu_f1_by_hand():
    s = M.slurp_scores(SF_PREDS, SF_REFS)
    # word: date d=0, time d=WER(five pm, five)=1/2, person unmatched (fp 1), place_name missed (fn 1)
    #   tp=2, fp=fn=1.5 -> F1 = 2/3.5
    assert s["word_f1"] == pytest.approx(100 * 2 / 3.5)
    # char: time d = lev(five pm, five)/7 = 3/7 -> tp=2, fp=fn=10/7 -> F1 = 2/(2+10/7) = 7/12
    assert s["char_f1"] == pytest.approx(100 * 7 / 12)
    # SLU-F1: summed counts tp=4, fp=fn=1.5+10/7 -> 4/(4+41/14) = 56/97
    assert s["slu_f1"] == pytest.approx(100 * 56 / 97)
    assert M.compute("slu_f1", SF_PREDS, SF_REFS) == pytest.approx(100 * 56 / 97)
    # parsed lists work too; the closest gold value of the same slot is matched
    two = M.slurp_scores([[("date", "friday")]], [[("date", "monday"), ("date", "friday")]])
    assert two["word_f1"] == pytest.approx(100 * 2 / 3) and two["char_f1"] == pytest.approx(100 * 2 / 3)
    assert M.slu_f1(["none"], ["none"]) == 0.0  # nothing to find: 0, as the SLURP tool


def test_sd_f1_ignores_values():
    # labels: {date, time} vs {date, time} -> tp 2; person vs place_name -> fp 1, fn 1 -> F1 2/3
    assert M.sd_f1(SF_PREDS, SF_REFS) == pytest.approx(100 * 2 / 3)
    assert M.sd_f1(["date = x; date = y;"], ["date = z;"]) == pytest.approx(100 * 2 / 3)  # multiset


def test_keyword_macro_f1_is_per_utterance():
    preds = ["paris, France", "a, b", "", "x"]
    refs = ["paris, france", "b, c, d", "", ""]
    # 1, F1(P=1/2, R=1/3)=0.4, 1 (both empty), 0 -> mean 0.6
    assert M.macro_f1(preds, refs) == pytest.approx(60.0)
    assert M.macro_f1([["b", "a"]], [["a", "b"]]) == pytest.approx(100.0)


def test_malformed_rate():
    assert M.is_looping("a b a b a b a b") and not M.is_looping("a b a b a b")
    assert M.is_looping("go the the the the end") and not M.is_looping("the cat sat on the mat")
    er = ["happy", "", "the the the the", "surprised", "Sad."]
    assert M.malformed_rate(er, task="er") == pytest.approx(60.0)
    assert M.malformed_rate(["maybe", "yes"], labels=["yes", "no"]) == pytest.approx(50.0)
    sf = ["none", "date = x;", "garbage", "weekday = monday;"]
    assert M.malformed_rate(sf, task="sf") == pytest.approx(50.0)
    assert M.malformed_rate(["hello there", " "], task="asr") == pytest.approx(50.0)


def test_evaluate_task_including_joint_outputs():
    sf = M.evaluate_task("sf", SF_PREDS, SF_REFS)
    assert set(sf) == {"slu_f1", "sd_f1", "malformed_rate"}
    assert sf["slu_f1"] == pytest.approx(100 * 56 / 97) and sf["malformed_rate"] == 0.0
    refs = ["ASR: turn on the radio | Intent: play_radio |", "ASR: wake me up | Intent: alarm_set |"]
    preds = ["ASR: turn on radio | Intent: play_radio |", "ASR: wake me up | Intent: alarm_query"]
    out = M.evaluate_task("ic", preds, refs)
    assert out["asr_wer"] == pytest.approx(100 * 1 / 7)
    assert out["accuracy"] == pytest.approx(50.0) and out["malformed_rate"] == 0.0
    assert M.evaluate_task("er", ["happy", "sad"], ["happy", "angry"]) == {"uar": 50.0, "malformed_rate": 0.0}


def test_exact_match_normalises_case_and_punctuation():
    from speechverse_jax.eval.metrics import compute

    assert compute("exact_match", ["Seven.", "four", "two"], ["seven", "five", "Two"]) == 200.0 / 3
