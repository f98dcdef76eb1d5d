"""Inside the container's netns (the dialer): container-side connections are not paced.

A forwarded TCP connection's container-side half goes from the core to the service over the
container's lo: it never leaves this machine. Its congestion control is the netns's default,
which a new netns copies from the host's, and where that is BBR every segment is paced: an
hrtimer per socket, segments sent from a softirq on whichever CPU it fires, out of order with
those the sending thread puts on lo itself (spurious retransmissions). There is no link to pace
for on lo. On a 2-CPU VM whose host default is bbr (docs/data-path.md), iperf3 through the relay
gave 16-18 Gbit/s with BBR on this half and 31-37 with cubic or reno everywhere; direct
loopback 21 with BBR.

So where the netns's default paces (BBR, v1 to v3, is the only one in mainline that asks for
pacing), the dialer gives its TCP sockets cubic, or reno where cubic is not available to it
(reno is built in and always allowed). Sockets facing clients (accepted by the core) keep the
host's choice: a client may be across a real network, where pacing is what the host wants.
"""

from __future__ import annotations

import _socket

PACING_PREFIX = "bbr"
UNPACED = ("cubic", "reno")
NAME_MAX = 16  # TCP_CA_NAME_MAX


def current(sock: _socket.socket) -> str:
    raw = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_CONGESTION, NAME_MAX)
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def set_on(sock: _socket.socket, name: str) -> None:
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_CONGESTION, name.encode())


def unpaced_choice() -> tuple[str, str | None]:
    """(this netns's default, the algorithm container-side sockets get instead, or None to
    keep the default: it does not pace, or nothing else may be set here)."""
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            probe = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        except OSError:
            continue  # a family the kernel was built or booted without
        try:
            default = current(probe)
            if not default.startswith(PACING_PREFIX):
                return default, None
            for name in UNPACED:
                try:
                    set_on(probe, name)
                except OSError:
                    continue  # not built (ENOENT) or not allowed to us (EPERM)
                return default, name
            return default, None
        finally:
            probe.close()
    return "", None
