"""Binding the host side: one socket per (address, family, protocol).

Everything is bound before anything starts, and on the first failure every socket bound
so far is closed: a failed hook leaves no port behind.

The hook binds with `_socket`, the C module under `socket`: `import socket` brings enum and
selectors (~4 ms of every container start, issue 12). The core serves the same `_socket.socket`
objects: socket.socket adds nothing it uses (its methods are `_socket`'s), and the module would
be memory of every forwarded container.
"""

from __future__ import annotations

import _socket
import errno
import sys

from .congestion_control import unpace
from .errors import BindError
from .inet import is_loopback
from .netns_setup import reachable
from .values import Value

# struct linger {l_onoff 1, l_linger 0}, two C ints (struct's import stays off the start path).
LINGER_RESET = (1).to_bytes(4, sys.byteorder) + bytes(4)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .ports import PortMapping

LISTEN_BACKLOG = 4096


class BindTarget(Value):
    __slots__ = ("family", "address", "port", "proto", "mapping")

    def __init__(self, family: int, address: str, port: int, proto: str, mapping: PortMapping) -> None:
        self.family = family
        self.address = address
        self.port = port
        self.proto = proto
        self.mapping = mapping

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == _socket.AF_INET6 else self.address
        return f"{host}:{self.port}/{self.proto}"


class Listener:
    __slots__ = ("target", "sock", "unpaced")

    def __init__(self, target: BindTarget, sock: _socket.socket, unpaced: tuple[str, str] | None = None) -> None:
        self.target = target
        self.sock = sock  # non-blocking (SOCK_NONBLOCK): its timeout is 0, as the core wants it
        # (the host's congestion control, the one this loopback listener's connections get
        # instead: congestion_control.py), or None
        self.unpaced = unpaced

    def close(self) -> None:
        self.sock.close()


def ipv6_available() -> bool:
    """False when the kernel has no IPv6 or this netns has it disabled (no ::1)."""
    return reachable(_socket.AF_INET6, "::1")


def bind_targets(
    mappings: Iterable[PortMapping], ipv6_ok: bool, warn: Callable[[str], None]
) -> list[BindTarget]:
    targets = []
    skipped_v6 = []
    for m in mappings:
        if m.host_ip is None:
            targets.append(BindTarget(_socket.AF_INET, "0.0.0.0", m.host_port, m.proto, m))
            if ipv6_ok:
                targets.append(BindTarget(_socket.AF_INET6, "::", m.host_port, m.proto, m))
            else:
                skipped_v6.append(str(m))
        else:
            family = _socket.AF_INET6 if ":" in m.host_ip else _socket.AF_INET
            targets.append(BindTarget(family, m.host_ip, m.host_port, m.proto, m))
    if skipped_v6:
        warn(
            "IPv6 is not available on this host (no ::1); forwarding IPv4 only for "
            + ", ".join(skipped_v6)
        )
    return targets


def bind_all(targets: Iterable[BindTarget]) -> list[Listener]:
    bound: list[Listener] = []
    try:
        for target in targets:
            bound.append(Listener(target, *_bind_one(target)))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound


def _bind_one(t: BindTarget) -> tuple[_socket.socket, tuple[str, str] | None]:
    unpaced = None
    kind = _socket.SOCK_STREAM if t.proto == "tcp" else _socket.SOCK_DGRAM
    try:
        sock = _socket.socket(t.family, kind | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    except OSError as e:
        raise BindError(f"cannot create a socket for {t}: {e.strerror}") from None
    try:
        if t.family == _socket.AF_INET6:
            # Each family gets its own socket: the IPv4 one is bound separately.
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
        if t.proto == "tcp":
            # Rebinding right after a restart must not fail on TIME_WAIT; on Linux this
            # never lets two listeners share a port. Never on UDP: there it would.
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            # What every accepted socket inherits (the kernel clones them), set before the
            # kernel queues any connection (the core starts after the hook returned), at no
            # cost per connection: reset, not FIN, if the process holding it dies (a listener's
            # own close is unaffected); and no Nagle: the relay must not hold back what it was
            # given, or a message that reaches it in two parts (header and body written apart)
            # waits for the peer's ACK of the first, which a peer waiting for the rest delays
            # (~40 ms each). The dialer sets both on the container side.
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, LINGER_RESET)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            # Clients of a loopback address are on this machine: no pacing where the host's
            # default paces (congestion_control.py), inherited by every accepted socket.
            if is_loopback(t.address):
                unpaced = unpace(sock)
        # UDP keeps the kernel's default receive buffer (net.core.rmem_default). A 4 MiB one
        # (tried) queued tens of milliseconds of datagrams while the relay was busy and
        # delivered them late: after a client had gone, its stale datagrams reached a service
        # that had opened a new socket since (iperf3 then answered the old client and its next
        # test hung), and throughput was no better (docs/data-path.md). Late is worse than lost.
        sock.bind(socket_address(t.address, t.port))
        if t.proto == "tcp":
            sock.listen(LISTEN_BACKLOG)
    except NoSuchInterface as e:
        sock.close()
        raise BindError(f"cannot bind {t} (port request {t.mapping}): interface {e} does not exist") from None
    except OSError as e:
        sock.close()
        raise BindError(_explain(t, e)) from None
    return sock, unpaced


class NoSuchInterface(OSError):
    pass


def socket_address(address: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """bind()'s address. A scoped IPv6 address (fe80::1%eth0) goes as the 4-tuple with the
    interface's index: given as text, Python resolves it through getaddrinfo, which fails
    with EINVAL, or "Name or service not known" for a missing interface."""
    host, percent, scope = address.partition("%")
    if not percent:
        return (address, port)
    if scope.isdigit():
        return (host, port, 0, int(scope))
    try:
        return (host, port, 0, _socket.if_nametoindex(scope))
    except OSError:
        raise NoSuchInterface(scope) from None


def _explain(t: BindTarget, e: OSError) -> str:
    where = f"cannot bind {t} (port request {t.mapping})"
    if e.errno == errno.EADDRINUSE:
        return f"{where}: the address is already in use on the host"
    if e.errno == errno.EACCES:
        start = _unprivileged_port_start()
        if start is not None and t.port < start:
            return (
                f"{where}: permission denied; ports below {start} need privilege "
                f"(sysctl net.ipv4.ip_unprivileged_port_start={start})"
            )
        return f"{where}: permission denied"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {t.address} is not an address of this host"
    if e.errno == errno.ENODEV:
        return f"{where}: interface {t.address.partition('%')[2]} does not exist"
    return f"{where}: {e.strerror}"


def _unprivileged_port_start() -> int | None:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read(64).strip())
    except (OSError, ValueError):
        return None
