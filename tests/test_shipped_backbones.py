"""The demo's shipped backbones (demo/shipped.py): the manifest, its checksums, the corpus they held out,
their conversion with --verify (reused when unchanged), and the real packaged release when present."""

import json
import os
import shutil
import sys
import types

import pytest
import sentencepiece

from speechverse_jax import configs
from speechverse_jax.cli import main
from speechverse_jax.configs.demo import CORPUS_SIZES
from speechverse_jax.convert import pipeline
from speechverse_jax.demo import run as demo_run
from speechverse_jax.demo import shipped
from speechverse_jax.demo.corpus import held_out_fingerprint, sentence_families
from speechverse_jax.errors import UserError


@pytest.fixture
def release(fake_release, tmp_path):
    """A private copy of the session's fake release (tests change files in it)."""
    return shutil.copytree(fake_release, str(tmp_path / "release"))


def test_manifest_lists_every_file_with_its_sha256(release):
    manifest = shipped.verify_checksums(release)
    files = manifest["files"]
    assert set(shipped.REQUIRED_FILES) <= set(files)
    assert "MANIFEST.json" not in files and "t5/tokenizer_config.json" in files
    assert sorted(files) == shipped.list_files(release)
    assert files["wavlm/model.safetensors"] == shipped.sha256_file(os.path.join(release, "wavlm/model.safetensors"))
    assert manifest["format"] == 1 and manifest["profile"] == "quick"
    assert manifest["gates"] == {"wavlm_dev_cer": {"value": 97.5, "threshold": 100.0, "op": "<=", "passed": True}}
    assert manifest["held_out"] == {"seed": 0, "fingerprint": held_out_fingerprint(0)}
    assert manifest["machine"]["cpu_count"] == os.cpu_count()
    commit = manifest["commit"]
    sha = commit.removesuffix("+dirty")  # a release made by uncommitted code says so
    assert commit == "unknown" or (len(sha) == 40 and int(sha, 16) >= 0)


