"""A spoken multi-task demo corpus made with espeak-ng; every label is true by construction.

    make_corpus(out_dir, sizes, seed=0, workers=2, progress=True) -> summary dict   # sizes: {split: {task: n}}

writes, under `out_dir`:
    train.jsonl, dev.jsonl, test.jsonl   one manifest per split with all tasks (our manifest format)
    by_task/<split>.<task>.jsonl         the same rows, one manifest per split and task
    audio/<split>/<task>_<n>.wav         16 kHz mono 16-bit clips
    corpus.json                          the summary (counts, seconds, label sets, baselines, ...)
    robust_voices.jsonl, robust_order.jsonl   with `robust_sizes`: test sentences in voices beyond the
                                         corpus's ranges, and in word orders no template makes

Sentences come from templates x slot values. Whole sentences are held out: a dev or test
sentence is never spoken in train (for any task). Tasks: asr, ic, sf, kws, kwe, ac, sc, sns, open.
Voices (espeak-ng variants m1-m7 and f1-f5, speed, pitch, word gap, loudness) vary in every task;
AC keeps the accent as its label, SC the number of voices.

`corpus_texts(out_dir)` gives the training texts (transcripts, targets, instructions) for a
tokenizer or text pretraining; `baselines(out_dir)` the majority / chance scores on test.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from speechverse_jax.data import tasks
from speechverse_jax.data.manifest import write_manifest
from speechverse_jax.data.prepare.common import content_words, rng_for, words
from speechverse_jax.demo import speak

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
DEMO_TASKS = ("asr", "ic", "sf", "kws", "kwe", "ac", "sc", "sns", "open")



def check_sizes(sizes: Mapping[str, Mapping[str, int]]) -> Dict[str, Dict[str, int]]:
    """`corpus.sizes` of the demo config ({split: {task: examples}}) as plain dicts, checked."""
    out = {}
    for sp in SPLITS:
        if sp not in sizes:
            raise ValueError(f"corpus.sizes: no entry for split {sp!r} (splits: {SPLITS})")
        missing = [t for t in DEMO_TASKS if t not in sizes[sp]]
        if missing:
            raise ValueError(f"corpus.sizes.{sp}: no count for tasks {missing}")
        out[sp] = {t: int(sizes[sp][t]) for t in DEMO_TASKS}
        bad = [t for t, n in out[sp].items() if n < 1]
        if bad:
            raise ValueError(f"corpus.sizes.{sp}: counts must be >= 1, got {bad}")
    return out


ESPEAK_RATE = 22050
KWS_POSITIVE_SHARE = 0.7
OPEN_INSTRUCTIONS_NOTE = "open: no `instruction` field; the pipeline draws the registry's open prompts"

# --------------------------------------------------------------------------------------------
# Slot values
# --------------------------------------------------------------------------------------------

NAMES = ("anna", "peter", "maria", "david", "sarah", "james", "linda", "thomas", "emma", "daniel")
CITIES = ("london", "paris", "berlin", "tokyo", "madrid", "boston", "chicago", "sydney", "rome", "dublin")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
ROOMS = ("kitchen", "bedroom", "garden", "office", "garage", "hallway", "bathroom")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "purple", "orange")
ANIMALS = ("cat", "dog", "horse", "bird", "rabbit", "mouse", "duck", "cow")
FOODS = ("bread", "pizza", "soup", "coffee", "tea", "apples", "rice", "cheese", "pasta", "cake")
THINGS = ("cup", "book", "bag", "chair", "pen", "box", "hat", "shirt", "lamp", "jacket")
OPENABLE = ("door", "window", "curtains", "drawer", "gate", "cupboard")
RELATIVES = ("mother", "father", "sister", "brother", "friend", "uncle", "aunt", "neighbor")
ADJECTIVES = ("big", "small", "old", "young", "happy", "quiet", "hungry", "tired", "lazy", "clever")
MEALS = ("breakfast", "lunch", "dinner")
GAMES = ("chess", "football", "tennis", "cards", "golf")
PLACES = ("station", "school", "bank", "library", "park", "market", "hospital", "museum")
WEATHER = ("hot", "cold", "windy", "sunny", "rainy", "cloudy", "warm", "foggy")
TOPICS = ("history", "music", "science", "space", "cooking", "art", "nature", "travel")
VEHICLES = ("train", "bus", "boat", "plane")
GENRES = ("jazz", "rock", "pop", "classical", "blues", "country")
STATIONS = ("capital", "heart", "classic", "smooth", "magic", "planet")
TIMES = ("six o'clock", "seven thirty", "half past eight", "noon", "midnight", "ten fifteen",
         "nine in the morning", "five in the evening", "quarter to four", "eleven forty five",
         "three o'clock", "six thirty")
# (spoken, slot value): "on monday" fills the date slot with "monday".
DATES = (("today", "today"), ("tomorrow", "tomorrow"), ("tonight", "tonight"),
         ("this weekend", "this weekend"), ("next week", "next week")) + tuple((f"on {d}", d) for d in WEEKDAYS)

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
NUMBERS += [f"twenty {n}" for n in NUMBERS[1:10]] + ["thirty"]

# --------------------------------------------------------------------------------------------
# Templates -> sentences
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One spoken sentence and what is true about it by construction."""

    text: str
    group: str  # the template (or question type) it came from
    slots: Tuple[Tuple[str, str], ...] = ()  # SF slots in order of appearance
    keywords: Tuple[str, ...] = ()  # KWE keywords in order of appearance
    intent: str = ""
    answer: str = ""  # open questions

    @property
    def n_words(self) -> int:
        return len(self.text.split())


