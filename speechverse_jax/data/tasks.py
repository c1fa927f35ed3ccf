"""Task registry: prompts, target formats, label sets, metric names, joint decoding.

The 11 tasks of the paper (ASR, ST, IC, SF, KWE, KWS, ER, ASC, SC, AC, SNS) plus `open`
(open-ended spoken instructions, the paper's TTS-Alpaca data). `TASK_NAMES` fixes the order,
so `task_id` in a batch is `TASK_NAMES.index(task)`.

One function builds every instruction, for training and for inference:

    build_instruction(task, example, choice, split='seen', with_labels=None,
                      with_descriptions=False, joint=False, labels=None) -> str

`choice` is an int (the same int gives the same text) or a `numpy.random.Generator`.
An example that carries its own `instruction` gets it back unchanged.

Target formats (`format_target` writes them, `parse_output` reads model output back):
    sf   `slot = value; slot = value;` (`none` when no slot is present)
    kwe  `keyword, keyword`
    classification tasks: the label name, e.g. `neutral`
    joint decoding (paper Table 8): `ASR: <transcript> | <Tag>: <answer> |`
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

LabelSet = Union[Sequence[str], Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. `labels` maps label -> short description (empty for free-text tasks)."""

    name: str
    title: str  # human-readable name
    tag: str  # the task's name in joint decoding prompts and targets
    metric: str  # wer, bleu, accuracy, slu_f1, macro_f1, uar, none
    kind: str  # text | classification | slots | keywords
    prompts: Tuple[str, ...]  # seen (training) instructions
    unseen_prompts: Tuple[str, ...]  # held out for the unseen-prompt test (paper Table 5)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    required: Tuple[str, ...] = ()  # extra manifest fields the prompts or targets need

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


# --------------------------------------------------------------------------------------------
# Label sets
# --------------------------------------------------------------------------------------------

SLURP_INTENTS: Dict[str, str] = {
    "alarm_query": "ask about alarms that are set",
    "alarm_remove": "delete an alarm",
    "alarm_set": "create a new alarm",
    "audio_volume_down": "make the sound quieter",
    "audio_volume_mute": "silence the device",
    "audio_volume_other": "other volume request",
    "audio_volume_up": "make the sound louder",
    "calendar_query": "ask about calendar events",
    "calendar_remove": "delete a calendar event",
    "calendar_set": "add an event or reminder to the calendar",
    "cooking_query": "ask a cooking question",
    "cooking_recipe": "ask for a recipe",
    "datetime_convert": "convert a time or date between zones or formats",
    "datetime_query": "ask for the current time or date",
    "email_addcontact": "add an email contact",
    "email_query": "ask about emails received",
    "email_querycontact": "ask for a contact's details",
    "email_sendemail": "send an email",
    "general_greet": "a greeting",
    "general_joke": "ask for a joke",
    "general_quirky": "chit-chat or an odd request",
    "iot_cleaning": "start the vacuum cleaner",
    "iot_coffee": "make coffee",
    "iot_hue_lightchange": "change the light colour",
    "iot_hue_lightdim": "dim the lights",
    "iot_hue_lightoff": "turn the lights off",
    "iot_hue_lighton": "turn the lights on",
    "iot_hue_lightup": "make the lights brighter",
    "iot_wemo_off": "switch a smart plug off",
    "iot_wemo_on": "switch a smart plug on",
    "lists_createoradd": "create a list or add to one",
    "lists_query": "ask what is on a list",
    "lists_remove": "remove a list or an item from it",
    "music_dislikeness": "say a song is disliked",
    "music_likeness": "say a song is liked",
    "music_query": "ask about the music playing",
    "music_settings": "change music playback settings",
    "news_query": "ask for the news",
    "play_audiobook": "play an audiobook",
    "play_game": "play a game",
    "play_music": "play music",
    "play_podcasts": "play a podcast",
    "play_radio": "play a radio station",
    "qa_currency": "ask about exchange rates",
    "qa_definition": "ask what a word means",
    "qa_factoid": "ask a factual question",
    "qa_maths": "ask a maths question",
    "qa_stock": "ask about stock prices",
    "recommendation_events": "ask for event suggestions",
    "recommendation_locations": "ask for place suggestions",
    "recommendation_movies": "ask for movie suggestions",
    "social_post": "post to social media",
    "social_query": "ask about social media",
    "takeaway_order": "order takeaway food",
    "takeaway_query": "ask about a takeaway order",
    "transport_query": "ask about transport",
    "transport_taxi": "book a taxi",
    "transport_ticket": "book a ticket",
    "transport_traffic": "ask about traffic",
    "weather_query": "ask about the weather",
}

