"""A small epoll loop: fd → handler(events), plus timers."""

from __future__ import annotations

import itertools
import select
import time
from _heapq import heappop, heappush  # heapq.py's merge, nlargest, ...: 28 KiB of each core

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections is memory of every container (issue 12)
    from collections.abc import Callable

    Handler = Callable[[int], None]


class EventLoop:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.running = True

    def register(self, fd: int, events: int, handler: Handler) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int, handler: Handler | None = None) -> None:
        self.epoll.modify(fd, events)
        if handler is not None:
            self.handlers[fd] = handler

    def rebind(self, fd: int, handler: Handler) -> None:
        """Another handler for the same events, with no system call."""
        self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    def forget(self, fd: int) -> None:
        """For an fd about to be closed that no other process holds (this process made or
        accepted it after its last fork): close() itself drops it from the epoll set, so
        no epoll_ctl is needed, only the handler goes."""
        self.handlers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heappush(self.timers, (time.monotonic() + delay, next(self._seq), callback))

    def run(self) -> None:
        handlers = self.handlers
        poll = self.epoll.poll
        while self.running:
            timeout = self._run_due_timers()
            for fd, events in poll(timeout, 256):
                handler = handlers.get(fd)
                # An earlier handler in this batch may have closed this fd.
                if handler is not None:
                    handler(events)

    def _run_due_timers(self) -> float:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heappop(self.timers)
            callback()
        if not self.timers:
            return -1
        return max(0.0, self.timers[0][0] - time.monotonic())
