"""What every entry point shares: expected errors end the program with one line, no traceback."""

from __future__ import annotations

import sys
from typing import Callable

# Errors that mean "bad input or a failed run", as opposed to bugs (which keep their traceback).
EXPECTED = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError, RuntimeError, KeyboardInterrupt)


def fail_in_one_line(main: Callable[[], int]) -> int:
    """Run `main`; an expected error prints `error: <first line>` to stderr and returns 1 (130 on Ctrl-C)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
