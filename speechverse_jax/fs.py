"""Paths that may be local or `gs://...`, through etils.epath (what orbax uses too)."""

from __future__ import annotations

from etils import epath


def path(p) -> epath.Path:
    return epath.Path(p)


def exists(p) -> bool:
    return epath.Path(p).exists()


def makedirs(p) -> epath.Path:
    out = epath.Path(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_text(p) -> str:
    return epath.Path(p).read_text()


def write_text(p, text: str) -> None:
    epath.Path(p).write_text(text)


def copy(src, dst) -> None:
    epath.Path(src).copy(epath.Path(dst), overwrite=True)


def is_remote(p) -> bool:
    """True for URLs (`gs://...`, any `scheme://`), False for local paths."""
    return "://" in str(p)


def abs_path(p) -> str:
    """Absolute local path; URLs unchanged (orbax wants absolute paths)."""
    import os

    return str(p) if is_remote(p) else os.path.abspath(str(p))
