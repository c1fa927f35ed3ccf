"""`speechverse-jax demo`: the path a user takes with real weights, end to end on tiny models.

1. speak a few sentences with espeak-ng (real speech with known text; tones if it is missing),
2. train a sentencepiece tokenizer on the text, build tiny random HF WavLM and Flan-T5 backbones
   with transformers + torch and save them with `save_pretrained` (nothing can be downloaded),
3. `speechverse-jax convert --verify` them (the logit checker against HF PyTorch),
4. load the converted folder with the Python API and run the encoder and the whole model.

The backbones are random, so the scores say nothing about speech yet: training on this path is
the curriculum's job (`speechverse-jax curriculum`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np

SENTENCES = [
    "turn on the radio now",
    "what is the weather in paris tomorrow",
    "set an alarm for seven in the morning",
    "play some jazz music in the kitchen",
    "remind me to call my mother at noon",
    "how many minutes are in two hours",
]
INSTRUCTION = "Transcribe the preceding audio."


def speak(text: str, path: str, voice: str = "en-us", rate: int = 150) -> str:
    """espeak-ng -> 16 kHz mono wav; a sine-tone stand-in when espeak-ng is not installed."""
    import soundfile as sf

    from speechverse_jax.data.audio import load_audio

    if shutil.which("espeak-ng"):
        raw = path + ".22k.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        audio = load_audio(raw)
        os.remove(raw)
    else:
        t = np.arange(int(0.08 * 16000 * len(text.split()))) / 16000
        audio = (0.1 * np.sin(2 * np.pi * (200 + 10 * len(text)) * t)).astype(np.float32)
    sf.write(path, audio, 16000)
    return path


def run_demo(out_dir: str = "outputs/demo") -> dict:
    from speechverse_jax import hf_tiny
    from speechverse_jax.api import SpeechVerseModel
    from speechverse_jax.convert.pipeline import convert_checkpoints
    from speechverse_jax.models.config import model_config

    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    print(f"[1/4] speaking {len(SENTENCES)} sentences with "
          f"{'espeak-ng' if shutil.which('espeak-ng') else 'tones (espeak-ng not installed)'}")
    clips = [speak(s, os.path.join(audio_dir, f"utt{i}.wav")) for i, s in enumerate(SENTENCES)]

    print("[2/4] building tiny random HF backbones (WavLM large-style, Flan-T5-style) + tokenizer")
    hf_dir = os.path.join(out_dir, "hf")
    spm = hf_tiny.train_spiece(SENTENCES * 10 + [INSTRUCTION] * 10, os.path.join(hf_dir, "tokenizer"), vocab_size=96)
    wavlm_dir = hf_tiny.save_wavlm(os.path.join(hf_dir, "wavlm"), family="large")
    t5_dir = hf_tiny.save_t5(os.path.join(hf_dir, "t5"), flan=True, spiece_model=spm)

    print("[3/4] speechverse-jax convert --verify")
    base_dir = os.path.join(out_dir, "base")
    report = convert_checkpoints(wavlm_dir, t5_dir, base_dir, verify=True, overwrite=True,
                                 report_path=os.path.join(out_dir, "verify_report.json"))
    if not report["verify"]["passed"]:
        raise SystemExit("conversion did not match the HF PyTorch reference; see verify_report.json")

    print("[4/4] loading through the Python API; encoder and whole model on the spoken clips")
    model = SpeechVerseModel.from_base(base_dir, model=model_config(lora_rank=4))
    states = model.encode(clips)
    nll = model.score(clips, [INSTRUCTION] * len(clips), SENTENCES)
    rows = []
    print(f"{'clip':10s} {'seconds':>7s} {'wavlm states':>18s} {'target NLL/token':>17s}  text")
    for clip, text, st, loss in zip(clips, SENTENCES, states, nll):
        n_tok = len(model.text.encode([text])[0])
        secs = os.path.getsize(clip) / 32000
        rows.append({"audio": clip, "text": text, "hidden_states_shape": list(st.shape), "nll_per_token": loss / n_tok})
        print(f"{os.path.basename(clip):10s} {secs:7.2f} {str(tuple(st.shape)):>18s} {loss / n_tok:17.3f}  {text}")
    summary = {"out_dir": out_dir, "base_checkpoint": base_dir, "verify": report["verify"]["passed"],
               "max_rel_diff": max(r["max_rel"] for r in report["verify"]["results"]),
               "clips": rows, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"random backbones: a NLL near log(vocab)={np.log(model.cfg.t5.vocab_size):.2f} is expected before training.")
    print(f"done in {summary['seconds']}s; everything is in {out_dir}")
    return summary
