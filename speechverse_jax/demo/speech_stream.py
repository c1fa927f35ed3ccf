"""The speech the demo encoder is pretrained on: espeak-ng clips made on the fly, far broader than the corpus.

    stream = SpeechStream(sentence_families(seed), config.wavlm.data, seed)
    clips = stream.block(j)           # block j: a list of `Clip`s, a pure function of (seed, j)

What a clip can be (weights in the recipe config, `wavlm.data.kinds`):
    sentence      one train sentence of any family (statements, commands, questions), one voice
    word_salad    2-12 random words of the vocabulary: word orders no template makes
    shuffled      a train sentence with its words shuffled
    two_voices    two short sentences, each by another voice (a male and a female variant, pitches
                  apart): the clip the corpus's speaker-count task asks about
    one_voice_two two short sentences by the same voice (so length alone does not tell the count)
    overlap       WavLM's utterance mixing: a sentence with a quieter second utterance by another
                  voice laid over part of it; the transcript is the louder one's
    noise         non-speech (coloured noise, tones, beeps, chirps, hum, near-silence)

Voices: every espeak-ng English accent and voice variant, speed, pitch, word gap and loudness far
beyond the corpus's ranges, optional additive noise. Dev and test sentences of the split never
occur (word salads that happen to equal one are drawn again).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from speechverse_jax.data.audio import SAMPLE_RATE
from speechverse_jax.demo import speak

NOISE_KINDS = ("white", "pink", "brown", "tone", "beeps", "chirp", "hum", "silence")
VOICE_COUNT_IGNORE = -1  # overlap clips: no voice-count label


@dataclasses.dataclass
class Clip:
    """One rendered clip and what is true about it."""

    audio: np.ndarray  # [samples] float32, 16 kHz
    text: str  # what the CTC head must write ('' for non-speech)
    accent: int  # index into the accent list, -1 when none (non-speech, several accents)
    voices: int  # 0 (non-speech), 1 or 2; VOICE_COUNT_IGNORE for overlap clips
    kind: str


def _seed_seq(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]))


class SpeechStream:
    """Clips for encoder pretraining; block `j` is a pure function of (seed, j), so a resumed run
    sees exactly the clips an uninterrupted one would."""

    def __init__(self, families: Mapping[str, Mapping[str, Sequence[Any]]], data: Mapping[str, Any], seed: int):
        self.data = data
        self.seed = int(seed)
        self.sentences = sorted({s.text for fam in families.values() for s in fam["train"]})
        self.short = [t for t in self.sentences if len(t.split()) <= 5]
        self.held_out = {s.text for fam in families.values() for sp in ("dev", "test") for s in fam[sp]}
        self.vocabulary = sorted({w for t in self.sentences for w in t.split()})
        self.accents = list(data["accents"])  # the accents voices are drawn from
        self.label_accents = list(data.get("label_accents") or self.accents)  # the accent head's classes
        self.male, self.female = list(data["male_variants"]), list(data["female_variants"])
        kinds = dict(data["kinds"])
        self.kinds = sorted(kinds)
        p = np.asarray([kinds[k] for k in self.kinds], float)
        self.kind_p = p / p.sum()
        self.max_samples = int(float(data["max_seconds"]) * SAMPLE_RATE)
        self.failures: List[str] = []  # clips that could not be made (another is drawn in their place)
        # the first `narrow_blocks` blocks come from a narrower stream (`data.narrow` overrides): CTC
        # from scratch on the broad mix alone stayed on its plateau (data.narrow in the recipe config)
        narrow = data.get("narrow")
        self.narrow_blocks = int(data.get("narrow_blocks", 0)) if narrow else 0
        self.narrow_stream = SpeechStream(
            families, {**data, **narrow, "narrow": None, "label_accents": self.label_accents}, seed) if self.narrow_blocks else None

    # -- drawing -----------------------------------------------------------------------------

    def _voice(self, rng, accent: Optional[str] = None, gender: Optional[str] = None,
               pitch: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        d = self.data
        accent = accent or self.accents[int(rng.integers(len(self.accents)))]
        gender = gender or ("m" if rng.random() < 0.5 else "f")
        pool = self.male if gender == "m" else self.female
        lo, hi = pitch or tuple(d["pitch"])
        return {"voice": f"{accent}+{pool[int(rng.integers(len(pool)))]}", "accent": accent,
                "speed": int(rng.integers(d["speed"][0], d["speed"][1] + 1)),
                "pitch": int(rng.integers(lo, hi + 1)), "gap": int(rng.integers(0, int(d["max_word_gap"]) + 1))}

    def _text(self, rng, kind: str, short: bool = False) -> str:
        if kind == "word_salad":
            while True:
                n = int(rng.integers(2, 7 if short else 13))
                text = " ".join(self.vocabulary[int(i)] for i in rng.integers(len(self.vocabulary), size=n))
                if text not in self.held_out:
                    return text
        pool = self.short if short else self.sentences
        text = pool[int(rng.integers(len(pool)))]
        if kind == "shuffled":
            words = text.split()
            while True:
                text = " ".join(words[int(i)] for i in rng.permutation(len(words)))
                if text not in self.held_out or len(words) < 2:
                    return text
        return text

    def spec(self, rng: np.random.Generator) -> Dict[str, Any]:
        """One clip spec (plain data; `render_clip` turns it into audio)."""
        d = self.data
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        spec: Dict[str, Any] = {"kind": kind, "seed": int(rng.integers(2 ** 31)),
                                "gain": float(rng.uniform(*d["gain"])), "pause": float(rng.uniform(0.15, 0.6))}
        if kind == "noise":
            spec.update(noise=NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))], seconds=float(rng.uniform(0.8, 4.5)))
            return spec
        if kind in ("two_voices", "one_voice_two"):
            first = self._voice(rng)
            if kind == "two_voices":  # a male and a female variant, pitches apart, one accent (as the corpus's SC)
                low, high = self._voice(rng, first["accent"], "m", (0, 45)), self._voice(rng, first["accent"], "f", (50, 99))
                voices = [low, high] if rng.random() < 0.5 else [high, low]
            else:
                voices = [first, first]
            spec["parts"] = [dict(text=self._text(rng, "sentence" if rng.random() < 0.7 else "word_salad", short=True),
                                  **v) for v in voices]
        else:
            text_kind = kind if kind in ("word_salad", "shuffled") else "sentence"
            spec["parts"] = [dict(text=self._text(rng, text_kind), **self._voice(rng))]
            if kind == "overlap":
                other = self._voice(rng, gender="f" if spec["parts"][0]["voice"].split("+")[1] in self.male else "m")
                spec["overlay"] = dict(text=self._text(rng, "sentence", short=True), **other,
                                       db=float(rng.uniform(*d["overlap_db"])), start=float(rng.uniform(0, 0.6)))
        if rng.random() < float(d["noise_prob"]):
            spec["snr_db"] = float(rng.uniform(*d["snr_db"]))
        return spec

    def block(self, j: int) -> List[Clip]:
        """Block `j`: `data.block_size` clips (the trainer sorts a block by length into batches)."""
        if j < self.narrow_blocks:
            return self.narrow_stream.block(j)
        rng = _seed_seq(self.seed, 0x5EEC, j)
        clips = []
        while len(clips) < int(self.data["block_size"]):
            spec = self.spec(rng)
            try:
                clips.append(self.render(spec))
            except Exception as e:  # noqa: BLE001 - one clip espeak-ng cannot make: counted, another is drawn
                self.failures.append(f"block {j}: {type(e).__name__}: {e}"[:300])
                if len(self.failures) > 1000 + 0.05 * (j + 1) * len(clips or [0]):
                    raise RuntimeError(f"the speech stream fails too often; last: {self.failures[-1]}") from e
        return clips

    # -- rendering ---------------------------------------------------------------------------

    def render(self, spec: Dict[str, Any]) -> Clip:
        """A spec -> Clip. Speech longer than `max_seconds` is spoken again faster until it fits."""
        rng = np.random.default_rng(spec["seed"])
        if "noise" in spec:
            x = speak.synth_noise(spec["noise"], spec["seconds"], rng)
            x = x * (spec["gain"] if spec["noise"] != "silence" else 1.0)
            return Clip(np.clip(x, -1, 1).astype(np.float32), "", -1, 0, spec["kind"])
        parts = [dict(p) for p in spec["parts"]]
        for _ in range(6):
            x = self._speak_parts(parts, spec["pause"])
            overlay = None
            if "overlay" in spec:
                overlay = speak.trim(self._say(spec["overlay"]))
            if x.size <= self.max_samples:
                break
            for p in parts:
                p["speed"] = int(min(300, p["speed"] * 1.1 * x.size / self.max_samples))
        x = x[: self.max_samples]
        x = x / (np.abs(x).max() + 1e-9)
        if overlay is not None:
            overlay = overlay / (np.abs(overlay).max() + 1e-9) * 10 ** (-spec["overlay"]["db"] / 20)
            start = int(spec["overlay"]["start"] * x.size)
            n = min(overlay.size, x.size - start)
            x = x.copy()
            x[start:start + n] += overlay[:n]
            x = x / max(1.0, float(np.abs(x).max()))
        x = x * spec["gain"]
        if spec.get("snr_db") is not None:
            noise = speak.synth_noise(("white", "pink", "brown")[int(rng.integers(3))], x.size / SAMPLE_RATE + 0.01, rng)
            noise = np.pad(noise, (0, max(0, x.size - noise.size)))[: x.size]
            x = x + noise * np.sqrt(np.mean(x ** 2) / (np.mean(noise ** 2) + 1e-12) / 10 ** (spec["snr_db"] / 10))
        accents = {p["accent"] for p in parts}
        accent = self.label_accents.index(parts[0]["accent"]) if len(accents) == 1 and "overlay" not in spec else -1
        voices = VOICE_COUNT_IGNORE if "overlay" in spec else len({(p["voice"], p["pitch"]) for p in parts})
        return Clip(np.clip(x, -1, 1).astype(np.float32), " ".join(p["text"] for p in parts), accent, voices,
                    spec["kind"])

    @staticmethod
    def _say(part: Mapping[str, Any]) -> np.ndarray:
        return speak.espeak(part["text"], part["voice"], part["speed"], part["pitch"], part["gap"])

    def _speak_parts(self, parts: Sequence[Mapping[str, Any]], pause: float) -> np.ndarray:
        pieces = []
        for i, p in enumerate(parts):
            if i:
                pieces.append(np.zeros(int(pause * SAMPLE_RATE), np.float32))
            pieces.append(speak.trim(self._say(p)))
        return np.concatenate(pieces)


def batches_of_block(clips: Sequence[Clip], batch_size: int, edges_samples: Sequence[int],
                     rng: np.random.Generator) -> List[List[int]]:
    """Indices of `clips` cut into batches of similar length (sorted by length, then the batch order
    shuffled): each batch is padded to the smallest edge holding its longest clip."""
    order = np.argsort([c.audio.size for c in clips], kind="stable")
    groups = [list(map(int, order[i:i + batch_size])) for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [groups[int(i)] for i in rng.permutation(len(groups))]


def pad_edge(n: int, edges_samples: Sequence[int]) -> int:
    return next((e for e in edges_samples if n <= e), edges_samples[-1])
