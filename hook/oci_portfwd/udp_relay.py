"""The data path of UDP: one session per client address.

    client ─datagrams─▶ host socket ─▶ UdpSession (by client address)
      1. a container-side UDP socket from the dialer's pool, not connected: a service bound
         to the wildcard answers a dial of 127.0.0.2 from 127.0.0.1, which a connected
         socket would drop; IP_RECVERR still reports ICMP refusals on it
         (source_address client: bound to the client's address and port, so the service
         sees the client and answers it on its own port; one socket per client)
      2. datagrams to the container with sendto(target); its replies back with sendto(client)
         in batches when the core has its extension (UdpBatch, hook/native/udp_batch.c):
         up to 64 datagrams per recvmmsg, a run of them from one client to its session,
         sent on with one sendmmsg where datagrams of one size in a row are one
         UDP_SEGMENT message (the stack walked once for them all); without it, one
         recvfrom and one sendto per datagram, here
      3. ICMP refusal (ECONNREFUSED) before any reply → the other family, resending the
         last datagram, as TCP does on a refused dial
      4. no traffic for udp_idle_timeout → the session is forgotten

UDP has no connection to reset: when this process dies, clients just stop getting replies
and the restarted core starts new sessions.
"""

from __future__ import annotations

import _socket  # not socket: its enums and selectors are memory of every container (issue 12)
import errno
import os
import select
import time

from .addressing import Target
from .dialer import SocketPool, kind_of
from .eventloop import EventLoop
from .source_address import Address, SourceBinder
from .stats import TO_CLIENT, TO_CONTAINER, UDP_DATAGRAMS, UDP_SESSIONS, Counters

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .logs import HookLog
    from .native_relay import UdpBatch

MAX_DATAGRAM = 65535
# Not exported by Python's socket module: <linux/in.h> and <linux/in6.h>.
IP_RECVERR = 11
IPV6_RECVERR = 25
# A send that cannot reach the target's family moves the session to the next target.
SEND_FALLBACK_ERRNOS = {errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EHOSTUNREACH}
MAX_QUEUED = 64
READ_BATCH = 64


