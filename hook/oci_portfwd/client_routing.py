"""Inside the container's netns (the dialer): what lets the core dial from the client's address.

The core binds a container-side socket to the client's address and port before it connects,
so the service sees who is calling. That takes, in the container's netns:
  1. sockets with IP_TRANSPARENT / IPV6_TRANSPARENT (bind to a non-local address) and our
     SO_MARK, set here: both need CAP_NET_ADMIN, which the dialer holds in the container's
     user namespace and the core does not
  2. a table of ours with a `local` default route on lo (src 127.0.0.1 / ::1), so that a
     packet to the client's address is delivered locally, to our socket
  3. rule `fwmark MARK lookup TABLE` before main: our SYNs and datagrams, and with
     net.ipv4.tcp_fwmark_accept=1 the service's accepted socket (it inherits the mark of our
     SYN), and with net.ipv{4,6}.fwmark_reflect=1 the kernel's RSTs and ICMP errors that
     answer us (a refused dial must still be seen as refused)
  4. rule `ipproto udp sport PORT lookup TABLE` after main, per forwarded UDP port: a UDP
     service's socket carries no mark, so its replies reach our table only when the
     container's own routes (main) have no route to the client; the core checks that per
     session (source_address.ReplyRoutes) and dials from loopback otherwise
Unmarked traffic of the container is routed as before: a container with only lo still gets
ENETUNREACH for a foreign address, one with a default route still uses it.

Set up with pyroute2 in a forked child (the ~120 ms import stays out of the long-lived
dialer), once per netns and idempotently: an existing route or rule (EEXIST) is fine, so
the containers of a pod share it. Nothing is ever removed: the rules only concern our mark
and the forwarded UDP ports, and the netns dies with its last holder.
"""

from __future__ import annotations

import _socket  # not socket, signal: their enums are memory of every container (issue 12)
import os
from _signal import SIGKILL

from .errors import loads_strict
from .forking import fork_child
from .jsontext import to_json
from .netns_setup import reachable
from .polling import wait_readable

TABLE = 7071
MARK = 0x7071
MARK_RULE_PRIORITY = 97  # before main (32766): our packets never follow the container's routes
UDP_RULE_PRIORITY = 32800  # after main and default: only where the container has no route
IP_TRANSPARENT = 19  # <linux/in.h>; not exported by Python's socket module
IPV6_TRANSPARENT = 75  # <linux/in6.h>
SYSCTLS: dict[int, tuple[str, str]] = {
    _socket.AF_INET: ("net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"),
    _socket.AF_INET6: ("net/ipv4/tcp_fwmark_accept", "net/ipv6/fwmark_reflect"),
}
LOCAL_SOURCE: dict[int, str] = {_socket.AF_INET: "127.0.0.1", _socket.AF_INET6: "::1"}
FAMILY_KEY: dict[int, str] = {_socket.AF_INET: "4", _socket.AF_INET6: "6"}
SETUP_TIMEOUT = 10.0

PortRange = tuple[int, int]


ROUTING_COMM = "portfwd-routing"


def make_transparent(sock: _socket.socket) -> None:
    """Let an unprivileged holder bind `sock` to any address; mark what it sends."""
    if sock.family == _socket.AF_INET6:
        sock.setsockopt(_socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(_socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_MARK, MARK)


def set_up(udp_ports: list[PortRange]) -> tuple[dict[int, bool], list[str]]:
    """Set up the routing in a forked child; returns which families are ready and notes for
    the log (why a family is not)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)

    def child() -> int:
        from . import procctl  # noqa: PLC0415 - only in the child

        # A name of its own: it lives ~0.1 s, and `ps` or a test must not take it for the dialer.
        procctl.set_name(ROUTING_COMM)
        os.close(read_fd)
        ready, notes = _set_up(udp_ports)
        report = {"ready": {FAMILY_KEY[f]: ok for f, ok in ready.items()}, "notes": notes}
        os.write(write_fd, to_json(report).encode())
        return 0

    pid = fork_child(child)
    os.close(write_fd)
    # Bounded: every connection waits for this, a stuck child must not hold them forever.
    if wait_readable([read_fd], SETUP_TIMEOUT):
        with os.fdopen(read_fd, "rb") as f:
            raw = f.read()
    else:
        os.close(read_fd)
        os.kill(pid, SIGKILL)
        raw = b""
    os.waitpid(pid, 0)
    try:
        report = loads_strict(raw)
    except ValueError:
        return {_socket.AF_INET: False, _socket.AF_INET6: False}, ["the routing setup failed (see the log)"]
    ready = {f: bool(report["ready"].get(k)) for f, k in FAMILY_KEY.items()}
    return ready, list(report["notes"])


def _set_up(udp_ports: list[PortRange]) -> tuple[dict[int, bool], list[str]]:
    from pyroute2 import IPRoute  # noqa: PLC0415 - heavy: only in this short-lived child
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    ready: dict[int, bool] = {}
    notes: list[str] = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in (_socket.AF_INET, _socket.AF_INET6):
            name = "IPv" + FAMILY_KEY[family]
            if not reachable(family, LOCAL_SOURCE[family]):
                ready[family] = False
                notes.append(f"{name}: not available in the container's network namespace")
                continue
            try:
                _add(ipr, NetlinkError, "route", "add", family=family, dst=_any(family), dst_len=0,
                     type="local", table=TABLE, oif=lo, prefsrc=LOCAL_SOURCE[family], scope=254)
                _add(ipr, NetlinkError, "rule", "add", family=family, priority=MARK_RULE_PRIORITY,
                     fwmark=MARK, table=TABLE)
                for first, last in udp_ports:
                    _add(ipr, NetlinkError, "rule", "add", family=family, priority=UDP_RULE_PRIORITY,
                         ip_proto=_socket.IPPROTO_UDP, sport_range=f"{first}:{last}", table=TABLE)
                for key in SYSCTLS[family]:
                    _sysctl_on(key)
            except NetlinkError as e:
                ready[family] = False
                notes.append(f"{name}: routing table {TABLE} or its rules: {os.strerror(e.code)}")
                continue
            except OSError as e:
                ready[family] = False
                notes.append(f"{name}: {e.filename}: {e.strerror}")
                continue
            ready[family] = True
    return ready, notes


def _any(family: int) -> str:
    return "0.0.0.0" if family == _socket.AF_INET else "::"


def _add(ipr: object, error: type[Exception], what: str, *args: object, **kwargs: object) -> None:
    """Add a route or rule; one that exists already (another container of the pod, a
    restarted core) is what we want."""
    try:
        getattr(ipr, what)(*args, **kwargs)
    except error as e:
        if getattr(e, "code", None) != 17:  # EEXIST
            raise


def _sysctl_on(key: str) -> None:
    # /proc/sys/net is the netns of the process that opens it: the container's, here.
    path = "/proc/sys/" + key
    with open(path, "r+") as f:
        if f.read().strip() != "1":
            f.seek(0)
            f.write("1")
