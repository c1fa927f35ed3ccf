"""The demo-backbones recipe: resumable training, the broad speech stream, the gates, the release."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechverse_jax import configs
from speechverse_jax.demo import recipe, shipped
from speechverse_jax.demo.corpus import held_out_sentences, sentence_families
from speechverse_jax.demo.speech_stream import VOICE_COUNT_IGNORE, SpeechStream
from speechverse_jax.errors import UserError


def _regression_part(workdir, fail_at=None):
    """A tiny least-squares problem through `train_part`: batch i is a function of i alone."""
    w_true = np.arange(6, dtype=np.float32).reshape(3, 2)

    def batch_at(i):
        if fail_at is not None and i == fail_at:
            raise RuntimeError("killed")
        x = np.random.default_rng(i).standard_normal((8, 3)).astype(np.float32)
        return {"x": x, "y": x @ w_true}

    def loss_fn(params, batch, rng):
        noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)  # the per-step rng must resume too
        return jnp.mean((batch["x"] @ params["w"] + noise - batch["y"]) ** 2), {}

    params = {"w": jnp.zeros((3, 2), jnp.float32)}
    schedule = recipe._schedule([(6, 2), (6, 1)], 0.1)
    return recipe.train_part("toy", str(workdir), loss_fn, params, batch_at, 12, schedule, checkpoint_every=4,
                             progress=False, log_every=1)


def test_an_appended_phase_continues_a_finished_run(tmp_path):
    """Release 3's WavLM: a finished run's checkpoint, continued with a phase appended (its own peak
    lr), equals a run made with both phases from the start: the earlier steps' rates are unchanged."""
    one = recipe._schedule([(6, 2, 0.1)], 0.1)
    two = recipe._schedule([(6, 2, 0.1), (6, 1, 0.05)], 0.1)
    assert [float(one(i)) for i in range(6)] == [float(two(i)) for i in range(6)]
    assert float(two(7)) == pytest.approx(0.05) and float(two(11)) < 0.05

    def run(workdir, phases, steps):
        x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
        batch_at = lambda i: {"x": x * (1 + i % 3), "y": x @ np.ones((3, 2), np.float32)}  # noqa: E731
        loss_fn = lambda p, b, rng: (jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {})  # noqa: E731
        return recipe.train_part("toy", str(workdir), loss_fn, {"w": jnp.zeros((3, 2), jnp.float32)}, batch_at,
                                 steps, recipe._schedule(phases, 0.1), checkpoint_every=3, progress=False)[0]

    straight = run(tmp_path / "straight", [(6, 2, 0.1), (6, 1, 0.05)], 12)
    run(tmp_path / "continued", [(6, 2, 0.1)], 6)
    continued = run(tmp_path / "continued", [(6, 2, 0.1), (6, 1, 0.05)], 12)
    np.testing.assert_array_equal(np.asarray(continued["w"]), np.asarray(straight["w"]))


def test_a_killed_part_resumes_to_the_same_weights(tmp_path):
    straight, report = _regression_part(tmp_path / "straight")
    w_true = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert report["steps"] == 12 and np.linalg.norm(np.asarray(straight["w"]) - w_true) < np.linalg.norm(w_true)  # learning, not drifting
    with pytest.raises(RuntimeError, match="killed"):
        _regression_part(tmp_path / "killed", fail_at=9)  # dies after the step-8 checkpoint
    resumed, _ = _regression_part(tmp_path / "killed")
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(straight["w"]))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps[-4:] == [8, 9, 10, 11]  # the resumed run started at the checkpoint


def _stream(block_size=24, narrow_blocks=0, **data):
    cfg = configs.load("demo_backbones", "full").wavlm.data.to_dict()
    cfg.update(block_size=block_size, narrow_blocks=narrow_blocks, **data)
    return SpeechStream(sentence_families(0), cfg, seed=3)


