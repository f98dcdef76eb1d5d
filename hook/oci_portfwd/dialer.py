"""Container-side sockets, made inside the container's namespaces and handed to the core.

A socket keeps the netns it was created in. So a small child (the dialer) joins the
container's user and network namespaces and creates sockets on request; they travel over
a SOCK_SEQPACKET socketpair with SCM_RIGHTS. The core, which holds the host sockets, never
joins the container's namespaces. A pool of pre-made sockets hides the round trip.

Protocol (one datagram each):
  dialer → core  b"W"                                                  waiting: the container
                                                                       has not exec'd yet
                 b"K" + JSON {"addresses": {"4": [...], "6": [...]}}   joined, ready
                       and, where the netns's default congestion control paces,
                       "congestion_control": {"default": ..., "used": ...}
                 b"E" + message                                        failed, exiting
                 b"G" + message                                        the container exited
                                                                       first: nothing failed
                 b"T" + JSON {"ready": {"4": bool, "6": bool}, "notes": [...]},
                       with a NETLINK_ROUTE socket of the netns as SCM_RIGHTS
                                                                       client-address routing
                                                                       (source_address client:
                                                                       after the hello, before
                                                                       any socket)
                 b"S" + kind, with the sockets as SCM_RIGHTS           sockets
  core → dialer  kind + b" " + count                                   please make sockets
kind is b"t4", b"t6", b"u4" or b"u6".

What runs in the dialer's process, from the fork on, is dialer_process.py's. The loop that
answers requests (`serve`, after the hello, the client-address routing and the privilege
drop) is a small C program when it is installed, NATIVE_DIALER (built from
hook/native/portfwd-dialer.c by `make venv` and the packages): the dialer execs it with its
end of the socketpair, and a forked CPython's ~6 MB per container become ~0.2 MB (issue 12).
Without it (a pip install), the same loop runs in Python; the core logs that once.
"""

from __future__ import annotations

import _socket
import os
import sys
import time
from _signal import SIGKILL

from .errors import ContainerGone, StartError, loads_strict
from .fdpass import recv_fds
from .forking import fork_child
from .procfs import close_fds_except
from .source_address import ReplyRoutes, Routing

# _socket, _signal and _collections, not socket, signal and collections: their enums,
# selectors and namedtuples would be memory of every forwarded container (issue 12).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable
else:
    from _collections import deque

KINDS = {
    b"t4": (_socket.AF_INET, _socket.SOCK_STREAM),
    b"t6": (_socket.AF_INET6, _socket.SOCK_STREAM),
    b"u4": (_socket.AF_INET, _socket.SOCK_DGRAM),
    b"u6": (_socket.AF_INET6, _socket.SOCK_DGRAM),
}
MAX_BATCH = 32
FAMILIES = (_socket.AF_INET, _socket.AF_INET6)
# sys.prefix: the venv's for `make venv`, /usr for the packages.
NATIVE_DIALER = sys.prefix + "/libexec/oci-portfwd-hook/portfwd-dialer"
# Test switch (like seccomp_filter.PROBE_ENV): set, the dialer's loop stays in Python.
PYTHON_DIALER_ENV = "OCI_PORTFWD_TEST_PYTHON_DIALER"


def native_dialer() -> tuple[str | None, str]:
    """The program the dialer execs for its loop, or None and why the loop stays in Python."""
    if os.environ.get(PYTHON_DIALER_ENV):
        return None, f"{PYTHON_DIALER_ENV} is set"
    if not os.access(NATIVE_DIALER, os.X_OK):
        return None, f"{NATIVE_DIALER} is missing or not executable"
    return NATIVE_DIALER, ""


def kind_of(family: int, proto: str) -> bytes:
    return (b"t" if proto == "tcp" else b"u") + (b"4" if family == _socket.AF_INET else b"6")


