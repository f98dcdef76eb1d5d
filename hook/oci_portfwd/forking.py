"""Forked children that never return into their parent's code."""

from __future__ import annotations

import os
from collections.abc import Callable


def fork_child(body: Callable[[], int]) -> int:
    """Fork; the child runs `body` and exits with its code, or with 1 and the traceback on
    its stderr (the log) when it raised. Returns the child's pid to the parent."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = body()
    except BaseException:  # noqa: BLE001 - a bug: its traceback goes to the log
        import traceback  # noqa: PLC0415 - only for bugs

        traceback.print_exc()
    finally:
        os._exit(code)