class UdpListener:
    def __init__(
        self,
        loop: EventLoop,
        pool: SocketPool,
        sock: _socket.socket,
        targets: Sequence[Target],
        idle_timeout: float,
        counts: Counters,
        log: HookLog,
        source: SourceBinder | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.sock = sock
        self.targets = tuple(targets)
        self.idle_timeout = idle_timeout
        self.log = log
        self.source = source
        self.sessions: dict[Address, UdpSession] = {}
        self.counts = counts
        # Set by the core once it serves, when it has its extension (core.py).
        self.batch: UdpBatch | None = None
        self.segment = True  # UDP_SEGMENT on this socket, until a send says it cannot
        # The Python path's one buffer, both ways, for the listener and its sessions (a datagram
        # is sent on before the next is read): made on its first use, since 64 KiB per
        # session, or per listener that the batch serves, was memory of every container.
        self._buffer: tuple[bytearray, memoryview] | None = None

    def start(self) -> None:
        self.loop.register(self.sock.fileno(), select.EPOLLIN, self._on_readable)
        self.loop.call_later(self._sweep_interval(), self._sweep)

    def scratch(self) -> tuple[bytearray, memoryview]:
        if self._buffer is None:
            buffer = bytearray(MAX_DATAGRAM)
            self._buffer = buffer, memoryview(buffer)
        return self._buffer

    def _on_readable(self, _events: int) -> None:
        if self.batch is not None:
            self._receive_batch(self.batch)
            return
        buffer, view = self.scratch()
        for _ in range(READ_BATCH):
            try:
                size, client = self.sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.debug("UDP receive on %s failed: %s", self.sock.getsockname(), e.strerror)
                return
            self._session(client, 1, size).to_container(view[:size])

    def _receive_batch(self, batch: UdpBatch) -> None:
        try:
            runs = batch.receive(self.sock.fileno(), by_source=True)
        except OSError as e:
            self.log.debug("UDP receive on %s failed: %s", self.sock.getsockname(), e.strerror)
            return
        for client, first, count, size in runs:
            assert client is not None
            self._session(client, count, size).to_container_batch(batch, first, count)

    def _session(self, client: Address, datagrams: int, size: int) -> UdpSession:
        """The client's session (a new one on its first datagram), its datagrams counted."""
        session = self.sessions.get(client)
        if session is None:
            session = UdpSession(self, client)
            self.sessions[client] = session
            self.counts[UDP_SESSIONS] += 1
            session.start()
        self.counts[UDP_DATAGRAMS] += datagrams
        self.counts[TO_CONTAINER] += size
        return session

    def send_batch_to_client(self, batch: UdpBatch, first: int, count: int, size: int, client: Address) -> None:
        self.counts[TO_CLIENT] += size
        _sent, err, self.segment = batch.send(
            self.sock.fileno(), self.sock.family, first, count, client, segment=self.segment
        )
        if err:
            self.log.debug("UDP send to %s failed: %s", client, os.strerror(err))

    def send_to_client(self, data: memoryview, client: Address) -> None:
        self.counts[TO_CLIENT] += len(data)
        try:
            self.sock.sendto(data, client)
        except (BlockingIOError, InterruptedError):
            pass  # the host socket's buffer is full: UDP may drop, and so do we
        except OSError as e:
            self.log.debug("UDP send to %s failed: %s", client, e.strerror)

    def _sweep_interval(self) -> float:
        return max(0.5, min(self.idle_timeout / 2, 10.0))

    def _sweep(self) -> None:
        horizon = time.monotonic() - self.idle_timeout
        had = len(self.sessions)
        for client, session in list(self.sessions.items()):
            if session.last_used < horizon:
                session.close()
                del self.sessions[client]
        if had and not self.sessions:
            # Idle: the buffers' memory goes back (another listener's next datagram, if any,
            # faults fresh pages in; nothing is kept in them between two datagrams).
            self._buffer = None
            if self.batch is not None:
                self.batch.release()
        self.loop.call_later(self._sweep_interval(), self._sweep)


class UdpSession:
    def __init__(self, listener: UdpListener, client: Address) -> None:
        self.listener = listener
        self.client = client
        self.targets = list(listener.targets)
        self.upstream: _socket.socket | None = None
        self.target: tuple[str, int] = ("", 0)
        self.queue: list[bytes] = []
        self.last_datagram: bytes | None = None
        self.answered = False
        self.closed = False
        self.last_used = time.monotonic()
        self.segment = True  # UDP_SEGMENT on the container-side socket (UdpBatch.send)

    # 1. a container-side socket
    def start(self) -> None:
        if not self.targets:
            return
        self.listener.pool.get(kind_of(self.targets[0].family, "udp"), self._on_socket)

    def _on_socket(self, sock: _socket.socket | None) -> None:
        if sock is None or self.closed:
            if sock is not None:
                sock.close()
            return
        target = self.targets.pop(0)
        if self.listener.source is not None:
            self.listener.source.bind(sock, self.client, target.family, target.port)
        if sock.family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(_socket.IPPROTO_IP, IP_RECVERR, 1)
        self.target = (target.address, target.port)
        self.upstream = sock
        self.listener.loop.register(sock.fileno(), select.EPOLLIN, self._on_upstream)
        queued, self.queue = self.queue, []
        for datagram in queued:
            self._send(datagram)

    # 2. client → container
    def to_container(self, data: memoryview | bytes) -> None:
        self.last_used = time.monotonic()
        if self.upstream is None:
            if len(self.queue) < MAX_QUEUED:
                self.queue.append(bytes(data))
            return
        self._send(data)

    def to_container_batch(self, batch: UdpBatch, first: int, count: int) -> None:
        self.last_used = time.monotonic()
        if self.upstream is None:
            for index in range(first, first + count):
                self.to_container(batch.datagram(index))  # queued (bytes(): no second copy)
            return
        if not self.answered:
            # Kept only until the first reply: a refusal must be able to resend it.
            self.last_datagram = batch.datagram(first + count - 1)
        sent, err, self.segment = batch.send(
            self.upstream.fileno(), self.upstream.family, first, count, self.target, segment=self.segment
        )
        if err:
            failed = first + sent
            if not self.answered:
                self.last_datagram = batch.datagram(failed)
            self._send_failed(err)
            # The rest of the run as if it came after: queued for the next family's socket
            # after a fall-back, sent one by one otherwise.
            for index in range(failed + 1, first + count):
                self.to_container(batch.datagram(index))

    def _send(self, data: memoryview | bytes) -> None:
        assert self.upstream is not None
        if not self.answered:
            # Kept only until the first reply: a refusal must be able to resend it.
            self.last_datagram = bytes(data)
        try:
            self.upstream.sendto(data, self.target)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._send_failed(e.errno or 0)

    def _send_failed(self, err: int) -> None:
        if err == errno.ECONNREFUSED or err in SEND_FALLBACK_ERRNOS:
            self._fall_back()
        else:
            self.listener.log.debug("UDP send to the container failed: %s", os.strerror(err))

    # 2. container → client
    def _on_upstream(self, _events: int) -> None:
        assert self.upstream is not None
        if self.listener.batch is not None:
            self._from_container_batch(self.listener.batch)
            return
        buffer, view = self.listener.scratch()
        for _ in range(READ_BATCH):
            try:
                # Any source: the reply to 127.0.0.2 may come from 127.0.0.1 (see above).
                size, _source = self.upstream.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._receive_failed(e)
                return
            self._replied()
            self.listener.send_to_client(view[:size], self.client)

    def _from_container_batch(self, batch: UdpBatch) -> None:
        assert self.upstream is not None
        try:
            # Any source, one run: all of it goes to this session's client.
            runs = batch.receive(self.upstream.fileno(), by_source=False)
        except OSError as e:
            self._receive_failed(e)
            return
        for _source, first, count, size in runs:
            self._replied()
            self.listener.send_batch_to_client(batch, first, count, size, self.client)

    def _replied(self) -> None:
        self.answered = True
        self.last_datagram = None
        self.last_used = time.monotonic()

    def _receive_failed(self, e: OSError) -> None:
        if isinstance(e, ConnectionRefusedError):
            self._drain_errors()
            self._fall_back()
        else:
            self.listener.log.debug("UDP receive from the container failed: %s", e.strerror)

    def _drain_errors(self) -> None:
        # IP_RECVERR also queues each ICMP error; read them so the queue does not grow.
        assert self.upstream is not None
        while True:
            try:
                self.upstream.recvmsg(1, 512, _socket.MSG_ERRQUEUE)
            except OSError:
                return

    # 3. refused before any reply → next family
    def _fall_back(self) -> None:
        if self.answered or not self.targets:
            return
        self._close_upstream()
        if self.last_datagram is not None:
            self.queue.append(self.last_datagram)
        self.start()

    # 4. idle
    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.listener.loop.unregister(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None

    def close(self) -> None:
        self.closed = True
        self._close_upstream()
