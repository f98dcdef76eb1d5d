"""Traffic figures of one core, for `oci-portfwd-hook ps`.

The core counts into a page of shared memory that the supervisor mapped before forking it:
one addition per splice or datagram, no system call and no message per event. The page is a
file beside the state file (statefile.counters_path), mapped MAP_SHARED: `ps` reads it
there, so nobody wakes to publish figures, and it outlives every core (a killed core's
figures are kept to its last splice; a restarted core counts on in the same page, once the
supervisor has zeroed `tcp_open`: the dead core's connections are gone). The supervisor
(portfwd-keeper) holds no mapping between restarts: the file is the page.
"""

from __future__ import annotations

import os
import stat

FIELDS = (
    "tcp_open",
    "tcp_total",
    "tcp_unanswered",  # dials refused in every family: the client got a reset
    "bytes_to_container",
    "bytes_to_client",
    "udp_sessions",
    "udp_datagrams",
)
TCP_OPEN, TCP_TOTAL, TCP_UNANSWERED, TO_CONTAINER, TO_CLIENT, UDP_SESSIONS, UDP_DATAGRAMS = range(len(FIELDS))
# Connections the relay threads in C (native_relay.py) have closed, and those they accepted
# themselves: slots of their own, so that no slot has two writers (the Python loop counts
# tcp_open and tcp_total up, the threads these). tcp_open as shown is tcp_open + accepted -
# closed; tcp_total, tcp_total + accepted.
RELAY_CLOSED = len(FIELDS)
RELAY_ACCEPTED = len(FIELDS) + 1
SLOTS = len(FIELDS) + 2

Counters = memoryview  # signed 64-bit integers, indexed by the constants above


def new_counters() -> Counters:
    """A zeroed page shared with the children forked after this call."""
    import mmap  # noqa: PLC0415 - only the supervisor and the core need it

    return memoryview(mmap.mmap(-1, mmap.PAGESIZE)).cast("q")


def counters_file(path: str, *, fresh: bool) -> Counters:
    """The forwarding's page, in the file at `path` (0600; zeroed when `fresh`)."""
    import mmap  # noqa: PLC0415

    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        return memoryview(mmap.mmap(fd, mmap.PAGESIZE)).cast("q")
    finally:
        os.close(fd)


def read_file(path: str) -> list[int] | None:
    """The figures in a forwarding's page (for `ps`), or None without one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 8 * SLOTS)  # each slot is one aligned 8-byte store: never torn
    finally:
        os.close(fd)
    if len(data) != 8 * SLOTS:
        return None
    slots = memoryview(data).cast("q").tolist()
    accepted = slots.pop(RELAY_ACCEPTED)
    slots[TCP_OPEN] += accepted - slots.pop(RELAY_CLOSED)
    slots[TCP_TOTAL] += accepted
    return slots


def forget_open(counts: Counters) -> None:
    """A dead core's connections are gone: tcp_open shows 0, tcp_total keeps them (the
    supervisor, before it starts the next core on the same page)."""
    counts[TCP_TOTAL] += counts[RELAY_ACCEPTED]
    counts[TCP_OPEN] = counts[RELAY_CLOSED] = counts[RELAY_ACCEPTED] = 0


def as_dict(values: list[int]) -> dict[str, int]:
    return dict(zip(FIELDS, values, strict=True))
