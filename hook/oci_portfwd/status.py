"""One-line messages up a pipe: core → supervisor → hook.

    pid <pid> <start_time>     the supervisor's identity (first line to the hook)
    ready                      every port is served
    error <message>            it failed; the message is for the user
"""

from __future__ import annotations

import os
import time

from .polling import wait_readable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .stats import Counters


class StatusWriter:
    def __init__(self, fd: int, counters: Counters | None = None) -> None:
        self.fd = fd
        self.said_ready = False
        # The core's traffic counters, shared with the supervisor (stats.py); not lines.
        self.counters = counters

    def send(self, line: str) -> None:
        if self.fd < 0:
            return
        data = (" ".join(line.split("\n")) + "\n").encode()
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # the reader gave up (timed out): nothing left to tell

    def ready(self) -> None:
        # Said once: a driver may say it early (deferred start) and again when serving.
        if not self.said_ready:
            self.said_ready = True
            self.send("ready")

    def error(self, message: str) -> None:
        self.send(f"error {message}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StatusReader:
    __slots__ = ("fd", "buffered", "eof")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffered = b""
        self.eof = False

    def read_line(self, deadline: float) -> str | None:
        """The next line, or None at EOF; raises TimeoutError after `deadline`."""
        while b"\n" not in self.buffered:
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if wait_readable([self.fd], remaining):
                self.feed()
        line, _, self.buffered = self.buffered.partition(b"\n")
        return line.decode(errors="replace")

    def feed(self) -> None:
        chunk = os.read(self.fd, 4096)
        if chunk:
            self.buffered += chunk
        else:
            self.eof = True

    def lines(self) -> list[str]:
        """Complete lines buffered so far (after feed())."""
        *complete, self.buffered = self.buffered.split(b"\n")
        return [line.decode(errors="replace") for line in complete]