# The paper's 4-slot SF subset; the SLURP recipe can write other slot sets per example.
SF_SLOTS: Dict[str, str] = {
    "date": "a day or date",
    "place_name": "the name of a place",
    "person": "the name of a person",
    "time": "a time of day",
}

LANGUAGES = {"de": "German", "ca": "Catalan", "fr": "French", "ro": "Romanian", "es": "Spanish",
             "it": "Italian", "nl": "Dutch", "pt": "Portuguese", "ja": "Japanese", "zh": "Chinese",
             "en": "English", "ar": "Arabic", "et": "Estonian", "fa": "Persian", "id": "Indonesian",
             "lv": "Latvian", "mn": "Mongolian", "sl": "Slovenian", "sv": "Swedish", "ta": "Tamil",
             "tr": "Turkish", "cy": "Welsh"}

# --------------------------------------------------------------------------------------------
# Prompts (written for this project; "preceding" because the audio comes first in the input)
# --------------------------------------------------------------------------------------------

_ASR = (
    "Transcribe the preceding audio.",
    "What is being said in the preceding audio?",
    "Write down exactly what the speaker says.",
    "Convert the speech above into text.",
    "Give a verbatim transcript of the recording.",
    "Please transcribe this audio clip word for word.",
    "What words are spoken in the audio?",
    "Produce the text transcription of the speech you just heard.",
    "Listen to the audio and write out what was said.",
    "Turn the preceding speech into written words.",
    "Provide a transcript of the spoken content.",
    "Type out the speaker's words.",
    "Recognize the speech in the preceding clip and output the text.",
    "Transcribe the utterance.",
    "Write what you hear in the recording.",
    "Generate a transcription for the audio above.",
    "Can you tell me word for word what the person said?",
    "Perform speech recognition on the preceding audio.",
)
_ASR_UNSEEN = (
    "Jot down everything the talker utters, without commentary.",
    "I need the spoken words from this clip as plain text.",
    "Dictation mode: reproduce the speech as written text.",
)

_ST = (
    "Translate the preceding English audio into {target_language}.",
    "Generate a {target_language} translation of the speech.",
    "What does the speaker say, in {target_language}?",
    "Listen to the English speech and write its {target_language} translation.",
    "Render the spoken English in {target_language}.",
    "Provide the {target_language} version of what was said.",
    "Translate the speech above to {target_language}.",
    "Give a {target_language} translation of the recording.",
    "Convert the English audio into {target_language} text.",
    "Please translate what you heard into {target_language}.",
    "Write the speaker's words in {target_language}.",
    "Express the content of the preceding speech in {target_language}.",
    "How would the utterance be said in {target_language}? Write it down.",
    "Translate the spoken sentence from English to {target_language}.",
    "Output a {target_language} translation of the audio clip.",
    "Produce {target_language} text that means the same as the speech.",
)
_ST_UNSEEN = (
    "A {target_language} speaker needs to understand this clip: write it for them in their language.",
    "Into {target_language}, please: the whole utterance.",
    "Interpret the recording for a {target_language} audience, in writing.",
)