def _value(v) -> Tuple[str, str]:
    return (v, v) if isinstance(v, str) else (str(v[0]), str(v[1]))


def expand(template: str, values: Mapping[str, Sequence], keywords: Sequence[str] = (),
           slots: Sequence[str] = (), intent: str = "", group: str = "") -> List[Sentence]:
    """Every filling of `template` ('{name}' placeholders, values from `values`).

    `keywords`/`slots` name the placeholders whose values are KWE keywords / SF slots; a
    placeholder named `x2` is another value of `x` (never the same value) and the slot `x`.
    """
    names = re.findall(r"\{(\w+)\}", template)
    pools = [[_value(v) for v in values[n]] for n in names]
    out = []
    for combo in itertools.product(*pools):
        filled = dict(zip(names, combo))
        if any(n.endswith("2") and n[:-1] in filled and filled[n] == filled[n[:-1]] for n in names):
            continue
        text = template.format(**{n: s for n, (s, _) in filled.items()})
        out.append(Sentence(
            text=" ".join(text.split()), group=group or template,
            slots=tuple((n.rstrip("2"), filled[n][1]) for n in names if n.rstrip("2") in slots),
            keywords=tuple(filled[n][1] for n in names if n.rstrip("2") in keywords),
            intent=intent))
    return out


_V = dict(person=NAMES, person2=NAMES, city=CITIES, day=WEEKDAYS, room=ROOMS, color=COLORS, animal=ANIMALS,
          food=FOODS, food2=FOODS, thing=THINGS, openable=OPENABLE, relative=RELATIVES, adj=ADJECTIVES,
          meal=MEALS, game=GAMES, place=PLACES, weather=WEATHER, topic=TOPICS, vehicle=VEHICLES,
          verb=("open", "close"), genre=GENRES, station=STATIONS, time=TIMES, date=DATES, place_name=CITIES)

# (template, keyword placeholders): statements, questions and commands for ASR, KWS, KWE, AC, SC, SNS.
ASR_TEMPLATES = (
    ("please {verb} the {openable} in the {room}", ("openable", "room")),
    ("the {adj} {animal} is sleeping in the {room}", ("animal", "room")),
    ("my {relative} likes {food} and {food2}", ("relative", "food")),
    ("where did {person} put the {color} {thing}", ("person", "color", "thing")),
    ("{person} is flying to {city} on {day}", ("person", "city", "day")),
    ("we need more {food} for {meal}", ("food", "meal")),
    ("the {color} car is parked near the {place}", ("color", "place")),
    ("do you want to play {game} after {meal}", ("game", "meal")),
    ("can you bring me the {color} {thing} from the {room}", ("color", "thing", "room")),
    ("it was very {weather} in {city} last {day}", ("weather", "city", "day")),
    ("i read a book about {topic} at the {place}", ("topic", "place")),
    ("the {vehicle} to {city} leaves at {time}", ("vehicle", "city")),
    ("the {animal} is {adj}", ("animal", "adj")),
    ("{person} likes {food}", ("person", "food")),
    ("my {relative} is {adj}", ("relative", "adj")),
    ("the {thing} is {color}", ("thing", "color")),
    ("{person} plays {game} on {day}", ("person", "game", "day")),
    ("is the {place} open on {day}", ("place", "day")),
)

SF_SLOT_NAMES = tuple(tasks.SF_SLOTS)  # time, date, place_name, person (the registry's 4-slot set)

# SLURP intent names (valid registry labels); the demo passes this 10-intent subset as `labels`.
COMMAND_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "alarm_set": ("set an alarm for {time}", "wake me up at {time} {date}", "i need an alarm at {time} {date}"),
    "calendar_set": ("add a meeting with {person} {date}", "remind me to visit {person} {date} at {time}",
                     "put lunch with {person} in my calendar {date}"),
    "datetime_query": ("what time is it in {place_name}", "tell me the time in {place_name} please",
                       "what is the date today", "what is the time right now", "which day is it today"),
    "email_sendemail": ("send an email to {person}", "email {person} about the meeting {date}",
                        "write an email to {person} and {person2}"),
    "iot_hue_lightoff": ("turn off the lights in the {room}", "switch the {room} lights off",
                         "turn the lights off at {time}"),
    "iot_hue_lighton": ("turn on the lights in the {room}", "switch the {room} lights on",
                        "turn the lights on at {time}"),
    "play_music": ("play some {genre} music", "play {genre} music in the {room}", "play {genre} music for {person}"),
    "play_radio": ("play the {station} radio station", "turn on the radio in the {room}",
                   "switch to the {station} radio station at {time}"),
    "transport_taxi": ("book a taxi to {place_name} at {time}", "order a taxi for {time} {date}",
                       "get me a cab to {place_name}"),
    "weather_query": ("what is the weather in {place_name} {date}", "will it rain in {place_name} {date}",
                      "is it going to be {weather} {date}"),
}
IC_LABELS: Dict[str, str] = {name: tasks.SLURP_INTENTS[name] for name in COMMAND_TEMPLATES}

