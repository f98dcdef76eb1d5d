"""In the core: which address a container-side socket is bound to, so that the service sees
the client (config `source_address: client`; client_routing.py makes it possible).

    same family          → the client's own address and port (loopback clients included)
    IPv4 client, IPv6-only service (family fallback)
                         → 64:ff9b::a.b.c.d (RFC 6052's prefix for IPv4 addresses in IPv6)
                           and the client's port; ::1 for a loopback client. ::ffff:a.b.c.d
                           cannot be a source on the wire: the kernel refuses the connect
                           (EAFNOSUPPORT), and a dual-stack service already sees it, since
                           it accepts the IPv4 dial itself.
    IPv6 client, IPv4-only service
                         → not carried (no IPv4 address stands for an IPv6 one): loopback,
                           logged once per host listener
Anything that fails (the routing is not ready, the address:port is taken in the container,
a port below 1024 when the core lacks the privilege, a UDP reply that would leave the
container by its own default route) dials from loopback as before, the connection is never
lost for it.
"""

from __future__ import annotations

import _socket  # not socket, ipaddress: their enums are memory of every container (issue 12)
import errno
import struct

from .inet import is_loopback, packed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .logs import HookLog

Address = tuple[object, ...]  # (host, port) or (host, port, flow, scope), as accept() gives
NAT64_PREFIX = bytes.fromhex("0064ff9b") + bytes(8)  # 64:ff9b::/96
# Binding errors that only mean "not for this connection".
BIND_FALLBACK_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM, errno.EINVAL}


def source_for(client: Address, target_family: int) -> tuple[str, int] | None:
    """The address to bind a container-side socket of `target_family` to, or None."""
    host, port = str(client[0]), int(client[1])  # type: ignore[call-overload]
    if len(client) > 3 and client[3]:
        return None  # a link-local client's scope names a host interface
    client_v6 = ":" in host
    if client_v6 == (target_family == _socket.AF_INET6):
        return host, port
    if client_v6:
        return None
    if is_loopback(host):
        return "::1", port
    return _socket.inet_ntop(_socket.AF_INET6, NAT64_PREFIX + packed(host)), port


class ReplyRoutes:
    """Where the container's netns routes a UDP service's reply to a client: RTM_GETROUTE on
    a netlink socket the dialer made in that netns (unprivileged: a query, no change)."""

    RTM_NEWROUTE, RTM_GETROUTE, NLMSG_ERROR = 24, 26, 2
    RTA_DST, RTA_IP_PROTO, RTA_SPORT = 1, 27, 28
    RTN_LOCAL = 2

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(1.0)
        self.seq = 0

    def local(self, family: int, client: str, service_port: int) -> bool:
        """Whether a UDP reply from `service_port` to `client` is delivered locally (to us)."""
        self.seq += 1
        dst = _socket.inet_pton(family, client)
        rtmsg = struct.pack("BBBBBBBBI", family, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0)
        attrs = (
            _rta(self.RTA_DST, dst)
            + _rta(self.RTA_IP_PROTO, bytes([_socket.IPPROTO_UDP]))
            + _rta(self.RTA_SPORT, struct.pack("!H", service_port))
        )
        body = rtmsg + attrs
        header = struct.pack("=IHHII", 16 + len(body), self.RTM_GETROUTE, 1, self.seq, 0)
        try:
            self.sock.send(header + body)
            while True:
                reply = self.sock.recv(65536)
                _length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply)
                if seq == self.seq:
                    break
        except OSError:
            return False
        if kind != self.RTM_NEWROUTE:
            return False  # NLMSG_ERROR: no route at all
        return reply[16 + 7] == self.RTN_LOCAL

    def close(self) -> None:
        self.sock.close()


def _rta(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


class Routing:
    """What the dialer reported about its routing; the socket pool fills it in when the
    report arrives, which is before the first socket it hands out."""

    __slots__ = ("ready", "replies")

    def __init__(self) -> None:
        self.ready: dict[int, bool] = {}
        self.replies: ReplyRoutes | None = None


class SourceBinder:
    """Binds one host listener's container-side sockets to its clients' addresses; says once
    per listener why a kind of client is seen as loopback."""

    def __init__(self, label: str, routing: Routing, log: HookLog) -> None:
        self.label = label
        self.routing = routing
        self.log = log
        self.said: set[str] = set()

    def bind(self, sock: _socket.socket, client: Address, target_family: int, service_port: int) -> bool:
        """Bind `sock` (not yet bound) so that the service sees `client`; False: it was left
        alone and the service will see loopback."""
        if not self.routing.ready.get(target_family):
            return False
        source = source_for(client, target_family)
        if source is None:
            if target_family == _socket.AF_INET and ":" in str(client[0]):
                self._once(
                    "v6-to-v4",
                    "IPv6 clients of %s reach an IPv4-only service: it sees them as 127.0.0.1 "
                    "(an IPv6 address cannot be carried over IPv4)",
                )
            return False
        if sock.type == _socket.SOCK_DGRAM and not self._udp_reply_is_local(target_family, source[0], service_port):
            return False
        try:
            # A TCP socket has SO_REUSEADDR from the dialer (it made it transparent): the
            # client may reuse its port while our last connection from it is in TIME_WAIT
            # here, and connect() then tells whether the 4-tuple is free.
            sock.bind(source)
        except OSError as e:
            if e.errno not in BIND_FALLBACK_ERRNOS:
                raise
            self.log.debug("%s: cannot dial from %s port %d (%s); the service sees loopback",
                           self.label, source[0], source[1], e.strerror)
            return False
        return True

    def _udp_reply_is_local(self, family: int, client: str, service_port: int) -> bool:
        routes = self.routing.replies
        if routes is not None and routes.local(family, client, service_port):
            return True
        self._once(
            f"udp-route-{family}",
            "UDP clients of %s are seen as loopback where the container routes the reply "
            f"elsewhere (it has a route of its own to the client, e.g. a default route); first: {client}",
        )
        return False

    def _once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.log.info(message, self.label)