_IC = (
    "Classify the intent of the speaker in the preceding audio.",
    "What does the user want the assistant to do?",
    "Identify the intent of the spoken request.",
    "Which intent best describes the preceding utterance?",
    "Map the spoken command to exactly one intent.",
    "Determine the purpose of the speaker's request.",
    "What is the intent behind what was said?",
    "Listen to the command and name its intent.",
    "Assign an intent label to the audio.",
    "Tell me the intent of this voice command.",
    "The audio is a request to a voice assistant. What is its intent?",
    "Select the intent that the speaker expresses.",
    "Find the goal of the spoken request and give its intent label.",
    "Categorize the preceding request by intent.",
    "Which action is the speaker asking for? Answer with the intent.",
    "Recognize the user's intent from the recording.",
)
_IC_UNSEEN = (
    "Pretend you are a smart speaker: which intent would you trigger for this?",
    "Route this spoken request to the right handler by naming its intent.",
    "In one label, what is the user after?",
)

_SF = (
    "Find the slots mentioned in the preceding audio and their values.",
    "Extract the slot values from the spoken request.",
    "Fill the slots using what the speaker said.",
    "Which of the slots are mentioned, and with which values?",
    "Identify the entities in the utterance and label them with slot types.",
    "List every slot and its value found in the audio.",
    "Tag the spoken command with slot names and values.",
    "Pull out the slot values from the speech.",
    "What slot values does the request contain?",
    "Detect the slots in the preceding audio and write them as slot = value.",
    "Extract the named slots from the recording.",
    "Listen to the request and extract its slots.",
    "Give the slot-value pairs that appear in the utterance.",
    "Perform slot filling on the preceding audio.",
    "Which slots are filled by the speaker's words? Give their values.",
    "Find any of the listed slots in the speech.",
)
_SF_UNSEEN = (
    "Parse the request into structured fields and their contents.",
    "Which details does the user give? Report them as slot assignments.",
    "Annotate the command's entities with their slot types.",
)

_KWE = (
    "Find the important keywords in the preceding recording.",
    "What are the key words of the preceding audio?",
    "Extract the keywords from the speech.",
    "List the most important words spoken in the audio.",
    "Which words best capture what the speaker talks about?",
    "Give the main keywords of the utterance.",
    "Identify the key terms mentioned in the recording.",
    "Pick out the keywords from what was said.",
    "Name the essential words in the preceding speech.",
    "What topic words appear in the audio?",
    "Extract the salient keywords, separated by commas.",
    "Summarize the audio as a few keywords.",
    "Which content words matter most in this clip?",
    "Listen and list the keywords.",
    "Output the keywords of the spoken sentence.",
    "Detect the keywords in the speech above.",
)
_KWE_UNSEEN = (
    "If you had to index this clip for search, which words would you use?",
    "Tag this recording with the words that carry its meaning.",
    "Boil the utterance down to its key vocabulary.",
)

# The keyword stands bare, as in a transcript: quoted ('garden'), sentencepiece cuts it without its
# word-start marker ('garden' vs the transcript's '\u2581garden'), so the model would have to match two
# different tokens (often a word against its characters). The demo T5 scored KWS 46% on dev text
# with quotes (docs/demo_experiments.md, release 2).
_KWS = (
    "Is the word {keyword} used in the audio?",
    "Does the speaker say {keyword}?",
    "Is {keyword} spoken in the preceding recording?",
    "Check whether the keyword {keyword} occurs in the speech.",
    "Did you hear the word {keyword} in the audio?",
    "Does the utterance contain the word {keyword}?",
    "Listen for {keyword}. Is it present?",
    "Is the keyword {keyword} mentioned?",
    "Can the word {keyword} be heard in the clip?",
    "Determine whether {keyword} is said in the preceding audio.",
    "Was {keyword} one of the words spoken?",
    "Keyword spotting: does {keyword} appear in the speech?",
    "Does the recording include the word {keyword}?",
    "Tell me if the speaker uttered {keyword}.",
    "Is there any mention of {keyword} in the audio?",
    "Search the speech for the word {keyword}. Is it there?",
)
_KWS_UNSEEN = (
    "Somewhere in this clip, is {keyword} pronounced?",
    "Would a transcript of this audio contain {keyword}?",
    "Quick check: {keyword}, said or not said?",
)

