"""The README's Python API example runs as written (paths pointed at a tiny converted model)."""

import os
import re

import numpy as np

from speechverse_jax.api import SpeechVerseModel
from speechverse_jax.models.config import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_block(tag):
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = re.findall(r"```python\n(# example: " + tag + r".*?)```", text, re.S)
    assert len(blocks) == 1, f"README must hold exactly one '# example: {tag}' block"
    return blocks[0]


def test_readme_api_example_runs(tiny_base, tmp_path, capsys):
    import soundfile as sf

    clip = tmp_path / "utt0.wav"
    sf.write(clip, (0.1 * np.sin(np.arange(12000) / 7.0)).astype(np.float32), 22050)  # resampled on load
    code = _readme_block("api").replace("outputs/demo/backbones/base", tiny_base).replace(
        "outputs/demo/corpus/audio/test/asr_00000.wav", str(clip))
    assert tiny_base in code and str(clip) in code
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"\(3, \d+, 64\)", out), out  # 2 layers + 1 hidden states of width 64
    assert re.search(r"\[\s*\d+\.\d+", out), out


def test_api_outputs_are_consistent(tiny_base):
    model = SpeechVerseModel.from_base(tiny_base, model=model_config(lora_rank=4))
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (9000, 5000)]
    states = model.encode(clips)
    alone = model.encode(clips[1:])
    np.testing.assert_allclose(states[1], alone[0], rtol=1e-4, atol=1e-5)
    texts = ["turn on the radio now", "set an alarm for seven"]
    nll = model.score(clips, ["transcribe the preceding audio"] * 2, texts)
    nll_alone = model.score(clips[1:], ["transcribe the preceding audio"], texts[1:])
    assert np.all(np.isfinite(nll)) and np.all(nll > 0)
    np.testing.assert_allclose(nll[1], nll_alone[0], rtol=1e-4)


def test_api_rejects_bad_input(tiny_base):
    import pytest

    model = SpeechVerseModel.from_base(tiny_base)
    with pytest.raises(ValueError, match="instruction\\[0\\] is empty"):
        model.score([np.zeros(4000, np.float32)], ["  "], ["x"])
    with pytest.raises(ValueError, match="audio\\[0\\]"):
        model.encode([np.zeros((2, 100), np.float32)])
    with pytest.raises(Exception, match="missing.wav"):
        model.encode(["missing.wav"])
