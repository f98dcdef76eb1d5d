"""Logging: one file per container in the state dir (0600), syslog when there is one,
and warnings on stderr at the hook (runc shows them; crun drops them, hence the file)."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

from .errors import StateDirError

FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"


def open_log(path: Path | None, level: str, *, stderr: bool) -> logging.Logger:
    # A fresh logger object per call: forked children re-open their own handlers, and no
    # state is shared through logging's module-level registry.
    logger = logging.Logger("oci-portfwd", level=level.upper())
    if path is not None:
        # O_NONBLOCK: opening a FIFO left in the log's place must fail (ENXIO), not wait.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise StateDirError(f"cannot open the log {path}: {e.strerror} (a symlink or FIFO is refused)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StateDirError(f"cannot open the log {path}: not a regular file")
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    if os.path.exists("/dev/log"):
        # Imported only here: logging.handlers brings pickle, queue and threading along.
        from logging.handlers import SysLogHandler  # noqa: PLC0415

        try:
            syslog = SysLogHandler(address="/dev/log")
        except OSError:
            pass
        else:
            syslog.ident = f"oci-portfwd-hook[{os.getpid()}]: "
            logger.addHandler(syslog)
    if stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        # Errors reach stderr as the CLI's single line; here only warnings.
        console.addFilter(lambda record: record.levelno < logging.ERROR)
        console.setFormatter(logging.Formatter("oci-portfwd-hook: %(levelname)s: %(message)s"))
        logger.addHandler(console)
    return logger


def append_line(path: Path, level: str, message: str) -> None:
    """One line in a container's log, formatted as its own lines are (for poststop, which
    does not open the log as a logger: the file only, no second syslog line)."""
    line = logging.Formatter(FORMAT).format(
        logging.LogRecord("oci-portfwd", logging.getLevelName(level), "", 0, message, None, None)
    )
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return  # the log cannot be written: poststop still says so on stderr and syslog
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.write(fd, (line + "\n").encode(errors="replace"))
    finally:
        os.close(fd)


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