def test_the_speech_stream_is_deterministic_broad_and_never_speaks_held_out_sentences():
    stream = _stream(kinds={"sentence": 1, "word_salad": 1, "shuffled": 1, "two_voices": 1, "one_voice_two": 1,
                            "overlap": 1, "noise": 1})
    a, b = stream.block(5), stream.block(5)
    assert [c.text for c in a] == [c.text for c in b]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b))
    assert [c.text for c in stream.block(6)] != [c.text for c in a]
    held_out = set(held_out_sentences(0))
    clips = a + stream.block(6) + stream.block(7)
    kinds = {c.kind for c in clips}
    assert kinds == {"sentence", "word_salad", "shuffled", "two_voices", "one_voice_two", "overlap", "noise"}
    for c in clips:
        assert c.audio.dtype == np.float32 and 0 < c.audio.size <= stream.max_samples
        assert np.all(np.isfinite(c.audio)) and np.abs(c.audio).max() <= 1.0
        assert c.text not in held_out and not any(part in held_out for part in c.text.split("  "))
        if c.kind == "noise":
            assert (c.text, c.voices, c.accent) == ("", 0, -1)
        elif c.kind == "two_voices":
            assert c.voices == 2 and len(c.text.split()) >= 2
        elif c.kind == "overlap":
            assert c.voices == VOICE_COUNT_IGNORE and c.accent == -1
        else:
            assert c.voices == 1 and 0 <= c.accent < len(stream.accents)
    assert not stream.failures


def test_the_first_blocks_are_narrow_corpus_like_speech_with_the_broad_label_indices():
    stream = _stream(block_size=16, narrow_blocks=2)
    narrow = configs.load("demo_backbones", "full").wavlm.data.narrow
    allowed = {stream.label_accents.index(a) for a in narrow.accents}
    for j in (0, 1):
        clips = stream.block(j)
        assert {c.kind for c in clips} <= set(narrow.kinds)
        assert {c.accent for c in clips} <= allowed and {c.voices for c in clips} == {1}
    assert {c.kind for c in stream.block(2) + stream.block(3)} - set(narrow.kinds)  # then the broad mix