def start_dialer(
    container_pid: int,
    want_addresses: bool,
    deadline: float,
    client_udp_ports: list[tuple[int, int]] | None = None,
    native: str | None = None,
) -> tuple[int, _socket.socket]:
    """Fork the dialer; returns its pid and the core's end of the socketpair.
    client_udp_ports: set up client-address routing (source_address client) for these
    container UDP ports; None: no client addresses (source_address loopback).
    native: the program to exec for the loop (native_dialer()); None: the loop in Python."""
    core_end, dialer_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)

    def child() -> int:
        # Keep nothing of the core's: above all not the host listeners, which must never
        # be reachable from inside the container's namespaces.
        close_fds_except({dialer_end.fileno()})
        from .dialer_process import main  # noqa: PLC0415 - the child's: none of it in the core (issue 12)

        main(dialer_end, container_pid, want_addresses, deadline, client_udp_ports, native)
        return 1

    pid = fork_child(child)
    dialer_end.close()
    return pid, core_end


Addresses = dict[int, list[str]]


class Hello:
    """What the dialer found in the container's netns: its addresses, and the congestion
    control its TCP sockets get instead of the netns's default, which paces (congestion_control.py)."""

    __slots__ = ("addresses", "congestion")

    def __init__(self, addresses: Addresses, congestion: tuple[str, str] | None) -> None:
        self.addresses = addresses
        self.congestion = congestion  # (the default, the one used)

    def congestion_note(self) -> str | None:
        if self.congestion is None:
            return None
        default, used = self.congestion
        return (f"container-side connections use {used}: the container's default congestion control, "
                f"{default}, paces every segment, which a connection inside this machine does not need")


def await_hello(sock: _socket.socket, timeout: float) -> Hello | None:
    """Wait for the dialer to join the container's namespaces. None: it is waiting for
    the container to exec (rootless crun), and its hello will come through the pool."""
    sock.settimeout(timeout)
    try:
        message = sock.recv(65536)
    except TimeoutError:
        raise StartError(f"the dialer did not join the container's namespaces within {timeout:g}s") from None
    finally:
        sock.setblocking(False)
    if message == b"W":
        return None
    if message.startswith(b"G"):
        raise ContainerGone(message[1:].decode(errors="replace"))
    if message.startswith(b"E"):
        raise StartError(message[1:].decode(errors="replace"))
    if message.startswith(b"K"):
        return decode_hello(message)
    raise StartError("the dialer exited before it joined the container's namespaces")


def decode_hello(message: bytes) -> Hello:
    hello = loads_strict(message[1:])
    addresses = {
        _socket.AF_INET if key == "4" else _socket.AF_INET6: list(addrs)
        for key, addrs in hello.get("addresses", {}).items()
    }
    cc = hello.get("congestion_control")
    return Hello(addresses, (str(cc.get("default")), str(cc.get("used"))) if isinstance(cc, dict) else None)


if TYPE_CHECKING:
    Waiter = Callable[[_socket.socket | None], None]
    BatchWaiter = Callable[[list[int] | None], None]  # None: the dialer is gone


