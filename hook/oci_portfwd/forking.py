"""Forked children that never return into their parent's code."""

from __future__ import annotations

import os
from _signal import SIGKILL  # not signal: its enums are off the hook's path (issue 12)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


def fork_child(body: Callable[[], int], *, die_with_parent: bool = True) -> int:
    """Fork; the child runs `body` and exits with its code, or with 1 and the traceback on
    its stderr (the log) when it raised. Returns the child's pid to the parent.

    die_with_parent: the child gets SIGKILL when its parent dies (PR_SET_PDEATHSIG), and
    exits at once if the parent died before that was set: a parent that dies right after
    fork() would otherwise leave an orphan holding every listener (seen: cores of a crashed
    supervisor still bound to 1,024 ports an hour later)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid

    def child() -> int:
        if die_with_parent:
            from . import procctl  # noqa: PLC0415

            procctl.set_pdeathsig(SIGKILL)
            if os.getppid() != parent:
                return 1
        return body()

    exit_with(child)


def exit_with(body: Callable[[], int]) -> NoReturn:
    """Run `body` and end the process with its code (os._exit: nothing of the parent's is
    flushed or torn down twice), or with 1 and the traceback on stderr (the log) if it raised."""
    code = 1
    try:
        code = body()
    except BaseException as e:  # noqa: BLE001 - a bug: its traceback goes to the log
        from .logs import format_exception  # noqa: PLC0415 - only for bugs

        try:
            os.write(2, format_exception(e).encode(errors="replace"))
        except OSError:
            pass
    finally:
        os._exit(code)