_ER = (
    "What is the main emotion of the speaker, judging from the tone of voice?",
    "Identify the emotion expressed in the preceding audio.",
    "How does the speaker feel?",
    "Classify the emotion in the speaker's voice.",
    "Which emotion is conveyed by the speech?",
    "Recognize the emotional state of the speaker.",
    "Listen to the tone and tell me the emotion.",
    "What emotion does the voice in the recording express?",
    "Determine the speaker's emotion from the audio.",
    "Name the dominant emotion in the preceding clip.",
    "From the way it is said, what is the speaker's mood?",
    "Detect the emotion of the utterance.",
    "Is the speaker happy, sad, angry or neutral?",
    "Label the emotion heard in the audio.",
    "What feeling comes through in the speaker's voice?",
    "Perform emotion recognition on the preceding speech.",
)
_ER_UNSEEN = (
    "Read the speaker's vocal cues: what are they feeling right now?",
    "If you were an empathetic listener, which emotion would you notice here?",
    "Describe the speaker's affect with a single emotion label.",
)

_ASC = (
    "What is the sentiment of the preceding audio?",
    "Is the speaker's sentiment positive, negative or neutral?",
    "Classify the sentiment of the speech.",
    "Determine the overall sentiment expressed by the speaker.",
    "How positive or negative does the speaker sound?",
    "Identify the sentiment in the recording.",
    "What attitude does the speaker express: positivity, negativity or neutrality?",
    "Label the sentiment of the utterance.",
    "Judge the sentiment conveyed by the voice and words.",
    "Is the tone of the speech positive, negative or neutral?",
    "Perform sentiment analysis on the preceding audio.",
    "What is the emotional valence of the speech?",
    "Tell me whether the clip sounds positive, negative or neutral.",
    "Rate the sentiment of what was said.",
    "Which sentiment best fits the speaker?",
    "Analyze the sentiment of the spoken content.",
)
_ASC_UNSEEN = (
    "Does this clip leave a good, bad or indifferent impression?",
    "Put the speaker's outlook into one sentiment category.",
    "Would you call the mood of this recording upbeat, downbeat or flat? Use the sentiment labels.",
)

_SC = (
    "How many distinct speakers are in the clip?",
    "Count the number of speakers in the preceding audio.",
    "How many different people speak in the recording?",
    "Is there one speaker or are there two?",
    "Determine the number of speakers in the audio.",
    "How many voices can be heard?",
    "Count the distinct voices in the preceding clip.",
    "How many people are talking in this audio?",
    "Is this audio spoken by one person or by two?",
    "Tell me the speaker count of the recording.",
    "Identify how many speakers take part in the clip.",
    "How many talkers are there in the preceding speech?",
    "Listen and count the speakers.",
    "What is the number of unique speakers in the audio?",
    "Does the recording contain a single speaker or two speakers?",
    "Estimate the number of speakers present.",
)
_SC_UNSEEN = (
    "Is this a monologue or a conversation between two people? Answer with the number of speakers.",
    "Tally the different voices you hear.",
    "How many participants speak in this excerpt?",
)

