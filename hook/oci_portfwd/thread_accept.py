"""The TCP listeners whose connections the relay threads accept and dial themselves.

    a new connection ─▶ one relay thread (EPOLLEXCLUSIVE: one idle thread wakes)
        accept, take a container-side socket from the threads' pool, bind it to the client's
        address (source_address client, same family), connect, relay: one thread from the
        first byte to the last (hook/native/portfwd_relay.c, "accepting")
    anything else ─▶ a record on the slow pipe ─▶ this loop: TcpListener.adopt serves it as
        it serves its own accepts (waits for the dialer, falls back to the next target or
        to loopback, maps or drops the client's address, logs)

Why: through this loop a new connection crossed two threads (this one accepted and dialled, a
relay thread relayed), and the latency of new connections spread wider than one thread's
(docs/data-path.md). When: once the relay threads run, the dialer's hello has named the
container's addresses and, with source_address client, its routing report has come (the
threads bind to the client's address only where the routing is ready). Listeners that
write PROXY headers stay with the loop.
"""

from __future__ import annotations

import select
from _socket import AF_INET, AF_INET6

from .dialer import kind_of
from .native_relay import SLOW_CONNECTION, SLOW_NEED_SOCKETS, SLOW_PAUSED
from .tcp_relay import TcpListener

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .dialer import SocketPool
    from .eventloop import EventLoop
    from .logs import HookLog
    from .native_relay import NativeRelay
    from .udp_relay import UdpListener


class ThreadAccept:
    def __init__(
        self,
        relay: NativeRelay,
        loop: EventLoop,
        pool: SocketPool,
        servers: Sequence[TcpListener | UdpListener],
        log: HookLog,
        *,
        targets_known: bool,
        wants_routing: bool,
    ) -> None:
        self.relay = relay
        self.loop = loop
        self.pool = pool
        self.servers = servers
        self.log = log
        self.targets_known = targets_known  # False until a deferred hello (rootless crun)
        self.wants_routing = wants_routing  # source_address client: wait for the routing report
        self.given = 0  # listeners the threads accept on

    def offer(self) -> None:
        """Give the threads every TCP listener they can take now (again after the hello and
        the routing report: a no-op for those given before)."""
        if not self.relay.ctls or not self.targets_known:
            return
        if self.wants_routing and not self.pool.routing.ready:
            return
        given = sum(
            1 for i, server in enumerate(self.servers)
            if isinstance(server, TcpListener) and server.give_to_threads(i)
        )
        if given and not self.given and self.relay.slow is not None:  # the first: their records
            self.loop.register(self.relay.slow, select.EPOLLIN, self._on_records)
        if given > self.given:
            self.log.info("the relay threads accept and dial on %d TCP listener(s)", given)
            self.given = given

    def stop(self) -> None:
        """The core is ending: no more accepts by the threads (see NativeRelay.stop_accepting)."""
        if self.given:
            self.relay.stop_accepting()

    def _on_records(self, _events: int) -> None:
        for what, a, b, c in self.relay.records():
            if what == SLOW_CONNECTION:
                server = self.servers[a]
                assert isinstance(server, TcpListener)
                server.adopt(b, c)
            elif what == SLOW_NEED_SOCKETS:
                self._supply(AF_INET if a == 0 else AF_INET6, b)
            elif what == SLOW_PAUSED:
                server = self.servers[a]
                assert isinstance(server, TcpListener)
                server.paused(b)

    def _supply(self, family: int, count: int) -> None:
        relay = self.relay

        def give(fds: list[int] | None) -> None:
            if fds:  # None: the dialer is gone, and the core with it
                relay.supply(family, fds)

        self.pool.get_batch(kind_of(family, "tcp"), count, give)
