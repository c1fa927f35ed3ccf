"""Constrained decoding: a token automaton that keeps outputs inside a label set (the Outlines idea).

The automaton is built once on the host from the labels' token ids and used inside the jitted
decoding loop (`decode/generate.py`) as a log-prob mask: each hypothesis carries a state, token
v is allowed in state s iff `next(s, v) >= 0`, and the chosen token moves the state on.

Representation (arrays, so the loop needs no host round trip):

    next(s, v) = edge_next[s, j]  if edge_tokens[s, j] == v for some j
               = default_next[s]  otherwise

Trie states have `default_next = -1` and one edge per child token; the free "slot value" states
allow any token by default and override a few (EOS banned, ';' ends the value). This costs
O(states x max edges) memory instead of O(states x vocab) for a dense table (the 60 SLURP intents
with a 32k vocabulary would take ~40 MB dense). State 0 is DONE (reached by EOS, allows nothing),
decoding starts in `START`. Array sizes are padded to powers of two to bound recompiles.

Two automata:
  * `label_constraint`: the output is exactly one label, then EOS (classification tasks).
  * `slot_constraint`: `none`, or `label = value; label = value;` with labels from the set and
    values free (SF): label trie -> separator tokens -> value (>= 1 non-space token, no EOS) until
    a token ending in ';' -> another label or EOS. A token may hold the whole value and its ';'
    (`\u2581peter;`: BPE vocabularies merge them).

Limits: only the canonical tokenization of each label is allowed, not every segmentation of the
same string. Class labels are tokenized on their own, as targets are. Slot labels and the '='
are tokenized on their own and after a space (`_spellings`: byte-level BPE spells the two
differently, and a target holds both); a value cannot contain ';', and a value token whose
piece holds ';' anywhere but at its end is banned; values are not length-limited except by
`max_new_tokens` (an unterminated last value is cut there).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from speechverse_jax.data import tasks
from speechverse_jax.data.tokenizer import TextEncoder

DONE, START = 0, 1
_SPACE_MARKS = "\u2581\u0120 "  # sentencepiece's and byte-level BPE's (GPT-2, Llama 3) word-start marks
_NO_TOKEN = np.iinfo(np.int32).max  # edge padding: out of range, dropped by the scatter

Encode = Callable[[str], Sequence[int]]


class Constraint(NamedTuple):
    """A token automaton (a pytree of int32 arrays): see the module docstring."""

    default_next: jax.Array  # [S]
    edge_tokens: jax.Array  # [S, M]
    edge_next: jax.Array  # [S, M]


def next_states(c: Constraint, states: jax.Array, vocab_size: int) -> jax.Array:
    """states `[n]` -> next state for every token `[n, vocab_size]` (-1: token not allowed)."""

    def row(s):
        base = jnp.full((vocab_size,), c.default_next[s], jnp.int32)
        return base.at[c.edge_tokens[s]].set(c.edge_next[s], mode="drop")

    return jax.vmap(row)(states)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Automaton:
    """Host-side builder: states with a default transition and per-token edges."""

    def __init__(self):
        self.default: List[int] = [-1, -1]  # DONE, START
        self.edges: List[Dict[int, int]] = [{}, {}]

    def new_state(self, default: int = -1) -> int:
        self.default.append(default)
        self.edges.append({})
        return len(self.edges) - 1

    def add_edge(self, s: int, token: int, nxt: int) -> None:
        old = self.edges[s].get(int(token))
        if old is not None and old != nxt:
            raise ValueError(f"constraint: token {token} leads to two different places (labels clash)")
        self.edges[s][int(token)] = nxt

    def add_path(self, s: int, tokens: Sequence[int], end: Optional[int] = None) -> int:
        """Follow or create edges from s along tokens (the last one into `end` if given); -> last state."""
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            nxt = self.edges[s].get(int(tok))
            if nxt is None:
                nxt = end if (last and end is not None) else self.new_state()
                self.edges[s][int(tok)] = nxt
            elif last and end is not None and nxt != end:
                raise ValueError(f"constraint: token path {list(tokens)} clashes with another label")
            s = nxt
        return s

    def freeze(self) -> Constraint:
        n = _pow2(len(self.edges))
        m = _pow2(max(1, max(len(e) for e in self.edges)))
        default = np.full((n,), -1, np.int32)
        tokens = np.full((n, m), _NO_TOKEN, np.int32)
        nexts = np.full((n, m), -1, np.int32)
        for s, edges in enumerate(self.edges):
            default[s] = self.default[s]
            for j, (tok, nxt) in enumerate(sorted(edges.items())):
                tokens[s, j], nexts[s, j] = tok, nxt
        return Constraint(jnp.asarray(default), jnp.asarray(tokens), jnp.asarray(nexts))


def _encode_all(labels: Sequence[str], encode: Encode) -> List[List[int]]:
    if not labels:
        raise ValueError("constraint: the label set is empty")
    out = []
    for label in labels:
        ids = [int(i) for i in encode(label)]
        if not ids:
            raise ValueError(f"constraint: label {label!r} encodes to no tokens")
        out.append(ids)
    return out


def label_constraint(labels: Sequence[str], encode: Encode, eos_id: int) -> Constraint:
    """Outputs restricted to exactly one of `labels` followed by EOS.

    encode: text -> token ids without EOS, as targets are tokenized (see `tokenizer_fns`).
    """
    a = _Automaton()
    for ids in _encode_all(labels, encode):
        a.add_edge(a.add_path(START, ids), eos_id, DONE)
    return a.freeze()


def _spellings(text: str, encode: Encode) -> List[List[int]]:
    """The token ids of `text` where a target holds it: alone (at the answer's start) and after a
    space (`; date = ...`). Sentencepiece spells both alike (`\u2581date`); byte-level BPE does not
    (`da te` alone, `\u0120date` after a space), and a target holds both."""
    out: List[List[int]] = []
    for ids in _encode_all([text], encode) + [[int(i) for i in encode(" " + text)]]:
        if ids and ids not in out:
            out.append(ids)
    return out


def slot_constraint(slot_labels: Sequence[str], encode: Encode, pieces: Sequence[Optional[str]], eos_id: int,
                    pad_id: int, none_text: str = "none", separator: str = "=") -> Constraint:
    """`none`, or `label = value; ...` with labels from `slot_labels` and free values (SF format).

    pieces: the token strings by id (`tokenizer.convert_ids_to_tokens`), to find the tokens that
    hold ';'.
    """
    a = _Automaton()
    a.add_edge(a.add_path(START, _encode_all([none_text], encode)[0]), eos_id, DONE)
    labels_root = a.new_state()  # a template: START and `after_value` copy its edges
    value = a.new_state()  # inside a value: any token stays here by default
    a.default[value] = value
    value_empty = a.new_state(default=value)  # right after the separator: the value needs a token
    after_value = a.new_state()
    seps = _spellings(separator, encode)
    for label in slot_labels:
        for ids in _spellings(label, encode):
            end = a.add_path(labels_root, ids)
            for sep in seps:
                a.add_path(end, sep, end=value_empty)
    for s in (value_empty, value):
        a.add_edge(s, eos_id, -1)
        a.add_edge(s, pad_id, -1)
    for tok, piece in enumerate(pieces):
        if piece and not piece.strip(_SPACE_MARKS):  # a bare space piece is not yet a value
            a.add_edge(value_empty, tok, value_empty)
        if piece and ";" in piece:
            closes = piece.endswith(";") and piece.count(";") == 1
            a.add_edge(value, tok, after_value if closes else -1)
            # a piece that is a whole value and its ';' ('\u2581peter;', merged by BPE tokenizers such
            # as the demo LM's) closes it at once; a bare ';' would leave the value empty
            whole = closes and piece[:-1].strip(_SPACE_MARKS)
            a.add_edge(value_empty, tok, after_value if whole else -1)
    for tok, nxt in a.edges[labels_root].items():
        a.add_edge(START, tok, nxt)
        a.add_edge(after_value, tok, nxt)
    a.add_edge(after_value, eos_id, DONE)
    return a.freeze()


def tokenizer_fns(tokenizer) -> Tuple[Encode, List[Optional[str]]]:
    """(encode, pieces) of a Hugging Face tokenizer: encode gives target ids without EOS."""

    return TextEncoder(tokenizer=tokenizer).encode_without_eos, list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def load_labels(spec: Optional[str] = None, task: Optional[str] = None) -> List[str]:
    """Labels from `spec` (a file with one label per line, or 'a,b,c'), else the task registry's."""
    if spec:
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                labels = [line.strip() for line in f]
        else:
            labels = [s.strip() for s in spec.split(",")]
        labels = [s for s in labels if s]
    elif task is not None:
        labels = list(tasks.get_task(task).labels)
    else:
        raise ValueError("labels: give a label list/file or a task with a label set")
    if not labels:
        raise ValueError(f"labels: no labels found in {spec!r}" if spec else f"labels: task {task!r} has no label set")
    return labels


def check_labels_writable(task: str, labels: Sequence[str], encode: Encode, tokenizer) -> None:
    """Raise when a label does not survive encode -> decode (a character the tokenizer maps to
    <unk>): constrained outputs could then never equal that label, and its examples would all
    be scored wrong without a word."""
    bad = []
    for label in labels:
        ids = [int(i) for i in encode(label)]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if " ".join(back.split()) != " ".join(label.split()):
            bad.append(f"{label!r} -> {back!r} (pieces {tokenizer.convert_ids_to_tokens(ids)})")
    if bad:
        raise ValueError(f"constraint for task {task!r}: the tokenizer cannot write label(s) " + "; ".join(bad)
                         + ". Use a tokenizer whose vocabulary covers every character of the labels.")


def constraint_for_task(task: str, tokenizer, labels: Optional[Sequence[str]] = None, eos_id: Optional[int] = None,
                        pad_id: Optional[int] = None) -> Optional[Constraint]:
    """The constraint for a task: slot automaton for slot tasks, label trie when there is a label
    set (given, or in the registry), else None (free text)."""
    t = tasks.get_task(task)
    labels = list(labels) if labels else list(t.labels)
    if not labels:
        return None
    encode, pieces = tokenizer_fns(tokenizer)
    check_labels_writable(task, labels, encode, tokenizer)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    if t.kind == "slots":
        return slot_constraint(labels, encode, pieces, eos_id, pad_id)
    return label_constraint(labels, encode, eos_id)