_AC = (
    "What is the accent of the speaker?",
    "Identify the speaker's accent.",
    "Which English accent does the speaker have?",
    "Classify the accent in the preceding audio.",
    "Where does the speaker's accent come from?",
    "Determine the accent of the voice in the recording.",
    "Listen to the pronunciation and name the accent.",
    "What kind of English accent is this?",
    "Recognize the regional accent of the speaker.",
    "Name the accent heard in the clip.",
    "Which accent best matches the speaker?",
    "From the way the words are pronounced, what is the accent?",
    "Tell me the speaker's accent.",
    "Perform accent classification on the preceding audio.",
    "Judging by pronunciation, which accent group does the speaker belong to?",
    "Detect the accent of the utterance.",
)
_AC_UNSEEN = (
    "Guess where this English speaker grew up, going by their accent.",
    "Which variety of English is being spoken here?",
    "Pin down the speaker's accent with one label.",
)

_SNS = (
    "Is there speech in the preceding audio?",
    "Does the audio contain speech?",
    "Is someone speaking in this recording?",
    "Classify the audio as speech or non-speech.",
    "Does the clip contain human speech or not?",
    "Detect whether the preceding audio has speech.",
    "Is this audio speech or something else?",
    "Can you hear anyone talking in the clip?",
    "Determine whether the recording contains spoken words.",
    "Is the preceding sound speech?",
    "Label the audio as speech or non-speech.",
    "Is there a voice speaking in the audio?",
    "Voice activity detection: is there speech in this clip?",
    "Does this recording have any talking in it?",
    "Tell me whether the audio is speech.",
    "Check the clip for speech.",
)
_SNS_UNSEEN = (
    "Is anybody saying anything here, or is it just sound?",
    "Would a transcriber find anything to write down in this clip? Answer speech or non-speech.",
    "Human voice present or absent?",
)

_OPEN = (
    "Respond to the request in the preceding audio.",
    "Answer the spoken question.",
    "Do what the speaker asks.",
    "Listen to the instruction in the audio and carry it out.",
    "Reply helpfully to what was said.",
    "Follow the spoken instruction.",
    "Give a helpful answer to the speaker.",
    "The audio contains a request. Fulfil it.",
    "Provide a response to the preceding speech.",
    "Act on the instruction given in the recording.",
    "What is your answer to the speaker?",
    "Address the speaker's request.",
    "Complete the task described in the audio.",
    "Help the speaker with what they asked.",
    "Write a response to the spoken message.",
    "Answer the speaker as a helpful assistant.",
)
_OPEN_UNSEEN = (
    "The person in the clip wants something from you; give it to them.",
    "Reply to the voice message.",
    "Take the spoken request and produce the best answer you can.",
)


def _task(name, title, tag, metric, kind, prompts, unseen, labels=None, required=()):
    return Task(name, title, tag, metric, kind, tuple(prompts), tuple(unseen), dict(labels or {}), tuple(required))


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        _task("asr", "speech recognition", "ASR", "wer", "text", _ASR, _ASR_UNSEEN),
        _task("st", "speech translation", "Translation", "bleu", "text", _ST, _ST_UNSEEN,
              required=("target_language",)),
        _task("ic", "intent classification", "Intent", "accuracy", "classification", _IC, _IC_UNSEEN, SLURP_INTENTS),
        _task("sf", "slot filling", "Slots", "slu_f1", "slots", _SF, _SF_UNSEEN, SF_SLOTS),
        _task("kwe", "keyword extraction", "KWE", "macro_f1", "keywords", _KWE, _KWE_UNSEEN),
        _task("kws", "keyword spotting", "KWS", "accuracy", "classification", _KWS, _KWS_UNSEEN,
              {"yes": "the word is spoken", "no": "the word is not spoken"}, required=("keyword",)),
        _task("er", "emotion recognition", "Emotion", "uar", "classification", _ER, _ER_UNSEEN,
              {"neutral": "no strong emotion", "happy": "happiness or joy", "sad": "sadness", "angry": "anger"}),
        _task("asc", "audio sentiment classification", "Sentiment", "uar", "classification", _ASC, _ASC_UNSEEN,
              {"negative": "negativity", "neutral": "neutrality", "positive": "positivity"}),
        _task("sc", "speaker counting", "Speakers", "uar", "classification", _SC, _SC_UNSEEN,
              {"one": "a single speaker", "two": "two different speakers"}),
        _task("ac", "accent classification", "Accent", "uar", "classification", _AC, _AC_UNSEEN,
              {"american": "United States English", "british": "English from Britain",
               "indian": "Indian English", "australian": "Australian English", "canadian": "Canadian English"}),
        _task("sns", "speech or non-speech", "Speech", "uar", "classification", _SNS, _SNS_UNSEEN,
              {"speech": "someone is talking", "non-speech": "no one is talking"}),
        _task("open", "open-ended spoken instruction", "Answer", "exact_match", "text", _OPEN, _OPEN_UNSEEN),
    )
}
TASK_NAMES: Tuple[str, ...] = tuple(TASKS)  # the order behind `task_id`


