"""Every expected error of sae-jax and its one-line rendering.

An expected error is bad input or a failed run, not a bug: the command line
prints `error: <one line>` and exits 1, where a bug keeps its traceback. Each
message names the file or key, what was expected and what was found.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


class ConfigError(ValueError):
    """A bad config: the message names the key path, what was expected and what was found."""


class SAEFormatError(ValueError):
    """A file that cannot be read or written as an SAE. The message is one line naming the file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient or input and the config says stop."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept (`checkpoint N kept; rerun the same command to resume`)."""


# Errors that mean "bad input or a failed run", as opposed to bugs (which keep their traceback).
EXPECTED = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError, RuntimeError)


def error(where: str | Path, key: str, expected: str, found: object) -> SAEFormatError:
    """`where: key: expected ..., found ...`, the one shape of every format message."""
    return SAEFormatError(f"{where}: {key}: expected {expected}, found {found}")


def first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, short enough for a one-line error (tensorstore's spec dump cut)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec=")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cause(e: BaseException) -> str:
    """Why a write failed, short: the OS's words where there are some, else `first_line(e)`.

    tensorstore reports I/O failures as ValueError with the errno at the end (`[os_error_code='28']`),
    safetensors as SafetensorError (`(os error 28)`).
    """
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(e))
    return os.strerror(int(code.group(1) or code.group(2))) if code else first_line(e)


def choices(names: Iterable[str], found: str, limit: int = 8) -> str:
    """`did you mean 'x'?` when one name is close to `found`, else the first `limit` names."""
    names = sorted(names)
    close = difflib.get_close_matches(found, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(names[:limit])
    return f"one of {shown}" + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def message(e: BaseException, limit: int = 400) -> str:
    """The one line a user sees for an expected error, cut at `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(main: Callable[[], int], prog: str = "") -> int:
    """Run `main`; an expected error prints `[prog: ]error: <one line>` to stderr and returns 1 (130 on Ctrl-C)."""
    prefix = f"{prog}: " if prog else ""
    try:
        return main()
    except KeyboardInterrupt as e:
        print(f"\n{prefix}interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except EXPECTED as e:
        print(f"{prefix}error: {message(e)}", file=sys.stderr)
        return 1
