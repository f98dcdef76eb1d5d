"""Connections that never leave this machine are not paced.

A forwarded TCP connection's container-side half goes from the core to the service over the
container's lo. Its congestion control is the netns's default, which a new netns copies from
the host's, and where that is BBR every segment is paced: an hrtimer per socket, segments sent
from a softirq on whichever CPU it fires, out of order with those the sending thread puts on lo
itself (spurious retransmissions). There is no link to pace for on lo. On a 2-CPU VM whose host
default is bbr (docs/data-path.md), iperf3 through the relay gave 16-18 Gbit/s with BBR on this
half and 25-37 with cubic or reno everywhere; direct loopback 20-23 with BBR.

So where the default paces (BBR, v1 to v3, is the only one in mainline that asks for pacing):
  - the dialer gives the TCP sockets it makes cubic, or reno where cubic is not available to it
    (reno is built in and always allowed; cubic needs CAP_NET_ADMIN over the netns unless
    net.ipv4.tcp_allowed_congestion_control lists it);
  - a TCP listener bound to a loopback address (127.0.0.0/8, ::1) gets the same before it
    listens, and the sockets it accepts inherit it: its clients are on this machine. Set on an
    accepted socket instead, the new algorithm would not undo BBR's pacing (the socket keeps
    the pacing BBR asked for when it was initialised).
Other listeners keep the host's choice: a client may be across a real network, where pacing is
what the host's administrator wants; the service's own sockets are its business.
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


def unpace(sock: _socket.socket) -> tuple[str, str] | None:
    """If `sock`'s congestion control paces, give it one that does not, before it connects or
    listens: (the one it had, the one it got), or None when it kept its own (it does not pace,
    or nothing else may be set here)."""
    default = current(sock)
    if not default.startswith(PACING_PREFIX):
        return None
    for name in UNPACED:
        try:
            set_on(sock, name)
        except OSError:
            continue  # not built (ENOENT) or not allowed to us (EPERM)
        return default, name
    return None


def unpaced_choice() -> tuple[str, str] | None:
    """What `unpace` does to a TCP socket of this netns: (its default, what the dialer's TCP
    sockets get instead), or None to keep the default."""
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            probe = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        except OSError:
            continue  # a family the kernel was built or booted without
        try:
            return unpace(probe)
        finally:
            probe.close()
    return None