def test_wavlm_batches_have_one_label_width_per_audio_width_and_the_clips_transcripts():
    config = configs.load("demo_backbones", "full")
    stream = _stream(block_size=8)
    from speechverse_jax.models.wavlm import WavLMConfig

    cfg = WavLMConfig.from_hf(config.wavlm.model.to_dict())
    edges = [int(s * 16000) for s in config.wavlm.data.length_edges_seconds]
    batch_at = recipe.wavlm_batches(stream, cfg, 4, edges, seed=0)
    widths = {}
    for i in range(6):
        batch = batch_at(i)
        assert batch["audio"].shape[1] in edges
        widths.setdefault(batch["audio"].shape[1], set()).add(batch["labels"].shape[1])
        spoken = {"".join(recipe.CTC_ALPHABET[t - 1] for t in recipe.ctc_ids(c.text)) for c in stream.block(i // 2)}
        for row in range(4):
            if batch["label_paddings"][row, 0] > 1.5:  # a transcript CTC cannot align: no CTC target
                continue
            ids = batch["labels"][row][batch["label_paddings"][row] == 0]
            assert "".join(recipe.CTC_ALPHABET[t - 1] for t in ids) in spoken
            n = int(batch["audio_mask"][row].sum())
            assert n > 0 and not batch["audio_mask"][row, n:].any()
    assert all(len(w) == 1 for w in widths.values())
    assert recipe.ctc_feasible([1, 2, 3], 3) and not recipe.ctc_feasible([1, 1, 1], 4)


@pytest.fixture(scope="module")
def quick_release(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    config = configs.load("demo_backbones", "quick")
    report = recipe.run_recipe(config, str(out), progress=False)
    return config, str(out), report


@pytest.mark.slow
@pytest.mark.xdist_group("quick_recipe")
def test_the_quick_recipe_releases_checked_backbones_with_their_gates(quick_release, tmp_path):
    config, out, report = quick_release
    release = report["release_dir"]
    manifest = shipped.verify_checksums(release)
    assert manifest["recipe"] == recipe.recipe_dict(config) and manifest["profile"] == "quick"
    assert set(manifest["gates"]) == set(config.gates.thresholds)
    assert manifest["gates"] == report["gates"]
    for gate in manifest["gates"].values():
        assert np.isfinite(gate["value"])
    assert 0 <= report["measured"]["encoder_dev_cer"] and 0 <= report["measured"]["probe_speech"] <= 100
    for part in ("wavlm", "t5", "lm"):
        assert os.path.isdir(os.path.join(out, part, "checkpoints"))
        assert report[part]["steps"] > 0 and np.isfinite(report[part]["last_loss"])
        assert os.path.isfile(os.path.join(out, part, "metrics.jsonl"))
    shipped.check_corpus_compatible(manifest, 0)
    # the release converts like downloaded weights, and the HF reference agrees with our models
    converted = shipped.convert_shipped(release, str(tmp_path / "base"), progress=False)
    assert converted["max_rel_diff_vs_hf"] <= 1e-4
    # and so does the decoder-only LM (HF LlamaForCausalLM), with its own tokenizer and chat template
    decoder = shipped.convert_shipped(release, str(tmp_path / "base_decoder"), progress=False, layout="decoder")
    assert decoder["max_rel_diff_vs_hf"] <= 1e-4 and decoder["layout"] == "decoder"
    assert decoder["recipe"]["lm"]["model_type"] == "llama"
    assert not decoder["reused"] and not converted["reused"]
    from speechverse_jax import checkpoints

    assert checkpoints.load_base_config(decoder["base_dir"])[0] == "decoder"
    assert {"lm_copy_wer", "lm_kws_accuracy", "lm_copy_wer_shuffled"} <= set(report["measured"])


def test_a_release_without_the_lm_is_refused_for_the_decoder_layout(make_fake_release, tmp_path):
    folder = make_fake_release(str(tmp_path / "rel"), ["turn on the radio"])
    with pytest.raises(UserError, match="no decoder-only LM"):
        shipped.convert_shipped(folder, str(tmp_path / "base"), progress=False, layout="decoder")
    with pytest.raises(UserError, match="layout must be"):
        shipped.convert_shipped(folder, str(tmp_path / "base"), progress=False, layout="encoder")


def test_lm_examples_put_what_is_said_where_the_audio_goes_and_the_answer_after(tmp_path):
    """The decoder-only LM's text examples: `sample_parts` draws what `sample` draws, and the prompt is
    the chat template's text around the audio placeholder with what is said in its place."""
    from speechverse_jax import hf_tiny
    from speechverse_jax.data.tokenizer import load_tokenizer
    from speechverse_jax.demo.corpus import IC_LABELS, kws_vocabulary
    from speechverse_jax.demo.text_tasks import TextTasks
    from speechverse_jax.models.speechverse_decoder import AUDIO_PLACEHOLDER

    families = sentence_families(0)
    stream = TextTasks(families, kws_vocabulary(families), IC_LABELS)
    triples = stream.sample_parts(np.random.default_rng(3), 6)
    assert stream.sample(np.random.default_rng(3), 6) == [(f"{s} {i}", t) for s, i, t in triples]
    folder = hf_tiny.save_decoder_tokenizer(str(tmp_path / "tok"), recipe.tokenizer_texts(families)[:3000], 300,
                                            chat_template=hf_tiny.TINY_CHAT_TEMPLATE)
    tok = load_tokenizer(folder)
    prompts = recipe.LMPrompts(tok, max_input=64, max_target=4)
    said, instruction, target = triples[0]
    ids = prompts.prompt(said, instruction)
    text = tok.apply_chat_template([{"role": "user", "content": f"{AUDIO_PLACEHOLDER}\n{instruction}"}],
                                   tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == \
        text.replace(AUDIO_PLACEHOLDER, said).replace(" ", "")
    answer = prompts.answer("one two three four five six")
    assert len(answer) == 4 and answer[-1] == tok.eos_token_id  # cut to max_target, EOS kept


def test_copy_labels_examples_write_the_answer_words_among_corpus_words():
    from speechverse_jax.demo.corpus import IC_LABELS, answer_labels, answer_words, kws_vocabulary
    from speechverse_jax.demo.text_tasks import TextTasks

    words = answer_words()
    for spoken in ("american", "caribbean", "non-speech", "yes", "two"):
        assert spoken in words
    assert {"ac", "sns", "kws", "sc", "ic"} <= set(answer_labels())
    families = sentence_families(0)
    stream = TextTasks(families, kws_vocabulary(families), IC_LABELS, weights={"copy_labels": 1.0})
    triples = stream.sample_parts(np.random.default_rng(0), 200)
    seen = set()
    for said, instruction, target in triples:
        assert said == target and 2 <= len(target.split()) <= 8
        found = [w for w in target.split() if w in words]
        assert found  # one to three answer words, the rest from the corpus's train vocabulary
        seen.update(found)
    assert {"american", "british", "scottish", "caribbean", "speech", "non-speech"} <= seen


def test_collapsed_answer_pieces_are_those_whose_output_row_matches_another():
    """An answer piece whose output row points where another row points is counted and named;
    distinct rows are not (the release 4 LM had `american` and `caribbean` on one vector)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(shipped.__file__), "pretrained", "lm"))
    rows = np.random.default_rng(0).standard_normal((len(tok), 64)).astype(np.float32)
    assert recipe.collapsed_answer_pieces(rows, tok, "lm_")["lm_collapsed_answer_pieces"] == 0
    american, caribbean = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("american", "caribbean"))
    rows[caribbean] = 3.0 * rows[american]  # same direction, another length: still one choice
    out = recipe.collapsed_answer_pieces(rows, tok, "lm_")
    assert out["lm_collapsed_answer_pieces"] == 2
    assert sorted(out["lm_collapsed_answer_piece_names"]) == sorted(tok.convert_ids_to_tokens([american, caribbean]))


@pytest.mark.slow
@pytest.mark.xdist_group("quick_recipe")
def test_a_run_folder_refuses_another_recipe(quick_release):
    config, out, _ = quick_release
    other = configs.load("demo_backbones", "quick")
    other.wavlm.lr = 1e-3
    with pytest.raises(UserError, match="another recipe"):
        recipe.run_recipe(other, out, progress=False)
    with pytest.raises(UserError, match="--part"):
        recipe.run_recipe(config, out, progress=False, part="everything")


def test_gates_are_judged_against_the_config():
    gates = recipe.judge({"encoder_dev_cer": 2.5, "probe_accent": 90.0},
                         {"encoder_dev_cer": ("<=", 3.0), "probe_accent": (">=", 95.0)})
    assert gates["encoder_dev_cer"]["passed"] and not gates["probe_accent"]["passed"]
    with pytest.raises(KeyError, match="probe_voices"):
        recipe.judge({}, {"probe_voices": (">=", 95.0)})
    table = recipe.gate_table(gates)
    assert "FAILED" in table and "| encoder_dev_cer | 2.5 | <= 3 | ok |" in table


def test_greedy_ctc_decoding_and_its_character_error_rate():
    blank = 0
    path = [recipe.CTC_ALPHABET.index(c) + 1 for c in "hh"] + [blank] + [recipe.CTC_ALPHABET.index("i") + 1] * 3
    assert recipe.ctc_collapse(np.asarray(path)) == "hi"  # repeats merge, blanks drop
    a = recipe.CTC_ALPHABET.index("a") + 1
    assert recipe.ctc_collapse(np.asarray([a, blank, a])) == "aa"  # a blank separates a repeated letter
    assert recipe.ctc_cer(["play jazz", "hi"], ["Play jazz!", "hi"]) == 0.0  # case and punctuation dropped
    assert recipe.ctc_cer(["", ""], ["ab", "c"]) == 100.0  # all deleted
    assert recipe.ctc_cer(["play jazy"], ["play jazz"]) == round(100 / 9, 2)
