"""Logging: one file per container in the state dir (0600), syslog when there is one,
and warnings on stderr at the hook (runc shows them; crun drops them, hence the file)."""

from __future__ import annotations

import os
import stat
import sys
import time

from .errors import StateDirError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
# <syslog.h>: LOG_USER and the priorities logging.handlers.SysLogHandler gives these levels.
SYSLOG_USER = 1
SYSLOG_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3}


def _open_log_file(path: str) -> int:
    # O_NONBLOCK: opening a FIFO left in the log's place must fail (ENXIO), not wait.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise StateDirError(f"cannot open the log {path}: {e.strerror} (a symlink or FIFO is refused)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateDirError(f"cannot open the log {path}: not a regular file")
    return fd


class HookLog:
    """The log of every process of the hook: prestart, poststop, the supervisor and the core
    (which inherits it), without the logging package: ~5 ms of every container's start and
    stop, and ~0.6 MiB of every forwarded container's memory (issue 12). Lines as logging's
    FORMAT writes them into the container's log, syslog when there is one (as SysLogHandler
    frames it), warnings on stderr when asked.
    Syslog is a copy: sent non-blocking (a syslog that does not read, its queue full at
    net.unix.max_dgram_qlen, must not hold up a start or stop the core in its loop: the line
    is dropped there, never from the file); a syslog that went away (journald restarted) is
    connected again, once per line, except once sealed: the core's sandbox forbids socket()."""

    def __init__(self, path: str | None, level: str, *, stderr: bool) -> None:
        self.level = LEVELS.get(level.upper(), 20)
        self.stderr = stderr
        self.fd = -1 if path is None else _open_log_file(path)
        self.sealed = False
        self.syslog = _syslog_socket() if os.path.exists("/dev/log") else None

    def seal(self) -> None:
        """From here on this process makes no socket (the core, before its sandbox)."""
        self.sealed = True

    def _log(self, levelname: str, message: str, args: tuple[object, ...]) -> None:
        if LEVELS[levelname] < self.level:
            return
        try:
            text = message % args if args else message
        except (TypeError, ValueError):  # a bug in a log call must not end the process
            text = f"{message} {args!r}"
        if self.syslog is not None:
            self._to_syslog(levelname, text)
        if self.fd >= 0:
            try:
                os.write(self.fd, (format_line(levelname, text) + "\n").encode(errors="replace"))
            except OSError:
                pass
        if self.stderr and LEVELS["WARNING"] <= LEVELS[levelname] < LEVELS["ERROR"]:
            print(f"oci-portfwd-hook: {levelname}: {text}", file=sys.stderr)

    def _to_syslog(self, levelname: str, text: str) -> None:
        priority = (SYSLOG_USER << 3) | SYSLOG_PRIORITIES[levelname]
        # The pid of the process that logs (the core is a fork of the supervisor).
        line = f"<{priority}>oci-portfwd-hook[{os.getpid()}]: {text}\x00".encode()
        try:
            self.syslog.send(line)  # type: ignore[union-attr]
        except BlockingIOError:
            pass  # the syslog does not read: dropped there, kept in the file
        except OSError:
            if self.sealed:
                return
            fresh = _syslog_socket()
            if fresh is not None:
                self.syslog.close()  # type: ignore[union-attr]
                self.syslog = fresh
                try:
                    fresh.send(line)
                except OSError:
                    pass

    def debug(self, message: str, *args: object) -> None:
        self._log("DEBUG", message, args)

    def info(self, message: str, *args: object) -> None:
        self._log("INFO", message, args)

    def warning(self, message: str, *args: object) -> None:
        self._log("WARNING", message, args)

    def error(self, message: str, *args: object) -> None:
        self._log("ERROR", message, args)

    def exception(self, message: str, *args: object) -> None:
        """An error with the traceback of the exception being handled (a bug)."""
        self._log("ERROR", message, args)
        error = sys.exc_info()[1]
        if self.fd >= 0 and error is not None:
            os.write(self.fd, format_exception(error).encode(errors="replace"))

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()
            self.syslog = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _syslog_socket() -> _socket.socket | None:
    import _socket  # noqa: PLC0415 - socket's enums are not needed to send a datagram

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    try:
        sock.connect("/dev/log")
    except OSError:
        sock.close()
        return None
    return sock


def format_exception(error: BaseException) -> str:
    """A bug's traceback as the traceback module prints it, less the source lines: without
    that module (with linecache and tokenize it keeps re loaded: memory of every forwarded
    container), and without reading source files, which the core's sandbox cannot open."""
    # The traceback module prints the innermost cause first: each cause goes in front.
    out = ""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = ["Traceback (most recent call last):\n"]
        tb = current.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n')
            tb = tb.tb_next
        kind, text = type(current), str(current)
        name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
        lines.append(f"{name}: {text}\n" if text else f"{name}\n")
        out = "".join(lines) + out
        if current.__cause__ is not None:
            out = "\nThe above exception was the direct cause of the following exception:\n\n" + out
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            out = "\nDuring handling of the above exception, another exception occurred:\n\n" + out
            current = current.__context__
        else:
            current = None
    return out


def format_line(level: str, message: str, when: float | None = None) -> str:
    """A line as FORMAT writes it (logging's default asctime: local time, milliseconds)."""
    now = time.time() if when is None else when
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{stamp},{int((now % 1) * 1000):03d} {os.getpid()} {level} {message}"


def append_line(path: str, level: str, message: str) -> None:
    """One line in a container's log, formatted as its own lines are (for poststop, which
    does not open the log as a logger: the file only, no second syslog line)."""
    line = format_line(level, message)
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

