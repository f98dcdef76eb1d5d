"""Traffic figures of one core, for `oci-portfwd-hook ps`.

The core counts into a page of shared memory that the supervisor mapped before forking it
(MAP_SHARED | MAP_ANONYMOUS): one addition per splice or datagram, no system call and no
message per event. The supervisor reads the page when it wakes (at least once a second) to
update the state file, and once more after the core died: a killed core's figures are kept
to its last splice, and a restarted core counts from zero in a fresh page.
"""

from __future__ import annotations

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

Counters = memoryview  # signed 64-bit integers, indexed by the constants above


def new_counters() -> Counters:
    """A zeroed page shared with the children forked after this call."""
    import mmap  # noqa: PLC0415 - only the supervisor and the core need it

    return memoryview(mmap.mmap(-1, mmap.PAGESIZE)).cast("q")


def read(counts: Counters) -> list[int]:
    # Each slot is one aligned 8-byte store by the core: never torn.
    return counts[: len(FIELDS)].tolist()


def as_dict(values: list[int]) -> dict[str, int]:
    return dict(zip(FIELDS, values, strict=True))