def get_task(task: Union[str, Task]) -> Task:
    if isinstance(task, Task):
        return task
    try:
        return TASKS[str(task).lower()]
    except KeyError:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}") from None


def task_id(task: Union[str, Task]) -> int:
    return TASK_NAMES.index(get_task(task).name)


def metric_name(task: Union[str, Task]) -> str:
    return get_task(task).metric


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

def _get(example: Any, key: str, default=None):
    if example is None:
        return default
    value = example.get(key, default) if hasattr(example, "get") else getattr(example, key, default)
    return default if value is None else value


def as_label_dict(labels: LabelSet) -> Dict[str, str]:
    """A list of names or a {name: description} mapping -> {name: description ('' if none)}."""
    if isinstance(labels, Mapping):
        return {str(k): str(v or "") for k, v in labels.items()}
    return {str(k): "" for k in labels}


def resolve_labels(task: Union[str, Task], example: Any = None,
                   overrides: Optional[Mapping[str, LabelSet]] = None) -> Dict[str, str]:
    """Label set for `example`: its own `labels` field, else `overrides[task]`, else the registry's."""
    t = get_task(task)
    own = _get(example, "labels")
    if own:
        return as_label_dict(own)
    if overrides and t.name in overrides and overrides[t.name]:
        return as_label_dict(overrides[t.name])
    return dict(t.labels)


def canonical_label(text: str, labels: Mapping[str, str]) -> Optional[str]:
    """The label in `labels` matching `text` (case-, space- and underscore-insensitive), else None."""
    key = _label_key(text)
    for name in labels:
        if _label_key(name) == key:
            return name
    return None


def _label_key(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(s).strip().lower().rstrip(".")).strip()


# --------------------------------------------------------------------------------------------
# Target formats and parsers
# --------------------------------------------------------------------------------------------

def format_slots(slots: Union[Mapping[str, str], Sequence[Tuple[str, str]]]) -> str:
    """[(slot, value), ...] or {slot: value} -> 'slot = value; slot = value;' ('none' if empty)."""
    pairs = list(slots.items()) if isinstance(slots, Mapping) else [tuple(p) for p in slots]
    if not pairs:
        return "none"
    return " ".join(f"{str(k).strip()} = {str(v).strip()};" for k, v in pairs)


def parse_slots(text: str) -> List[Tuple[str, str]]:
    """'slot = value; slot = value;' -> [(slot, value), ...]; malformed pieces are dropped."""
    out = []
    text = text.strip()
    if text.lower() in ("", "none", "none;"):
        return out
    for piece in text.split(";"):
        if "=" not in piece:
            continue
        k, _, v = piece.partition("=")
        k, v = k.strip(), v.strip()
        if k and v:
            out.append((k, v))
    return out


def format_keywords(keywords: Sequence[str]) -> str:
    return ", ".join(str(k).strip() for k in keywords if str(k).strip())