# AC: the demo's four espeak-ng English accents (the registry has the paper's five).
AC_VOICES = {"american": "en-us", "british": "en-gb", "scottish": "en-gb-scotland", "caribbean": "en-029"}
AC_LABELS = {"american": "American English", "british": "British English", "scottish": "Scottish English",
             "caribbean": "Caribbean English"}
# Accents for the other tasks (weights), so no task keys on one accent.
OTHER_ACCENTS = (("en-us", 0.5), ("en-gb", 0.2), ("en-gb-x-rp", 0.1), ("en-gb-scotland", 0.1), ("en-029", 0.1))
MALE = tuple(f"m{i}" for i in range(1, 8))
FEMALE = tuple(f"f{i}" for i in range(1, 6))

NOISE_TYPES = ("white", "pink", "brown", "tone", "beeps", "chirp", "hum", "silence")

_OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("old", "new"),
              ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("early", "late"), ("left", "right"),
              ("wet", "dry"), ("open", "closed"))
_LEGS = (("cat", "four"), ("dog", "four"), ("horse", "four"), ("cow", "four"), ("mouse", "four"),
         ("bird", "two"), ("duck", "two"), ("spider", "eight"), ("fish", "zero"))
_SKY = (("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("the sun", "yellow"), ("coal", "black"),
        ("a banana", "yellow"), ("a tomato", "red"))


def asr_sentences() -> List[Sentence]:
    return [s for tpl, kw in ASR_TEMPLATES for s in expand(tpl, _V, keywords=kw)]


def command_sentences() -> List[Sentence]:
    return [s for intent, tpls in COMMAND_TEMPLATES.items() for tpl in tpls
            for s in expand(tpl, _V, slots=SF_SLOT_NAMES, intent=intent)]


def open_sentences() -> List[Sentence]:
    """Spoken questions with one known answer (arithmetic, counting, days, opposites, facts)."""
    n = NUMBERS
    qa = [("plus", f"what is {n[a]} plus {n[b]}", n[a + b]) for a in range(13) for b in range(13)]
    qa += [("minus", f"what is {n[a]} minus {n[b]}", n[a - b]) for a in range(1, 16) for b in range(a + 1)]
    qa += [("times", f"what is {n[a]} times {n[b]}", n[a * b]) for a in range(1, 6) for b in range(1, 6)]
    qa += [("after", f"what number comes after {n[i]}", n[i + 1]) for i in range(30)]
    qa += [("before", f"what number comes before {n[i]}", n[i - 1]) for i in range(1, 31)]
    qa += [("day", f"what day comes after {d}", WEEKDAYS[(i + 1) % 7]) for i, d in enumerate(WEEKDAYS)]
    qa += [("day", f"what day comes before {d}", WEEKDAYS[i - 1]) for i, d in enumerate(WEEKDAYS)]
    qa += [("opposite", f"what is the opposite of {a}", b) for x, y in _OPPOSITES for a, b in ((x, y), (y, x))]
    qa += [("legs", f"how many legs does a {a} have", k) for a, k in _LEGS]
    qa += [("color", f"what color is {a}", c) for a, c in _SKY]
    return [Sentence(text=q, group=g, answer=a) for g, q, a in qa]


# --------------------------------------------------------------------------------------------
# Held-out splits
# --------------------------------------------------------------------------------------------

# Share of each template's sentences held out for dev and for test, per family. Fixed (not
# derived from the corpus sizes), so every corpus of one seed holds out the same sentences and
# backbones pretrained on that seed's train sentences fit any corpus size of it.
HELD_OUT_SHARES = {"asr": (0.07, 0.11), "commands": (0.035, 0.055), "open": (0.12, 0.19)}


def split_sentences(sentences: Sequence[Sentence], shares: Tuple[float, float],
                    rng: np.random.Generator) -> Dict[str, List[Sentence]]:
    """Hold out whole sentences: each template (of 5 or more sentences) gives dev and test their
    share (`shares` = (dev, test)), train keeps the rest. Each split's list interleaves the
    templates and, for commands, the intents (cycling the smaller ones), so draws stay balanced."""
    groups: Dict[str, List[Sentence]] = collections.defaultdict(list)
    for s in sentences:
        groups[s.group].append(s)
    parts: Dict[str, Dict[str, List[List[Sentence]]]] = {sp: collections.defaultdict(list) for sp in SPLITS}
    for name in sorted(groups):
        items = [groups[name][i] for i in rng.permutation(len(groups[name]))]
        k_test = int(np.ceil(shares[1] * len(items))) if len(items) >= 5 else 0
        k_dev = int(np.ceil(shares[0] * len(items))) if len(items) >= 5 else 0
        stratum = items[0].intent or name
        parts["test"][stratum].append(items[:k_test])
        parts["dev"][stratum].append(items[k_test:k_test + k_dev])
        parts["train"][stratum].append(items[k_test + k_dev:])
    by_intent = any(s.intent for s in sentences)
    return {sp: _interleave([_interleave(parts[sp][k], rng) for k in sorted(parts[sp])], rng, cycle=by_intent)
            for sp in SPLITS}


def _interleave(lists: List[List[Sentence]], rng: np.random.Generator, cycle: bool = False) -> List[Sentence]:
    """Round-robin over the lists (in a random order). `cycle`: repeat the shorter lists until
    the longest is used up (equal shares throughout); else drop each list when it runs out."""
    lists = [lists[i] for i in rng.permutation(len(lists)) if lists[i]]
    longest = max((len(x) for x in lists), default=0)
    return [x[i % len(x)] for i in range(longest) for x in lists if cycle or i < len(x)]


class Pool:
    """Draws sentences of one split in order, cycling when it runs out."""

    def __init__(self, sentences: Sequence[Sentence]):
        if not sentences:
            raise ValueError("empty sentence pool")
        self.items, self.pos = list(sentences), 0

    def take(self, n: int, max_words: Optional[int] = None) -> List[Sentence]:
        items = [s for s in self.items if max_words is None or s.n_words <= max_words] or self.items
        out = [items[(self.pos + i) % len(items)] for i in range(n)]
        self.pos += n
        return out


# --------------------------------------------------------------------------------------------
# Voices and clip specs (plain dicts: planning is pure, rendering only reads them)
# --------------------------------------------------------------------------------------------

def draw_voice(rng: np.random.Generator, accent: Optional[str] = None, variants: Sequence[str] = MALE + FEMALE,
               pitch: Tuple[int, int] = (30, 70), speed: Tuple[int, int] = (120, 190)) -> Dict[str, Any]:
    if accent is None:
        names, weights = zip(*OTHER_ACCENTS)
        accent = names[int(rng.choice(len(names), p=np.asarray(weights) / sum(weights)))]
    return {"voice": f"{accent}+{variants[int(rng.integers(len(variants)))]}",
            "speed": int(rng.integers(speed[0], speed[1] + 1)), "pitch": int(rng.integers(pitch[0], pitch[1] + 1)),
            "gap": int(rng.integers(0, 3))}


def voice_name(v: Mapping[str, Any]) -> str:
    return f"{v['voice']} s{v['speed']} p{v['pitch']}"


# The robustness split's voices: espeak-ng variants the corpus never uses, speeds and pitches outside
# every corpus range (corpus speed 120-195, pitch 25-75). The backbones' pretraining heard such
# voices (demo_backbones: speed 80-260, pitch 0-99, every variant); the curriculum never does.
WIDE_MALE = ("m8", "klatt", "max", "robert", "Gene", "Lee", "edward")
WIDE_FEMALE = ("Alicia", "Andrea", "linda", "steph", "belinda", "aunty")
WIDE_SPEED = ((85, 110), (205, 250))
WIDE_PITCH = ((5, 20), (80, 95))


def draw_wide_voice(rng: np.random.Generator, accent: Optional[str] = None, variants: Sequence[str] = MALE + FEMALE,
                    pitch: Tuple[int, int] = (30, 70), speed: Tuple[int, int] = (120, 190)) -> Dict[str, Any]:
    """`draw_voice` moved outside the corpus's ranges: a male request gets a wide male variant and
    (with a low pitch request) the low pitch band, a female one the female variants and high band;
    a fast request (SC keeps two sentences short) the fast speed band."""
    male, female = set(variants) <= set(MALE), set(variants) <= set(FEMALE)
    wide = WIDE_MALE if male else WIDE_FEMALE if female else WIDE_MALE + WIDE_FEMALE
    v = draw_voice(rng, accent, wide)
    band = 0 if pitch[1] <= 50 else 1 if pitch[0] >= 50 else int(rng.integers(2))
    v["pitch"] = int(rng.integers(WIDE_PITCH[band][0], WIDE_PITCH[band][1] + 1))
    band = 1 if speed[0] >= 145 else int(rng.integers(2))
    v["speed"] = int(rng.integers(WIDE_SPEED[band][0], WIDE_SPEED[band][1] + 1))
    return v


def speech_spec(rng: np.random.Generator, parts: Sequence[Tuple[str, Mapping[str, Any]]],
                snr_db: Optional[float] = None) -> Dict[str, Any]:
    return {"parts": [{"text": t, **v} for t, v in parts], "pause": round(float(rng.uniform(0.2, 0.5)), 3),
            "gain": round(float(rng.uniform(0.3, 0.9)), 3), "snr_db": snr_db, "seed": int(rng.integers(2**31))}


def noise_spec(rng: np.random.Generator, kind: str) -> Dict[str, Any]:
    return {"noise": kind, "seconds": round(float(rng.uniform(1.0, 4.0)), 3),
            "gain": round(float(rng.uniform(0.1, 0.8)), 3), "seed": int(rng.integers(2**31))}


# --------------------------------------------------------------------------------------------
# Planning: (split, task) -> rows without audio + clip specs
# --------------------------------------------------------------------------------------------

def _speech_row(task: str, s: Sentence, target: Any, voice: Mapping[str, Any], **fields) -> Dict[str, Any]:
    return {"task": task, "target": target, "transcript": s.text, **fields, "voice": voice_name(voice)}


def plan_task(task: str, split: str, n: int, pools: Mapping[str, Pool], kws_vocab: Sequence[str],
              rng: np.random.Generator, draw_voice=draw_voice) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """`n` (row, spec) pairs of one task in one split. `draw_voice`: the corpus's voices, or
    `draw_wide_voice` for the robustness split."""
    out = []
    if task in ("asr", "kwe"):
        for s in pools["asr"].take(n):
            v = draw_voice(rng)
            target = s.text if task == "asr" else tasks.format_keywords(s.keywords)
            out.append((_speech_row(task, s, target, v), speech_spec(rng, [(s.text, v)])))
    elif task in ("ic", "sf"):
        for s in pools["commands"].take(n):
            v = draw_voice(rng)
            if task == "ic":
                row = _speech_row(task, s, s.intent, v, labels=IC_LABELS)
            else:
                row = _speech_row(task, s, tasks.format_slots(s.slots), v)
            out.append((row, speech_spec(rng, [(s.text, v)])))
    elif task == "kws":
        n_pos = int(round(KWS_POSITIVE_SHARE * n))
        positive = rng.permutation([True] * n_pos + [False] * (n - n_pos))
        for s, pos in zip(pools["asr"].take(n), positive):
            v = draw_voice(rng)
            keyword, answer = kws_pick(s.text, kws_vocab, bool(pos), rng)
            out.append((_speech_row(task, s, answer, v, keyword=keyword), speech_spec(rng, [(s.text, v)])))
    elif task == "ac":
        labels = list(AC_VOICES)
        classes = rng.permutation([labels[i % len(labels)] for i in range(n)])
        for s, label in zip(pools["asr"].take(n), classes):
            v = draw_voice(rng, accent=AC_VOICES[str(label)])
            out.append((_speech_row(task, s, str(label), v, labels=AC_LABELS), speech_spec(rng, [(s.text, v)])))
    elif task == "sc":
        two = rng.permutation([i % 2 == 1 for i in range(n)])
        for is_two in two:
            out.append(plan_sc(bool(is_two), pools["asr"], rng, draw_voice))
    elif task == "sns":
        speech = rng.permutation([i % 2 == 0 for i in range(n)])
        for k, is_speech in enumerate(speech):
            if is_speech:
                s = pools["asr"].take(1)[0]
                v = draw_voice(rng)
                snr = round(float(rng.uniform(15, 35)), 1) if rng.random() < 0.3 else None
                out.append((_speech_row(task, s, "speech", v), speech_spec(rng, [(s.text, v)], snr)))
            else:
                kind = NOISE_TYPES[(k + int(rng.integers(len(NOISE_TYPES)))) % len(NOISE_TYPES)]
                out.append(({"task": task, "target": "non-speech", "noise": kind}, noise_spec(rng, kind)))
    elif task == "open":
        for s in pools["open"].take(n):
            v = draw_voice(rng)
            out.append((_speech_row(task, s, s.answer, v), speech_spec(rng, [(s.text, v)])))
    else:
        raise ValueError(f"the demo corpus has no task {task!r}; it has {', '.join(DEMO_TASKS)}")
    return out


def plan_sc(two: bool, pool: Pool, rng: np.random.Generator, draw_voice=draw_voice
            ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Two voices (a male and a female variant, pitches apart) or one voice saying one or two
    short sentences, so clip length alone does not give the count away."""
    n_sent = 2 if two or rng.random() < 0.5 else 1
    sents = pool.take(n_sent, max_words=5)
    accent = draw_voice(rng)["voice"].split("+")[0]
    speed = (145, 195)  # keeps two sentences short
    if two:
        male = draw_voice(rng, accent, MALE, pitch=(25, 45), speed=speed)
        female = draw_voice(rng, accent, FEMALE, pitch=(55, 75), speed=speed)
        voices = [male, female] if rng.random() < 0.5 else [female, male]
    else:
        voices = [draw_voice(rng, accent, speed=speed)] * n_sent
    text = " ".join(s.text for s in sents)
    row = {"task": "sc", "target": "two" if two else "one", "transcript": text,
           "voice": " | ".join(voice_name(v) for v in voices)}
    return row, speech_spec(rng, [(s.text, v) for s, v in zip(sents, voices)])


def kws_pick(text: str, vocabulary: Sequence[str], positive: bool, rng: np.random.Generator) -> Tuple[str, str]:
    """(keyword, 'yes') with a content word of `text`, or (keyword, 'no') with a vocabulary word absent from it."""
    present = set(words(text))
    pool = content_words(text) if positive else [w for w in vocabulary if w not in present]
    if positive and not pool:
        pool = [w for w in words(text) if len(w) > 2]
    return str(pool[int(rng.integers(len(pool)))]), "yes" if positive else "no"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def sentence_families(seed: int = 0) -> Dict[str, Dict[str, List[Sentence]]]:
    """{family: {split: sentences}} for the families 'asr', 'commands' and 'open': the held-out
    split (HELD_OUT_SHARES) of every template's sentences. The corpus of any size with this seed
    draws from it; the train lists hold many more sentences than the corpus speaks (backbone
    pretraining draws on them; dev and test sentences are never in them)."""
    makers = {"asr": asr_sentences, "commands": command_sentences, "open": open_sentences}
    return {name: split_sentences(make(), HELD_OUT_SHARES[name], rng_for(seed, f"split/{name}"))
            for name, make in makers.items()}


def held_out_sentences(seed: int = 0) -> List[str]:
    """Every dev and test sentence of the split of `seed`, sorted (nothing pretrained may read them)."""
    return sorted({s.text for fam in sentence_families(seed).values() for sp in ("dev", "test") for s in fam[sp]})


def held_out_fingerprint(seed: int = 0) -> str:
    """sha256 of `held_out_sentences(seed)`: backbones pretrained for one split record it, and a
    corpus must have the same one to be evaluated on them."""
    import hashlib

    return hashlib.sha256("\n".join(held_out_sentences(seed)).encode()).hexdigest()


def answer_labels() -> Dict[str, List[str]]:
    """Every label the demo's classification-style tasks answer with: {task: [label, ...]}."""
    labels = {t: list(tasks.TASKS[t].labels) for t in ("kws", "sc", "sns")}
    labels.update(ic=list(IC_LABELS), ac=list(AC_LABELS))
    return labels


def answer_words() -> List[str]:
    """The words of every demo answer label (sorted, once each). A pretrained LLM has written them
    all; the demo backbones' text stream copies them so that none keeps an untrained output row."""
    return sorted({w for labels in answer_labels().values() for label in labels for w in label.split()})


def kws_vocabulary(families: Mapping[str, Mapping[str, Sequence[Sentence]]]) -> List[str]:
    """The content words of the train ASR sentences (KWS draws its negative keywords from them)."""
    return sorted({w for s in families["asr"]["train"] for w in content_words(s.text)})


def plan_corpus(sizes: Mapping[str, Mapping[str, int]], seed: int = 0
                ) -> Dict[str, List[Tuple[Dict[str, Any], Dict[str, Any]]]]:
    """{split: [(row, spec), ...]} for the whole corpus; rows have ids and audio paths, no durations."""
    sizes = check_sizes(sizes)
    families = sentence_families(seed)
    kws_vocab = kws_vocabulary(families)
    plan = {}
    for split in SPLITS:
        pools = {name: Pool(fam[split]) for name, fam in families.items()}
        items = []
        for task in DEMO_TASKS:
            pairs = plan_task(task, split, sizes[split][task], pools, kws_vocab, rng_for(seed, f"{split}/{task}"))
            for i, (row, spec) in enumerate(pairs):
                uid = f"{split}/{task}/{i:05d}"
                row = {"id": uid, "audio": f"audio/{split}/{task}_{i:05d}.wav", **row}
                items.append((row, spec))
        plan[split] = items
    return plan


ROBUST_SPLITS = ("robust_voices", "robust_order")
ROBUST_ORDER_TASKS = ("asr", "kws", "kwe")  # tasks whose answer survives shuffling a sentence's words


def shuffled_sentences(sentences: Sequence[Sentence], seed: int, avoid: Sequence[str] = ()) -> List[Sentence]:
    """Each sentence with its words in an order no template makes: a permutation that differs from
    the sentence and from every text in `avoid` (sentences of no more than 2 words are left out).
    The keywords of a sentence stay its keywords; its slots and intent are dropped."""
    rng = rng_for(seed, "robust/shuffle")
    taken = set(avoid)
    out = []
    for s in sentences:
        ws = s.text.split()
        if len(ws) < 3:
            continue
        for _ in range(20):
            text = " ".join(ws[int(i)] for i in rng.permutation(len(ws)))
            if text != s.text and text not in taken:
                taken.add(text)
                padded = f" {text} "
                keywords = tuple(sorted(s.keywords, key=lambda k: padded.find(f" {k} ")))  # order of appearance
                out.append(dataclasses.replace(s, text=text, group=s.group + "/shuffled", keywords=keywords,
                                               slots=(), intent=""))
                break
    return out


def plan_robust(sizes: Mapping[str, Mapping[str, int]], seed: int = 0
                ) -> Dict[str, List[Tuple[Dict[str, Any], Dict[str, Any]]]]:
    """The robustness splits, from the *test* sentences (nothing pretrained or trained read them):

    robust_voices   every task, spoken by voices outside the corpus's ranges (`draw_wide_voice`)
    robust_order    ASR / KWS / KWE on test sentences with their words shuffled (orders no template
                    makes), in the corpus's own voices

    sizes: {split: {task: n}} for those splits (a split or task left out is not made)."""
    families = sentence_families(seed)
    kws_vocab = kws_vocabulary(families)
    every_text = [s.text for fam in families.values() for sp in SPLITS for s in fam[sp]]
    plan = {}
    for split in ROBUST_SPLITS:
        want = {t: int(n) for t, n in dict(sizes.get(split, {})).items() if int(n) > 0}
        allowed = ROBUST_ORDER_TASKS if split == "robust_order" else DEMO_TASKS
        bad = sorted(set(want) - set(allowed))
        if bad:
            raise ValueError(f"corpus.robust_sizes.{split}: no such task(s) {bad} (it has {', '.join(allowed)})")
        if not want:
            continue
        pools = {name: Pool(fam["test"]) for name, fam in families.items()}
        voice = draw_wide_voice
        if split == "robust_order":
            pools["asr"] = Pool(shuffled_sentences(families["asr"]["test"], seed, every_text))
            voice = draw_voice
        items = []
        for task in DEMO_TASKS:
            if task in want:
                pairs = plan_task(task, "test", want[task], pools, kws_vocab, rng_for(seed, f"{split}/{task}"), voice)
                for i, (row, spec) in enumerate(pairs):
                    items.append(({"id": f"{split}/{task}/{i:05d}", "audio": f"audio/{split}/{task}_{i:05d}.wav",
                                   **row}, spec))
        plan[split] = items
    return plan


def make_corpus(out_dir: str, sizes: Mapping[str, Mapping[str, int]], seed: int = 0, workers: int = 2,
                progress: bool = True, robust_sizes: Optional[Mapping[str, Mapping[str, int]]] = None
                ) -> Dict[str, Any]:
    """Generate the corpus into `out_dir` (see the module docstring); returns the summary.
    `robust_sizes` adds the robustness splits (`plan_robust`) as `<split>.jsonl`."""
    speak.check_espeak()
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "corpus.json")):  # a previous corpus: drop its clips
        for sub in ("audio", "by_task"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    sizes = check_sizes(sizes)
    plan = plan_corpus(sizes, seed)
    plan.update(plan_robust(robust_sizes or {}, seed))
    splits = [sp for sp in SPLITS + ROBUST_SPLITS if sp in plan]
    for split in splits:
        os.makedirs(os.path.join(out_dir, "audio", split), exist_ok=True)
    jobs = [(os.path.join(out_dir, row["audio"]), spec) for split in splits for row, spec in plan[split]]
    results = speak.render_all(jobs, workers, progress)
    rows: Dict[str, List[Dict[str, Any]]] = {}
    skipped, skip_examples = collections.Counter(), []
    k = 0
    for split in splits:
        rows[split] = []
        for row, _ in plan[split]:
            seconds, problem = results[k]
            k += 1
            if problem is not None:  # counted by reason, named by clip id; the row is left out
                skipped[problem[0]] += 1
                skip_examples.append(f"{row['id']}: {problem[0]}: {problem[1]}")
                log.warning("demo corpus: skipping %s", skip_examples[-1])
                continue
            row = dict(row)
            row["duration"] = round(seconds, 4)
            rows[split].append(_ordered(row))
    check_held_out(rows)
    for split in splits:
        write_manifest(os.path.join(out_dir, f"{split}.jsonl"), rows[split])
        if split not in SPLITS:
            continue
        for task in DEMO_TASKS:
            task_rows = [{**r, "audio": "../" + r["audio"]} for r in rows[split] if r["task"] == task]
            write_manifest(os.path.join(out_dir, "by_task", f"{split}.{task}.jsonl"), task_rows)
    summary = summarize(rows, sizes, seed, time.time() - t0)
    summary["robust"] = {sp: dict(collections.Counter(r["task"] for r in rows[sp])) for sp in splits
                         if sp not in SPLITS}
    summary["skipped"] = dict(sorted(skipped.items()))
    summary["skip_examples"] = skip_examples[:20]
    _write_json(os.path.join(out_dir, "corpus.json"), summary)
    summary["baselines"] = baselines(out_dir)
    summary["generation_seconds"] = round(time.time() - t0, 2)
    _write_json(os.path.join(out_dir, "corpus.json"), summary)
    return summary


_FIRST = ("id", "task", "audio", "duration", "target", "transcript", "keyword", "labels")


def _ordered(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {**{k: row[k] for k in _FIRST if k in row}, **{k: v for k, v in row.items() if k not in _FIRST}}


def check_held_out(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Raise if a dev or test sentence is also spoken in train."""
    seen = {t for r in rows["train"] for t in _spoken(r)}
    for split in ("dev", "test") + tuple(sp for sp in ROBUST_SPLITS if sp in rows):
        leaked = sorted({t for r in rows[split] for t in _spoken(r)} & seen)
        if leaked:
            raise AssertionError(f"{split} sentences also spoken in train: {leaked[:5]}")


def _spoken(row: Mapping[str, Any]) -> List[str]:
    if row["task"] == "sc":  # may join two sentences, each drawn from the same held-out pools
        return []
    return [row["transcript"]] if row.get("transcript") else []


def summarize(rows: Mapping[str, Sequence[Mapping[str, Any]]], sizes: Mapping[str, Mapping[str, int]], seed: int,
              seconds: float) -> Dict[str, Any]:
    counts = {sp: dict(collections.Counter(r["task"] for r in rows[sp])) for sp in SPLITS}
    audio_seconds = {sp: round(sum(r["duration"] for r in rows[sp]), 1) for sp in SPLITS}
    vocab = sorted({w for sp in SPLITS for r in rows[sp] for w in words(r.get("transcript", ""))})
    labels = dict(answer_labels(), sf=list(SF_SLOT_NAMES))
    return {
        "sizes": {sp: dict(sizes[sp]) for sp in SPLITS}, "seed": seed, "tasks": list(DEMO_TASKS),
        "counts": counts, "total": {sp: len(rows[sp]) for sp in SPLITS},
        "audio_seconds": audio_seconds, "total_audio_seconds": round(sum(audio_seconds.values()), 1),
        "vocabulary_size": len(vocab), "vocabulary": vocab,
        "labels": labels,
        "labels_passed_per_example": {"ic": "the 10 demo intents (SLURP names)", "ac": "the 4 demo accents"},
        "ac_voices": AC_VOICES,
        "held_out_sentences": {sp: len({r["transcript"] for r in rows[sp] if r.get("transcript")})
                               for sp in ("dev", "test")},
        "held_out_instructions": {
            "note": "the registry's unseen prompts: tasks.build_instruction(task, example, choice, split='unseen'); "
                    "training draws only the seen prompts. " + OPEN_INSTRUCTIONS_NOTE,
            "unseen_prompts": {t: list(tasks.TASKS[t].unseen_prompts) for t in DEMO_TASKS},
        },
        "manifests": {sp: f"{sp}.jsonl" for sp in SPLITS},
        "generation_seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------------
# Texts and baselines
# --------------------------------------------------------------------------------------------

def read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_texts(out_dir: str, split: str = "train") -> List[str]:
    """Texts for a tokenizer or text pretraining: per row its transcript, target and one drawn
    instruction, plus every seen prompt wording (with label clauses, and joint form) per task."""
    rows = read_rows(os.path.join(out_dir, f"{split}.jsonl"))
    texts: List[str] = []
    first: Dict[str, Dict[str, Any]] = {}
    for i, row in enumerate(rows):
        task = row["task"]
        first.setdefault(task, row)
        target = tasks.format_target(task, row["target"], tasks.resolve_labels(task, row))
        if row.get("transcript"):
            texts.append(row["transcript"])
        texts.append(target)
        texts.append(tasks.build_instruction(task, row, i))
        if task in tasks.JOINT_TASKS_DEFAULT and row.get("transcript"):
            texts.append(tasks.format_joint_target(task, row["transcript"], target))
    for task, row in first.items():
        n = tasks.prompt_count(task) * 4
        texts.extend(tasks.build_instruction(task, row, k) for k in range(n))
        if row.get("transcript") and task != "asr":
            texts.extend(tasks.build_instruction(task, row, k, joint=True) for k in range(n))
    return texts


def baselines(out_dir: str) -> Dict[str, Any]:
    """Scores on test of guessing without listening: the train majority answer (and chance
    1/num_labels) for classification; an empty output elsewhere. Also stored in corpus.json."""
    train = read_rows(os.path.join(out_dir, "train.jsonl"))
    test = read_rows(os.path.join(out_dir, "test.jsonl"))
    out: Dict[str, Any] = {}
    for task in sorted({r["task"] for r in test}, key=DEMO_TASKS.index):
        t = tasks.get_task(task)
        gold = [r["target"] for r in test if r["task"] == task]
        seen = collections.Counter(r["target"] for r in train if r["task"] == task)
        majority = seen.most_common(1)[0][0] if seen else ""
        accuracy = round(float(np.mean([g == majority for g in gold])), 4)
        if t.is_classification:
            labels = tasks.resolve_labels(task, next(r for r in test if r["task"] == task))
            out[task] = {"metric": t.metric, "majority_label": majority, "majority_accuracy": accuracy,
                         "majority_uar": round(float(majority in gold) / len(set(gold)), 4),
                         "chance": round(1.0 / len(labels), 4), "num_labels": len(labels)}
        elif task == "asr":
            out[task] = {"metric": "wer", "empty_output_wer": 1.0}
        elif task == "sf":
            none_share = round(float(np.mean([g == "none" for g in gold])), 4)
            out[task] = {"metric": t.metric, "predict_none_exact_match": none_share, "predict_none_slu_f1": 0.0}
        elif task == "kwe":
            out[task] = {"metric": t.metric, "empty_output_f1": 0.0}
        else:
            out[task] = {"metric": "exact_match", "majority_answer": majority, "majority_exact_match": accuracy}
    path = os.path.join(out_dir, "corpus.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        summary["baselines"] = out
        _write_json(path, summary)
    return out


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
