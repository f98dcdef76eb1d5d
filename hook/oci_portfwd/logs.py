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
    import logging
    import socket

FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
# <syslog.h>: LOG_USER and the priorities logging.handlers.SysLogHandler gives these levels.
SYSLOG_USER = 1
SYSLOG_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3}


def open_log(path: str | None, level: str, *, stderr: bool) -> logging.Logger:
    """The long-lived processes' logger (supervisor once the hook returned, core)."""
    import logging  # noqa: PLC0415 - the hook's own paths log through HookLog, without it

    # A fresh logger object per call: forked children re-open their own handlers, and no
    # state is shared through logging's module-level registry.
    logger = logging.Logger("oci-portfwd", level=level.upper())
    if path is not None:
        fd = _open_log_file(path)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    if os.path.exists("/dev/log"):
        syslog = _syslog_handler()
        if syslog is not None:
            logger.addHandler(syslog)
    if stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        # Errors reach stderr as the CLI's single line; here only warnings.
        console.addFilter(lambda record: record.levelno < logging.ERROR)
        console.setFormatter(logging.Formatter("oci-portfwd-hook: %(levelname)s: %(message)s"))
        logger.addHandler(console)
    return logger


def _syslog_handler() -> logging.Handler | None:
    """A handler for /dev/log (the lines HookLog sends, without logging.handlers' pickle,
    queue and threading) that never stalls its process and, once sealed, never makes a
    socket. Syslog is a copy: the container's log file has every line.
    - Non-blocking: a syslog that does not read (stuck on a full disk) fills the socket's queue
      (net.unix.max_dgram_qlen, 10 here) and a blocking send would stop the forwarding core in
      the middle of its loop. A line that does not fit is dropped from syslog.
    - Sealed (the core's sandbox forbids socket()): a syslog that went away (journald
      restarted) is not reconnected, which would end the core; its lines go on into the file.
      Unsealed (the supervisor), one reconnect per line that fails."""
    import logging  # noqa: PLC0415

    sock = _syslog_socket()
    if sock is None:
        return None

    class Syslog(logging.Handler):
        def __init__(self, sock: socket.socket) -> None:
            super().__init__()
            self.sock = sock
            self.sealed = False
            self.ident = f"oci-portfwd-hook[{os.getpid()}]: "

        def emit(self, record: logging.LogRecord) -> None:
            priority = (SYSLOG_USER << 3) | SYSLOG_PRIORITIES.get(record.levelname, 3)
            try:
                data = f"<{priority}>{self.ident}{record.getMessage()}\x00".encode()
            except Exception:  # noqa: BLE001 - a bad format string, as logging reports it
                self.handleError(record)
                return
            try:
                self.sock.send(data)
            except BlockingIOError:
                pass  # the syslog does not read: dropped here, kept in the file
            except OSError:
                if self.sealed:
                    return
                fresh = _syslog_socket()
                if fresh is not None:
                    self.sock.close()
                    self.sock = fresh
                    try:
                        self.sock.send(data)
                    except OSError:
                        pass

        def close(self) -> None:
            self.sock.close()
            super().close()

    return Syslog(sock)


def _syslog_socket() -> socket.socket | None:
    import socket  # noqa: PLC0415

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect("/dev/log")
    except OSError:
        sock.close()
        return None
    return sock


def seal_syslog(logger: logging.Logger) -> None:
    """Before the core's sandbox: its syslog handler must not make a socket any more."""
    for handler in logger.handlers:
        if hasattr(handler, "sealed"):
            handler.sealed = True


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
    """What open_log gives, for the hook's short life (prestart, poststop, the supervisor
    until the hook returns), without the logging package: ~5 ms of every container's start
    and stop with threading, traceback & co. (issue 12). The same lines in the container's
    log, syslog when there is one (as SysLogHandler writes it), warnings on stderr."""

    def __init__(self, path: str | None, level: str, *, stderr: bool) -> None:
        self.level = LEVELS.get(level.upper(), 20)
        self.stderr = stderr
        self.fd = -1 if path is None else _open_log_file(path)
        self.syslog = None
        if os.path.exists("/dev/log"):
            import _socket  # noqa: PLC0415 - socket's enums are not needed to send a datagram

            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            # Non-blocking, as in open_log: a syslog that does not read must not hold up a
            # container's start; a line that does not fit is dropped (the file has it).
            sock.setblocking(False)
            try:
                sock.connect("/dev/log")
            except OSError:
                sock.close()
            else:
                self.syslog = sock
        self.ident = f"oci-portfwd-hook[{os.getpid()}]: "

    def _log(self, levelname: str, message: str, args: tuple[object, ...]) -> None:
        if LEVELS[levelname] < self.level:
            return
        text = message % args if args else message
        if self.syslog is not None:
            priority = (SYSLOG_USER << 3) | SYSLOG_PRIORITIES[levelname]
            try:
                self.syslog.send(f"<{priority}>{self.ident}{text}\x00".encode())
            except OSError:
                pass
        if self.fd >= 0:
            try:
                os.write(self.fd, (format_line(levelname, text) + "\n").encode(errors="replace"))
            except OSError:
                pass
        if self.stderr and LEVELS["WARNING"] <= LEVELS[levelname] < LEVELS["ERROR"]:
            print(f"oci-portfwd-hook: {levelname}: {text}", file=sys.stderr)

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
        import traceback  # noqa: PLC0415 - only for bugs

        self._log("ERROR", message, args)
        if self.fd >= 0:
            os.write(self.fd, traceback.format_exc().encode(errors="replace"))

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()
            self.syslog = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def close_log(logger: logging.Logger | HookLog) -> None:
    if isinstance(logger, HookLog):
        logger.close()
        return
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