def parse_keywords(text: str) -> List[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def format_target(task: Union[str, Task], value: Any, labels: Optional[Mapping[str, str]] = None) -> str:
    """A manifest `target` (string, list or mapping) -> the target text the model learns.

    Classification targets are mapped to the canonical label; ValueError if not in `labels`.
    """
    t = get_task(task)
    if t.kind == "slots":
        return value.strip() if isinstance(value, str) else format_slots(value)
    if t.kind == "keywords":
        return value.strip() if isinstance(value, str) else format_keywords(value)
    if not isinstance(value, str):
        raise ValueError(f"{t.name}: target must be a string, got {type(value).__name__}")
    if t.kind == "classification":
        labels = t.labels if labels is None else labels
        name = canonical_label(value, labels)
        if name is None:
            raise ValueError(f"{t.name}: target {value!r} is not one of the labels {sorted(labels)}")
        return name
    return value.strip()


def parse_output(task: Union[str, Task], text: str, labels: Optional[Mapping[str, str]] = None) -> Any:
    """Model output -> answer: slot pairs (sf), keyword list (kwe), label or None (classification),
    stripped text otherwise. Joint outputs are reduced to the task's part first."""
    t = get_task(task)
    if text.lstrip().startswith("ASR:"):
        text = parse_joint_output(text, t).answer
    if t.kind == "slots":
        return parse_slots(text)
    if t.kind == "keywords":
        return parse_keywords(text)
    if t.kind == "classification":
        return canonical_label(text, t.labels if labels is None else labels)
    return text.strip()


# --------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------

_LABEL_CLAUSES = (
    "Answer with one of: {labels}.",
    "Choose the answer from this list: {labels}.",
    "The possible answers are {labels}.",
    "Pick exactly one of these labels: {labels}.",
)
_DESCRIBED_CLAUSES = (
    "Answer with exactly one of the following labels (label: meaning):\n{described}",
    "Choose one label from this list, where each label comes with its description:\n{described}",
    "The possible labels and what they mean are:\n{described}",
)
_SLOT_CLAUSES = (
    "The slot types are: {labels}. Answer as slot = value; pairs, or none.",
    "Look for these slots: {labels}. Write each one found as slot = value; (or none).",
    "Possible slots: {labels}. Output slot = value; for every slot present, otherwise none.",
)
_SLOT_DESCRIBED_CLAUSES = (
    "The slot types, each with its meaning, are:\n{described}\nAnswer as slot = value; pairs, or none.",
    "Look for the following slots (slot: meaning):\n{described}\nWrite each one found as slot = value; (or none).",
)
_JOINT_HEADERS = (
    "Do the following audio tasks in order, one after the other.",
    "Perform these tasks on the preceding audio, in the order given.",
    "Carry out the two tasks below on the audio, in order.",
)
_JOINT_FORMATS = (
    "Give the output as: ASR: <transcript> | {tag}: <answer> |",
    "Write the result in the format ASR: <transcript> | {tag}: <answer> |",
)


def _index(choice: Union[int, np.integer, np.random.Generator]) -> int:
    if isinstance(choice, np.random.Generator):
        return int(choice.integers(0, 2**31 - 1))
    return int(choice)


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _fill(template: str, example: Any, task: Task) -> str:
    fields = _Fields()
    for key in re.findall(r"\{(\w+)\}", template):
        value = _get(example, key)
        if key == "target_language" and value:
            value = LANGUAGES.get(str(value).lower(), str(value))
        if value is None:
            raise ValueError(f"{task.name}: the prompt needs the example field {key!r}")
        fields[key] = value
    return template.format_map(fields)


def _label_text(task: Task, labels: Mapping[str, str], idx: int, with_descriptions: bool) -> str:
    names = list(labels)
    described = with_descriptions and any(labels.values())
    if task.kind == "slots":
        clauses = _SLOT_DESCRIBED_CLAUSES if described else _SLOT_CLAUSES
    else:
        clauses = _DESCRIBED_CLAUSES if described else _LABEL_CLAUSES
    clause = clauses[idx % len(clauses)]
    return clause.format(
        labels=", ".join(names),
        described="\n".join(f"{n}: {labels[n]}" if labels[n] else n for n in names),
    )


def prompt_count(task: Union[str, Task], split: str = "seen") -> int:
    t = get_task(task)
    return len(t.prompts if split == "seen" else t.unseen_prompts)


def build_instruction(
    task: Union[str, Task],
    example: Any,
    choice: Union[int, np.random.Generator] = 0,
    split: str = "seen",
    with_labels: Optional[bool] = None,
    with_descriptions: bool = False,
    joint: bool = False,
    labels: Optional[LabelSet] = None,
    label_overrides: Optional[Mapping[str, LabelSet]] = None,
) -> str:
    """The instruction text for `example` (a manifest example or any mapping with its fields).

    choice: int (deterministic) or Generator (one draw). split: 'seen' (training prompts) or
    'unseen' (held-out wordings). with_labels: list the label set (default: yes for
    classification and slot tasks); with_descriptions: add each label's description.
    joint: the two-step prompt (ASR first, then this task; paper Table 8).
    labels: explicit label set; else `resolve_labels(task, example, label_overrides)`.
    """
    t = get_task(task)
    own = _get(example, "instruction")
    if own and not joint:
        return str(own)
    if split not in ("seen", "unseen"):
        raise ValueError(f"split must be 'seen' or 'unseen', got {split!r}")
    idx = _index(choice)
    prompts = t.prompts if split == "seen" else t.unseen_prompts
    text = _fill(prompts[idx % len(prompts)], example, t) if not own else str(own)
    if with_labels is None:
        with_labels = t.kind in ("classification", "slots")
    if with_labels:
        label_set = as_label_dict(labels) if labels is not None else resolve_labels(t, example, label_overrides)
        if label_set:
            text = f"{text} {_label_text(t, label_set, idx // len(prompts), with_descriptions)}"
    if not joint:
        return text
    asr = TASKS["asr"]
    asr_prompts = asr.prompts if split == "seen" else asr.unseen_prompts
    asr_text = asr_prompts[(idx // 3) % len(asr_prompts)]
    header = _JOINT_HEADERS[(idx // 5) % len(_JOINT_HEADERS)]
    fmt = _JOINT_FORMATS[(idx // 7) % len(_JOINT_FORMATS)].format(tag=t.tag)
    return f"{header}\n=== Task: ASR ===\n{asr_text}\n=== Task: {t.tag} ===\n{text}\n{fmt}"


# --------------------------------------------------------------------------------------------
# Joint decoding (ASR first, then the task; paper Tables 8-9)
# --------------------------------------------------------------------------------------------

JOINT_TASKS_DEFAULT = ("ic", "kwe", "er")


def format_joint_target(task: Union[str, Task], transcript: str, answer: str) -> str:
    """'ASR: <transcript> | <Tag>: <answer> |'."""
    return f"ASR: {transcript.strip()} | {get_task(task).tag}: {answer.strip()} |"


@dataclasses.dataclass(frozen=True)
class JointOutput:
    transcript: str
    answer: str  # the task's part ('' when missing)
    parts: Dict[str, str]  # every 'Tag: text' part, by tag


def parse_joint_output(text: str, task: Optional[Union[str, Task]] = None) -> JointOutput:
    """Split 'ASR: ... | Tag: ... |' into the transcript and the task answer.

    Tolerates a missing final '|' and extra spaces; `answer` is the part tagged with `task`'s tag
    (or the first non-ASR part when `task` is None).
    """
    parts: Dict[str, str] = {}
    for piece in text.split("|"):
        tag, sep, value = piece.partition(":")
        if sep and tag.strip():
            parts.setdefault(tag.strip(), value.strip())
    transcript = parts.get("ASR", "")
    if task is not None:
        answer = parts.get(get_task(task).tag, "")
    else:
        answer = next((v for k, v in parts.items() if k != "ASR"), "")
    return JointOutput(transcript, answer, parts)
