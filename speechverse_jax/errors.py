"""User errors versus programming errors, and the one-line form the command line prints.

A *user error* is anything the person running a command can fix: a bad flag, a missing or wrong
folder, a bad config value, a bad data row in strict mode, a checkpoint of another architecture,
a full disk. The CLI prints it as one line (`error: ...`) and exits with status 2. Anything else
(TypeError, KeyError, AttributeError, ...) is a bug and keeps its traceback.

In this code base a `ValueError` is the convention for "this input is wrong, and the message says
which file or field" (config checks, manifest and audio errors, `DataError`, `AudioError`), so it
counts as a user error too. `SPEECHVERSE_JAX_TRACEBACK=1` shows tracebacks for everything.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Raised where the fix is the user's; the message is complete and names the file / flag / field."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint written by another model architecture (or another config) than the one asked for."""


class ManifestChangedError(UserError):
    """The training manifests changed between a run's checkpoint and its resume."""


class MissingToolError(UserError, RuntimeError):
    """An external program (espeak-ng, ...) is not installed; the message says how to install it."""


class OutputMismatchError(UserError):
    """An output folder holds results of other inputs (e.g. eval --out of another checkpoint)."""


def _flag_errors() -> tuple:
    try:
        from absl import flags

        return (flags.Error,)
    except ImportError:  # pragma: no cover
        return ()


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT anywhere in the exception chain (orbax wraps writer errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError, FileExistsError) + _flag_errors()):
        return True
    return is_disk_full(exc)


def one_line(exc: BaseException, limit: int = 600) -> str:
    """The exception as one line: newlines folded into '; ', long messages shortened."""
    if is_disk_full(exc) and not isinstance(exc, UserError):
        text = f"no space left on device ({exc})"
    elif isinstance(exc, OSError) and exc.filename and exc.strerror and not isinstance(exc, UserError):
        text = f"{exc.filename}: {exc.strerror}"  # '/runs/x: Not a directory', not '[Errno 20] ...'
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:  # KeyError quotes its message
            text = str(exc.args[0])
    text = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def run_cli(func: Callable[..., int], *args: Any) -> int:
    """Call a sub-command; user errors become `error: <one line>` on stderr and exit status 2."""
    try:
        return func(*args)
    except Exception as e:  # noqa: BLE001 - sorted into user / programming errors below
        if os.environ.get("SPEECHVERSE_JAX_TRACEBACK") or not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
