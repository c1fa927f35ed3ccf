"""The decoder-only layout end to end, picked by config alone (a `convert --llm` base): the data
pipeline's chat prompts, curriculum stages with the same rules and LoRA regex, frozen weights
bit-identical, resume, infer / eval with constrained and joint decoding, and layout refusals."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import check_stages_done, curriculum_argv  # noqa: E402
from speechverse_jax import checkpoints, hf_tiny, tree  # noqa: E402
from speechverse_jax.cli import main  # noqa: E402
from speechverse_jax.configs import common  # noqa: E402
from speechverse_jax.data import tasks as tasks_lib  # noqa: E402
from speechverse_jax.data.manifest import write_manifest  # noqa: E402
from speechverse_jax.errors import CheckpointMismatchError  # noqa: E402
from speechverse_jax.train import curriculum  # noqa: E402
from speechverse_jax.train.loop import build_setup, train  # noqa: E402

TEXTS = ["turn on the radio now", "what is the time in paris", "set an alarm for seven", "play some jazz music please"]
VOCAB = 192


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Converted decoder-only bases: 'llama' (tokenizer with a chat template), 'qwen2' (none: the plain prompt)."""
    from speechverse_jax.convert.pipeline_decoder import convert_decoder_checkpoints

    root = tmp_path_factory.mktemp("dec")
    wavlm = hf_tiny.save_wavlm(str(root / "wavlm"), family="large")
    corpus = TEXTS + [p for t in tasks_lib.TASK_NAMES for p in tasks_lib.get_task(t).prompts] + ["yes no one two"]
    out = {}
    for family, template in (("llama", hf_tiny.TINY_CHAT_TEMPLATE), ("qwen2", None)):
        lm = hf_tiny.save_decoder_lm(str(root / family), family, vocab_size=VOCAB)
        hf_tiny.save_decoder_tokenizer(lm, corpus, vocab_size=VOCAB, chat_template=template)
        out[family] = str(root / f"base_{family}")
        convert_decoder_checkpoints(wavlm, lm, out[family])
    return out


