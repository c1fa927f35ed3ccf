"""Regex rules over param paths: one meaning everywhere.

A param path is the '/'-joined key of a leaf (`t5/encoder/block_0/self_attention/q/lora_a`, see
`speechverse_jax.tree.flatten`); a module path is the same without the leaf name
(`t5/encoder/block_0/self_attention/q`). Every rule in the project is matched with
`re.fullmatch` against the whole path: `downsampler/.*` matches everything under the downsampler,
`downsampler` alone matches nothing (no leaf is called that). The places that use rules:

  train.param_rules     ordered [(regex, 'train' | 'freeze')] over param paths; the first match
                        wins and every param must be matched (train/optimizer.py)
  model.lora.target_regex   module paths of the Dense layers that get LoRA adapters
                        (models/layers.py)
  mesh.rules            logical axis name -> mesh axes (not regexes; train/partitioning.py)

A rule that matches nothing is a mistake (a typo, or a rule for another model): `check_used`
raises naming it.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Optional, Sequence, Tuple


@functools.lru_cache(maxsize=256)
def compile_rule(pattern: str, where: str = "rule") -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a valid regex: {e}") from None


def matches(pattern: str, path: str) -> bool:
    """`re.fullmatch` of one rule against one whole path."""
    return compile_rule(pattern).fullmatch(path) is not None


def first_match(rules: Sequence[Tuple[str, str]], path: str) -> Optional[Tuple[int, str]]:
    """(index, value) of the first (pattern, value) rule whose pattern fullmatches `path`."""
    for i, (pattern, value) in enumerate(rules):
        if matches(pattern, path):
            return i, value
    return None


def check_used(patterns: Iterable[str], paths: Iterable[str], where: str) -> None:
    """ValueError naming every pattern that fullmatches none of `paths`."""
    paths = list(paths)
    unused = [p for p in patterns if not any(matches(p, x) for x in paths)]
    if unused:
        examples = ", ".join(paths[:3])
        raise ValueError(f"{where}: these rules match no path (rules match whole paths with re.fullmatch, "
                         f"e.g. {examples}): {unused}")