def test_a_changed_byte_is_named(release):
    path = os.path.join(release, "wavlm", "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match=r"wavlm/model\.safetensors: sha256 .* differs from MANIFEST\.json"):
        shipped.verify_checksums(release)


def test_a_missing_file_is_named(release):
    os.remove(os.path.join(release, "t5", "spiece.model"))
    with pytest.raises(UserError, match=r"t5/spiece\.model: missing \(listed in MANIFEST\.json\)"):
        shipped.verify_checksums(release)


def test_an_extra_file_is_named(release):
    os.makedirs(os.path.join(release, "wavlm", "extra"))
    open(os.path.join(release, "wavlm", "extra", "notes.txt"), "w").write("added later")
    with pytest.raises(UserError, match=r"wavlm/extra/notes\.txt: not listed in MANIFEST\.json"):
        shipped.verify_checksums(release)


def test_a_missing_or_malformed_manifest_is_named(release, tmp_path):
    path = os.path.join(release, "MANIFEST.json")
    good = open(path).read()
    open(path, "w").write(good[:-20])
    with pytest.raises(UserError, match=r"MANIFEST\.json: not valid JSON"):
        shipped.verify_checksums(release)
    manifest = json.loads(good)
    del manifest["held_out"]
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(UserError, match=r"MANIFEST\.json: missing keys \['held_out'\]"):
        shipped.read_manifest(release)
    manifest = dict(json.loads(good), files={"../outside": "0" * 64})
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(UserError, match="outside the folder"):
        shipped.read_manifest(release)
    os.remove(path)
    with pytest.raises(UserError, match=r"MANIFEST\.json: missing"):
        shipped.verify_checksums(release)
    with pytest.raises(UserError, match=r"MANIFEST\.json: missing"):
        shipped.read_manifest(str(tmp_path / "nowhere"))


def test_write_manifest_checks_gates_and_layout(release):
    recipe, held = {"seed": 0}, {"seed": 0, "fingerprint": "f"}
    with pytest.raises(ValueError, match="op must be one of"):
        shipped.write_manifest(release, recipe, "quick", {"cer": {"value": 1, "threshold": 2, "op": "<"}}, held, 1)
    with pytest.raises(ValueError, match="passed=True but 3.0 <= 2.0 is False"):
        shipped.write_manifest(release, recipe, "quick",
                               {"cer": {"value": 3, "threshold": 2, "op": "<=", "passed": True}}, held, 1)
    gates = shipped.write_manifest(release, recipe, "quick", {"acc": {"value": 0.4, "threshold": 0.5, "op": ">="}},
                                   held, 1)["gates"]
    assert gates["acc"]["passed"] is False  # recorded as it is; the release decides what a failed gate means
    os.remove(os.path.join(release, "t5", "config.json"))
    with pytest.raises(ValueError, match=r"missing \['t5/config.json'\]"):
        shipped.write_manifest(release, recipe, "quick", {}, held, 1)


def test_the_fingerprint_names_the_held_out_sentences_of_every_corpus_size():
    from speechverse_jax.demo.corpus import held_out_sentences, plan_corpus

    families = sentence_families(0)
    held = set(held_out_sentences(0))
    for family in families.values():
        assert not held & {s.text for s in family["train"]}
    # corpora of either profile (same seed) evaluate on sentences the split held out, train on none of them
    for sizes in (CORPUS_SIZES["quick"], CORPUS_SIZES["full"]):
        plan = plan_corpus(sizes, 0)
        spoken = {sp: {row["transcript"] for row, _ in plan[sp] if row.get("transcript") and row["task"] != "sc"}
                  for sp in ("train", "dev", "test")}
        assert spoken["dev"] | spoken["test"] <= held and not spoken["train"] & held
    assert held_out_fingerprint(0) == held_out_fingerprint(0) != held_out_fingerprint(1)


def test_backbones_of_another_corpus_are_refused(release):
    manifest = shipped.verify_checksums(release)
    shipped.check_corpus_compatible(manifest, 0)
    with pytest.raises(UserError, match=r"seed 0, not those of this corpus \(seed 3\).*--pretrain-backbones"):
        shipped.check_corpus_compatible(manifest, 3)
    other = dict(manifest, held_out={"seed": 0, "fingerprint": "0" * 64})
    with pytest.raises(UserError, match="held_out.fingerprint"):
        shipped.check_corpus_compatible(other, 0)


def test_convert_shipped_verifies_then_reuses(release, tmp_path, monkeypatch):
    calls = []
    real = pipeline.convert_checkpoints

    def spy(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "convert_checkpoints", spy)
    base = str(tmp_path / "out" / "base")
    first = shipped.convert_shipped(release, base, progress=False)
    assert len(calls) == 1 and calls[0][1] == {"verify": True, "overwrite": True}
    assert calls[0][0][:2] == (os.path.join(release, "wavlm"), os.path.join(release, "t5"))
    assert first["reused"] is False and first["base_dir"] == base
    assert 0 <= first["max_rel_diff_vs_hf"] <= 1e-4
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(release, "t5", "spiece.model"))
    assert first["tokenizer_pieces"] == spm.get_piece_size() > 30
    assert first["gates"]["wavlm_dev_cer"]["passed"] is True
    assert first["recipe"]["profile"] == "quick" and first["recipe"]["t5"]["vocab_size"] == 128
    assert first["manifest_sha256"] == shipped.manifest_sha256(release)
    assert os.path.isfile(os.path.join(base, "spiece.model"))  # the tokenizer travels with the base
    assert json.load(open(os.path.join(base, "verify_report.json")))["verify"]["passed"]
    mtime = os.path.getmtime(os.path.join(base, "model_config.json"))

    second = shipped.convert_shipped(release, base, progress=False)
    assert len(calls) == 1 and second["reused"] is True
    assert {k: v for k, v in second.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    assert os.path.getmtime(os.path.join(base, "model_config.json")) == mtime

    # another release (here: the same files, another recipe record) is converted again
    manifest = shipped.read_manifest(release)
    shipped.write_manifest(release, dict(manifest["recipe"], note="rebuilt"), "quick", manifest["gates"],
                           manifest["held_out"], 2.0)
    third = shipped.convert_shipped(release, base, progress=False)
    assert len(calls) == 2 and third["reused"] is False


def test_convert_shipped_refuses_a_failed_verification(release, tmp_path, monkeypatch):
    failed = {"verify": {"passed": False, "tolerance": 1e-4,
                         "results": [{"tensor": "t5.logits", "max_abs": 1.0, "max_rel": 0.5, "ok": False}]}}
    monkeypatch.setattr(pipeline, "convert_checkpoints", lambda *a, **kw: failed)
    base = str(tmp_path / "base")
    with pytest.raises(UserError, match="failed verification.*t5.logits"):
        shipped.convert_shipped(release, base, progress=False)
    assert not os.path.exists(base + shipped.CONVERTED_STAMP)


def test_pretrain_backbones_runs_the_recipe_and_converts_its_release(fake_release, tmp_path, monkeypatch):
    """`--pretrain-backbones`: the recipe (stubbed: it returns the fake release) gets the demo_backbones
    config of the demo's profile with the corpus's seed; its release is converted like the shipped one."""
    seen = []

    def run_recipe(config, out_dir, progress=True):
        seen.append((config.to_dict(), out_dir, progress))
        return {"release_dir": fake_release}

    monkeypatch.setitem(sys.modules, "speechverse_jax.demo.recipe", types.SimpleNamespace(run_recipe=run_recipe))
    config = configs.load("demo", "quick")
    config.backbones.pretrain = True
    config.backbones.dir = str(tmp_path / "never read")
    demo_run.check_backbones(config)  # nothing to check before the recipe has run
    report = demo_run.build_backbones(config, str(tmp_path / "backbones"), progress=False)
    expected = configs.load("demo_backbones", "quick")
    expected.split_seed = 0
    assert seen == [(expected.to_dict(), str(tmp_path / "backbones" / "recipe"), False)]
    assert report["origin"] == "pretrained here (--pretrain-backbones)" and report["source"] == fake_release
    assert report["base_dir"] == str(tmp_path / "backbones" / "base")
    assert os.path.isfile(os.path.join(report["base_dir"], "model_config.json"))


def test_the_cli_flags_reach_the_configs(tmp_path, monkeypatch, capsys):
    from speechverse_jax.cli import parse

    _, config, _, _ = parse(["demo", "--profile", "quick", "--pretrain-backbones", "--out", "x"])
    assert config.backbones.pretrain is True and config.profile == "quick" and config.out == "x"
    _, config, _, _ = parse(["demo-backbones", "--profile", "quick", "--out", str(tmp_path)])
    assert config.profile == "quick" and config.out == str(tmp_path)

    seen = []
    monkeypatch.setitem(sys.modules, "speechverse_jax.demo.recipe", types.SimpleNamespace(
        run_recipe=lambda config, out, progress=True, part="all": seen.append((config.profile, out, progress, part))
        or {"ok": 1}))
    assert main(["demo-backbones", "--profile", "quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
    assert main(["demo-backbones", "--profile", "quick", "--out", str(tmp_path), "--part", "wavlm"]) == 0
    assert seen == [("quick", str(tmp_path), False, "all"), ("quick", str(tmp_path), True, "wavlm")]


def test_a_bad_backbones_folder_fails_before_the_corpus(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--profile", "quick", "--out", str(out), f"--config.backbones.dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none' / 'MANIFEST.json'}: missing" in err
    assert not (out / "corpus").exists()


@pytest.fixture
def real_manifest():
    """The packaged release (speechverse_jax/demo/pretrained/): every file present and unchanged."""
    return shipped.verify_checksums(shipped.PRETRAINED_DIR)


def test_the_packaged_release_is_intact_and_made_by_todays_recipe(real_manifest):
    manifest = real_manifest
    from speechverse_jax.demo.recipe import recipe_dict

    assert manifest["recipe"] == recipe_dict(configs.load("demo_backbones", manifest["profile"]))
    assert manifest["gates"], "the release records its quality gates"
    for name, gate in manifest["gates"].items():
        assert set(gate) == {"value", "threshold", "op", "passed"}, name
    shipped.check_corpus_compatible(manifest, configs.load("demo", "full").seed)


def test_the_packaged_release_converts_like_downloaded_weights(real_manifest, tmp_path):
    report = shipped.convert_shipped(shipped.PRETRAINED_DIR, str(tmp_path / "base"), progress=False)
    assert report["max_rel_diff_vs_hf"] <= 1e-4 and report["manifest_sha256"] == shipped.manifest_sha256(
        shipped.PRETRAINED_DIR)
    size = sum(os.path.getsize(os.path.join(shipped.PRETRAINED_DIR, f)) for f in real_manifest["files"])
    assert size <= 40 * 2 ** 20  # the release stays small enough to ship in the repository