def _wavs(root, n, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"{i}.wav"
        sf.write(str(path), (rng.standard_normal(int(rng.uniform(0.3, 0.9) * 16000)) * 0.1).astype(np.float32), 16000)
        paths.append(path.name)
    return paths


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("decdata")
    paths = _wavs(root, 12, 1)
    rows = []
    for i, p in enumerate(paths):
        text, task = TEXTS[i % 4], ("asr", "kws", "sc")[i % 3]
        target = {"asr": text, "kws": ("yes", "no")[i % 2], "sc": ("one", "two")[i % 2]}[task]
        row = {"audio": p, "task": task, "target": target, "id": f"e{i}", "transcript": text}
        if task == "kws":
            row["keyword"] = text.split()[0]
        rows.append(row)
    write_manifest(str(root / "mixed.jsonl"), rows)
    write_manifest(str(root / "asr4.jsonl"), [dict(r, task="asr", target=r["transcript"]) for r in rows[:4]])
    return {"mixed": str(root / "mixed.jsonl"), "asr4": str(root / "asr4.jsonl")}


SMALL = dict(batch_size=4, audio_buckets_seconds=(1.0,), max_audio_seconds=1.0, instruction_buckets=(64, 128, 256),
             target_buckets=(32,), max_target_tokens=32, read_threads=0, worker_count=0)


def stage_config(base, stage, manifest, steps, **train_kw):
    config = common.stage_config(stage, max_steps=steps, lr=1e-2, warmup_steps=1, batch_size=4)
    config.base_checkpoint = base
    config.model.lora.rank = 0 if stage == "stage1" else 4
    config.model.lora.dropout = 0.0
    config.data.update(SMALL)
    config.data.train_manifests = manifest
    config.data.shuffle = False
    config.train.update(dict(log_every=1, eval_every=1000, checkpoint_every=2, tensorboard=False, log_mfu=False))
    config.train.update(train_kw)
    return config


def _flat(t):
    return {k: np.asarray(v) for k, v in tree.flatten(t).items()}


def test_pipeline_batches_carry_the_chat_prompt_around_the_audio(bases, manifests):
    from speechverse_jax.data.loader import ManifestData

    config = stage_config(bases["llama"], "stage1", manifests["asr4"], 1)
    data = curriculum.make_data(config)
    assert isinstance(data, ManifestData) and data.encoder.layout == "decoder"
    batch = next(data.train_iterator())
    tok = data.encoder.tokenizer
    user = tok.convert_tokens_to_ids("<|user|>")
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for r in range(4):
        pre = batch["prefix_ids"][r][batch["prefix_mask"][r]]
        suf = batch["instruction_ids"][r][batch["instruction_mask"][r]]
        tgt = batch["target_ids"][r][batch["target_mask"][r]]
        assert pre.tolist()[:2] == [tok.bos_token_id, user]  # chat template, BOS once, before the audio
        assert suf[-1] == assistant  # the generation prompt ends the part after the audio
        assert tgt[-1] == tok.eos_token_id and tok.bos_token_id not in tgt.tolist()
        assert tok.decode(tgt, skip_special_tokens=True) == batch["meta"]["targets"][r]
        for m in ("prefix_mask", "instruction_mask", "target_mask"):  # right padding
            assert batch[m][r].tolist() == sorted(batch[m][r].tolist(), reverse=True)
    # no chat template (Qwen2 tokenizer here): the plain template
    plain = curriculum.make_data(stage_config(bases["qwen2"], "stage1", manifests["asr4"], 1))
    b = next(plain.train_iterator())
    text = plain.encoder.tokenizer.decode(b["prefix_ids"][0][b["prefix_mask"][0]], skip_special_tokens=True)
    assert text.strip() == "USER:"


@pytest.mark.slow
def test_stages_train_the_rules_set_only_loss_falls_and_resume(bases, manifests, tmp_path, capsys):
    base = bases["llama"]
    s1 = stage_config(base, "stage1", manifests["asr4"], 16)
    out1 = train(s1, str(tmp_path / "stage1"), curriculum.make_data(s1), progress=False)
    setup = out1["setup"]
    assert type(setup.model).__name__ == "SpeechVerseDecoder"
    trainable = _flat(out1["state"].params)
    assert trainable and all(k.startswith(("downsampler/", "layer_weights/")) for k in trainable)
    # frozen WavLM and LLM: bit-identical to the base checkpoint after training
    base_params = _flat(checkpoints.load_base_params(base))
    frozen = _flat(setup.frozen)
    assert set(frozen) == set(base_params)
    for k in base_params:
        np.testing.assert_array_equal(frozen[k], base_params[k], err_msg=k)
    # the overfit batch (4 examples, no shuffling: the same batch every step): the loss falls
    rows = [json.loads(line) for line in open(tmp_path / "stage1" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 16 and np.mean(losses[-3:]) < 0.88 * np.mean(losses[:3]), losses
    assert "model_tflops_per_s" not in rows[-1]  # FLOPs are modelled for the T5 layout only

    # stage 2: LoRA on the LLM's q and v through the same regex and rules, grafted with b = 0
    s2 = stage_config(base, "stage2_warmup", manifests["asr4"], 4, init_from=str(tmp_path / "stage1"))
    s2.train.max_steps = 2  # (the LR schedule of a 4-step run, stopped at 2: resumed below)
    out2 = train(s2, str(tmp_path / "stage2"), curriculum.make_data(s2), progress=False)
    p2 = _flat(out2["state"].params)
    lora = sorted(k for k in p2 if "/lora_" in k)
    assert lora and all(k.startswith("llm/") and "/self_attention/" in k for k in lora)
    assert {k.split("/")[-2] for k in lora} == {"q", "v"}
    assert not any("/lora_" in k for k in _flat(out2["setup"].frozen))
    for k in base_params:  # still bit-identical with LoRA on
        np.testing.assert_array_equal(np.asarray(_flat(out2["setup"].frozen)[k]), base_params[k], err_msg=k)
    assert tree.count(out2["state"].opt_state) <= 3 * tree.count(out2["state"].params)  # moments of trainables only

    # resume in the same folder: continues from step 2 to 4 and matches a straight 4-step run
    s2_more = stage_config(base, "stage2_warmup", manifests["asr4"], 4, init_from=str(tmp_path / "stage1"))
    capsys.readouterr()
    resumed = train(s2_more, str(tmp_path / "stage2"), curriculum.make_data(s2_more), progress=False)
    assert "resumed from" in capsys.readouterr().out and resumed["summary"]["steps"] == 4
    straight = train(s2_more, str(tmp_path / "straight"), curriculum.make_data(s2_more), progress=False)
    a, b = _flat(resumed["state"].params), _flat(straight["state"].params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_checkpoint_of_one_layout_is_refused_as_the_other(bases, tiny_base, manifests, tmp_path, capsys):
    from speechverse_jax.checkpoints import BaseCheckpointError

    with pytest.raises(BaseCheckpointError, match="decoder-only"):
        checkpoints.load_model_config(bases["llama"])  # the T5 loader on a `convert --llm` folder
    # model.layout says T5, the base holds a decoder-only LLM: the CLI names the field
    argv = ["train", "--config", "stage1", "--workdir", str(tmp_path / "w"), f"--config.base_checkpoint={bases['llama']}",
            f"--config.data.train_manifests={manifests['asr4']}", "--config.model.layout=t5"]
    assert main(argv) == 2
    assert "model.layout" in capsys.readouterr().err
    assert main(argv[:-1] + ["--config.model.layout=encoder"]) == 2
    assert "model.layout must be one of" in capsys.readouterr().err
    # a decoder-layout run as train.init_from of a T5 stage
    s1 = stage_config(bases["qwen2"], "stage1", manifests["asr4"], 1)
    train(s1, str(tmp_path / "dec1"), curriculum.make_data(s1), progress=False)
    t5_stage = stage_config(tiny_base, "stage2_warmup", manifests["asr4"], 1, init_from=str(tmp_path / "dec1"))
    with pytest.raises(CheckpointMismatchError, match="model.layout='decoder'"):
        build_setup(t5_stage, log_fn=lambda *a: None)


@pytest.mark.slow
def test_curriculum_then_eval_and_infer_on_the_decoder_layout(bases, manifests, tmp_path, capsys):
    base, manifest = bases["qwen2"], manifests["mixed"]
    workdir = str(tmp_path / "run")
    assert main(curriculum_argv(base, manifest, workdir)) == 0
    check_stages_done(workdir)
    run = os.path.join(workdir, "stage2_multitask")

    out = str(tmp_path / "eval")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", run, "--manifest", manifest, "--out", out, "--constrained", "both",
                 "--max-new-tokens", "6", "--batch-size", "4", "--beams", "2"]) == 0
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    metrics = json.load(open(os.path.join(out, "metrics.json")))["metrics"]
    assert set(metrics["sc"]) == {"seen/free/beam2", "seen/constrained/beam2"}
    assert "wer" in metrics["asr"]["seen/free/beam2"]
    constrained = [p for p in preds if "/constrained" in p["setting"]]
    assert constrained
    for p in constrained:
        assert p["hypothesis"] in {"sc": ("one", "two"), "kws": ("yes", "no")}[p["task"]], p
    # joint decoding (greedy): the same task registry and formats as T5
    assert main(["eval", "--checkpoint", run, "--manifest", manifest, "--out", str(tmp_path / "joint"), "--joint",
                 "--tasks", "sc", "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    joint = [json.loads(line) for line in open(tmp_path / "joint" / "predictions.jsonl")]
    assert joint and all(p["reference"].startswith("ASR:") for p in joint)

    wav = os.path.join(os.path.dirname(manifest), "0.wav")
    capsys.readouterr()
    for beams in ("1", "3"):
        assert main(["infer", "--checkpoint", run, "--audio", wav, wav, "--instruction", "How many speakers?",
                     "--labels", "one,two", "--beams", beams, "--max-new-tokens", "4", "--json"]) == 0
        answers = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
        assert len(answers) == 2 and set(answers) <= {"one", "two"}, answers
