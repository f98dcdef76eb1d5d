"""Waiting for descriptors to become readable, outside the core's event loop.

poll(), not select(): select() cannot take a descriptor numbered 1024 or more, and a
container with ~1,000 published ports pushes the hook's and the supervisor's pipes there.
"""

from __future__ import annotations

import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


def wait_readable(fds: Iterable[int], timeout: float | None) -> set[int]:
    """The descriptors among `fds` that are readable (or hung up) within `timeout` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return {fd for fd, _events in poller.poll(ms)}
