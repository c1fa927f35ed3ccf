"""Bad-input accounting shared by the manifest reader and the pipeline.

Every example that does not reach a batch is counted under a reason. Bad input (the file or
line is broken) and filters (the example is fine but excluded by the config) are kept apart:

    BAD_INPUT: malformed_json, missing_field, bad_field, unknown_task, unknown_label,
               missing_file, unreadable_audio, empty_audio, nonfinite_audio, duration_mismatch
    FILTERS:   audio_too_long, target_too_long, instruction_too_long, task_not_in_mix,
               shard_remainder

`DataStats` is a plain counter with the first offenders kept (manifest, line, message) and
logged; `strict=True` turns bad input into a `DataError` naming the manifest file and line.
"""

from __future__ import annotations

import collections
import logging
from typing import Dict, List, Tuple

log = logging.getLogger(__name__)

BAD_INPUT = (
    "malformed_json", "missing_field", "bad_field", "unknown_task", "unknown_label",
    "missing_file", "unreadable_audio", "empty_audio", "nonfinite_audio", "duration_mismatch",
)
FILTERS = (
    "audio_too_long", "target_too_long", "instruction_too_long", "task_not_in_mix", "shard_remainder",
)


class DataError(ValueError):
    """Bad input in strict mode; the message starts with `manifest:line`."""

    def __init__(self, reason: str, where: str, message: str):
        self.reason, self.where = reason, where
        super().__init__(f"{where}: {reason}: {message}")


def where(manifest: str, line: int) -> str:
    """`path:line` (1-based line), the location format of every message."""
    return f"{manifest}:{line}"


class DataStats:
    """Counts of skipped / filtered / chunked examples by reason, plus the first offenders.

    `record` raises `DataError` for bad input when `strict`; filters are only counted.
    """

    def __init__(self, strict: bool = False, max_logged: int = 10):
        self.strict, self.max_logged = strict, max_logged
        self.counts: collections.Counter = collections.Counter()
        self.first: List[Tuple[str, str, str]] = []  # (reason, where, message)

    def record(self, reason: str, where: str, message: str = "", n: int = 1) -> None:
        if self.strict and reason in BAD_INPUT:
            raise DataError(reason, where, message)
        self.counts[reason] += n
        if reason in BAD_INPUT and len(self.first) < self.max_logged:
            self.first.append((reason, where, message))
            log.warning("skipping %s: %s: %s", where, reason, message)

    def merge(self, other: "DataStats") -> "DataStats":
        self.counts.update(other.counts)
        room = self.max_logged - len(self.first)
        self.first.extend(other.first[: max(room, 0)])
        return self

    def as_dict(self) -> Dict[str, int]:
        """`{'skipped/<reason>': n, 'filtered/<reason>': n, 'chunked/...': n}`, zero counts left out."""
        out = {}
        for reason, n in sorted(self.counts.items()):
            if not n:
                continue
            kind = "skipped" if reason in BAD_INPUT else "filtered" if reason in FILTERS else "info"
            out[f"{kind}/{reason}"] = int(n)
        return out

    def bad_input(self) -> int:
        return sum(n for r, n in self.counts.items() if r in BAD_INPUT)

    def summary(self, title: str = "data") -> str:
        """One readable paragraph: counts by reason, then the first offenders."""
        d = self.as_dict()
        lines = [f"{title}: " + (", ".join(f"{k}={v}" for k, v in d.items()) if d else "nothing skipped")]
        lines += [f"  {w}: {r}: {m}" for r, w, m in self.first]
        return "\n".join(lines)

    def copy(self) -> "DataStats":
        out = DataStats(self.strict, self.max_logged)
        return out.merge(self)

    @classmethod
    def from_counts(cls, counts: Dict[str, int], strict: bool = False) -> "DataStats":
        out = cls(strict)
        out.counts.update({k: int(v) for k, v in counts.items()})
        return out