class SocketPool:
    """Pre-made container-side sockets per kind; `get` calls back at once or when some arrive."""

    TARGET = 16
    LOW = 4

    def __init__(
        self,
        sock: _socket.socket,
        on_hello: Callable[[Hello], None],
        on_error: Callable[[str], None],
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.sock = sock
        self.on_hello = on_hello
        self.on_error = on_error
        self.on_gone = on_gone or on_error
        self.ready: dict[bytes, deque[_socket.socket]] = {k: deque() for k in KINDS}
        self.waiters: dict[bytes, deque[Waiter]] = {k: deque() for k in KINDS}
        self.pending: dict[bytes, int] = {k: 0 for k in KINDS}
        # Whose each awaited reply is, per kind, in the order asked (the dialer answers each
        # request with one reply, in order): None for this pool, else a batch's callback.
        self.owners: dict[bytes, deque[BatchWaiter | None]] = {k: deque() for k in KINDS}
        self.broken = False
        self.routing = Routing()
        self.on_routing: Callable[[list[str], int], None] | None = None

    def prefill(self, kinds: set[bytes]) -> None:
        for kind in kinds:
            self._refill(kind)

    def get(self, kind: bytes, callback: Waiter) -> None:
        if self.broken:
            callback(None)
            return
        ready = self.ready[kind]
        if ready:
            sock = ready.popleft()
            self._refill(kind)
            callback(sock)
            return
        self.waiters[kind].append(callback)
        self._refill(kind)

    def get_batch(self, kind: bytes, count: int, callback: BatchWaiter) -> None:
        """`count` (at most MAX_BATCH) new sockets, as descriptors, all to `callback` when the
        dialer's reply comes, past this pool (the relay threads' pool, thread_accept.py: no
        socket object per connection, ~8 µs of this thread each at 20k connections/s)."""
        if not self.broken and self._ask(kind, min(count, MAX_BATCH)):
            self.owners[kind].append(callback)
        else:
            callback(None)

    def on_readable(self) -> bool:
        """Take every reply; False once the dialer is gone."""
        while True:
            try:
                data, fds, _flags, _addr = recv_fds(self.sock, 65536, MAX_BATCH)
            except BlockingIOError:
                return True
            except OSError:
                data, fds = b"", []
            if not data:
                self._fail_waiters()
                return False
            if data[:1] != b"S":
                self._on_control(data, fds)
                continue
            kind = data[1:3]
            owners = self.owners[kind]
            owner = owners.popleft() if owners else None
            if owner is not None:
                owner(fds)
                continue
            self.pending[kind] = max(0, self.pending[kind] - len(fds))
            family, kind_type = KINDS[kind]
            for fd in fds:
                # SCM_RIGHTS carries the file, and with it O_NONBLOCK (the dialer made it so).
                # Family and type given, SOCK_NONBLOCK among them: Python then sets its own
                # timeout to 0 and asks the kernel nothing but getsockname (no SO_TYPE,
                # SO_PROTOCOL, FIONBIO: three system calls per connection fewer).
                sock = _socket.socket(family, kind_type | _socket.SOCK_NONBLOCK, 0, fd)
                waiters = self.waiters[kind]
                if waiters:
                    waiters.popleft()(sock)
                else:
                    self.ready[kind].append(sock)
            self._refill(kind)

    def _on_control(self, message: bytes, fds: list[int]) -> None:
        # After a deferred start (b"W"), the dialer's hello or failure arrives here.
        if message.startswith(b"T"):
            report = loads_strict(message[1:])
            ready = report.get("ready", {})
            self.routing.ready = {f: bool(ready.get("4" if f == _socket.AF_INET else "6")) for f in FAMILIES}
            if fds:
                self.routing.replies = ReplyRoutes(_socket.socket(fileno=fds[0]))
            if self.on_routing is not None:
                self.on_routing(list(report.get("notes", [])), int(report.get("ms", 0)))
            return
        for fd in fds:
            os.close(fd)
        if message.startswith(b"K"):
            self.on_hello(decode_hello(message))
        elif message.startswith(b"E"):
            self.on_error(message[1:].decode(errors="replace"))
        elif message.startswith(b"G"):
            self.on_gone(message[1:].decode(errors="replace"))

    def _refill(self, kind: bytes) -> None:
        have = len(self.ready[kind]) + self.pending[kind] - len(self.waiters[kind])
        if have >= self.LOW or self.broken:
            return
        count = min(MAX_BATCH, self.TARGET - have)
        if self._ask(kind, count):
            self.owners[kind].append(None)
            self.pending[kind] += count

    def _ask(self, kind: bytes, count: int) -> bool:
        try:
            self.sock.send(kind + b" " + str(count).encode())
        except OSError:
            self.broken = True
            return False
        return True

    def _fail_waiters(self) -> None:
        self.broken = True
        for waiters in self.waiters.values():
            while waiters:
                waiters.popleft()(None)
        for owners in self.owners.values():
            while owners:
                owner = owners.popleft()
                if owner is not None:
                    owner(None)

    def close(self) -> None:
        for ready in self.ready.values():
            while ready:
                ready.popleft().close()
        if self.routing.replies is not None:
            self.routing.replies.close()
        self.sock.close()


def wait_gone(pid: int, timeout: float) -> None:
    """Reap a child, killing it if it does not exit in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, SIGKILL)
    os.waitpid(pid, 0)
