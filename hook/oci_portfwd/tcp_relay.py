"""The data path of one TCP connection.

    client ─▶ host listener ─accept─▶ TcpConnection
      1. take a container-side socket from the dialer's pool
      2. bind it to the client's address (source_address client), connect it to the
         container's address; refused → the next target (other family)
         (a `+proxy` mapping then writes its PROXY protocol header, before any client byte)
      3. relay both ways: small messages are copied through one shared buffer (recv_into
         + send, two calls per message); a read that fills that buffer means bulk, and the
         way splices, zero copy, through a pipe borrowed from a shared pool while bytes are
         in flight (an idle connection holds two descriptors, not six)
      4. EOF on one side → shutdown(SHUT_WR) on the other; both done → close
         reset on one side → reset on the other (SO_LINGER 0)
    With the relay threads in C (native_relay.py, hook/native/portfwd_relay.c), steps 3 and
    4 are theirs: once connected (and the PROXY header written), the pair is handed to one
    of them and this loop forgets it; the threads follow the same rules. On a listener given
    to them (thread_accept.py) they do steps 1 and 2 too, for the first target and the
    client's own address; what they cannot do comes back here (TcpListener.adopt) before
    any byte is read.

Both sockets carry SO_LINGER {1, 0} from the start (the client's inherited from the
listener, the container side's set by the dialer): when this process dies without closing
them (SIGKILL, a crash, its supervisor killed), the kernel resets both ends, so a truncated
transfer never looks like a complete one. Step 4 clears it on a socket when its outgoing
way is complete (shutdown_write), so that FIN follows the last byte whatever happens next.
"""

from __future__ import annotations

import _socket  # not socket: its enums and selectors are memory of every container (issue 12)
import errno
import fcntl
import os
import select

from .addressing import Target
from .dialer import SocketPool, kind_of
from .eventloop import EventLoop
from .listeners import LINGER_RESET
from .proxy_header import header_for
from .source_address import Address, SourceBinder
from .stats import TCP_OPEN, TCP_TOTAL, TCP_UNANSWERED, TO_CLIENT, TO_CONTAINER, Counters

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .logs import HookLog
    from .native_relay import NativeRelay

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Bigger pipes mean fewer splice calls per byte; the kernel caps an unprivileged pipe at
# fs.pipe-max-size (1 MiB by default) and falls back to the default 64 KiB when a user's
# pipe pages run out (fs.pipe-user-pages-soft), which only slows that one pipe down.
PIPE_SIZE = 1 << 20
CHUNK = PIPE_SIZE
F_SETPIPE_SZ = 1031
ET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# The client's socket is watched for EPOLLOUT only once a write to it would block: until
# then every ack, FIN and the registration itself would wake the loop for nothing.
CLIENT_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
# Events that mean "something to read" (data, EOF, an error) on a socket.
INPUT_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
EPOLLOUT = select.EPOLLOUT
# Input events after which a short read is not the end: EOF or an error is pending.
END_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
CONNECT_FAILED = select.EPOLLERR | select.EPOLLHUP
# Small messages go through a buffer of this size (PipePool.copy_buffer). A read that fills
# it means bulk: the way splices from there.
COPY_SIZE = 1 << 16
# Errors of a relayed socket that end the connection with a reset both ways.
RESET_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.ECONNREFUSED, errno.EHOSTUNREACH}
)
LINGER_OFF = bytes(len(LINGER_RESET))  # struct linger {0, 0}
# A refused or unreachable dial of one family falls back to the next target.
DIAL_FALLBACK_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ENETUNREACH,
    errno.EADDRNOTAVAIL,
    errno.EAFNOSUPPORT,
    errno.EHOSTUNREACH,
}
# A connect from the client's address that collides with a connection the container still
# knows (TIME_WAIT) is retried from loopback, not moved to the other family.
SOURCE_COLLISION_ERRNOS = {errno.EADDRNOTAVAIL, errno.EADDRINUSE}


class ConnectionReset(Exception):
    """One side was reset; the other must be reset too."""


def reset(sock: _socket.socket) -> None:
    """Close so that the peer gets an RST, as a closed port or a crashed peer would give."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()


class PipePool:
    """Empty pipes to lend to directions that have bytes in flight, and the buffer their
    small messages are copied through."""

    KEEP = 64  # idle pipes kept for reuse; more are closed

    def __init__(self) -> None:
        self.idle: list[tuple[int, int]] = []
        self.buffer: memoryview | None = None

    def copy_buffer(self) -> memoryview:
        """One buffer for every connection (one process, one thread; what a destination does
        not take at once is kept by its way). Made for the first connection relayed here:
        with the C relay threads, never (64 KiB of every core's memory otherwise)."""
        if self.buffer is None:
            self.buffer = memoryview(bytearray(COPY_SIZE))
        return self.buffer

    def take(self) -> tuple[int, int]:
        if self.idle:
            return self.idle.pop()
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the limit: the default size still works
        return pipe

    def give(self, pipe: tuple[int, int]) -> None:
        """Only empty pipes come back: a pipe with bytes left is closed by its direction."""
        if len(self.idle) < self.KEEP:
            self.idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


class Direction:
    """One way of a connection, src → dst. Small messages: recv_into the pool's buffer and
    send (what dst does not take is held here). Bulk: src → pipe → dst with splice, no bytes
    through Python."""

    __slots__ = (
        "src", "dst", "src_sock", "dst_sock", "recv_into", "send", "view", "pipes", "pipe", "buffered", "held",
        "bulk", "eof", "done", "counts", "slot", "watch_out",
    )

    def __init__(
        self,
        src: _socket.socket,
        dst: _socket.socket,
        pipes: PipePool,
        counts: Counters,
        slot: int,
        watch_out: Callable[[], None],
    ) -> None:
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.src_sock = src
        self.dst_sock = dst
        self.recv_into = src.recv_into  # bound once: two calls per message
        self.send = dst.send
        self.view = pipes.copy_buffer()
        self.pipes = pipes
        self.pipe: tuple[int, int] | None = None
        self.buffered = 0  # bytes in the pipe
        self.held = b""  # copied bytes dst has not taken yet
        self.bulk = False  # the last pump moved a buffer's worth or more: splice
        self.eof = False
        self.done = False
        self.counts = counts
        self.slot = slot  # TO_CONTAINER or TO_CLIENT
        self.watch_out = watch_out  # called when dst is full: EPOLLOUT on dst is wanted

    def pump(self, drain: int = 1) -> None:
        """Move what can be moved now (edge-triggered: nothing may be left that no new event
        will announce). A short read means the socket was empty when read: new bytes, EOF or
        an error raise a new edge, so it ends the pump unless `drain` (the event said an EOF
        or error is pending: read to it)."""
        if self.done:
            return
        try:
            if self.buffered or self.bulk:
                self._splice()
            else:
                self._copy(drain)
        except OSError as e:
            if e.errno in RESET_ERRNOS:
                raise ConnectionReset from None
            raise

    def _copy(self, drain: int) -> None:
        counts, slot, recv_into, send, view = self.counts, self.slot, self.recv_into, self.send, self.view
        while True:
            if self.held:
                try:
                    sent = send(self.held)
                except BlockingIOError:
                    self.watch_out()
                    return
                counts[slot] += sent  # shared with the supervisor: survives a crash
                self.held = self.held[sent:]
                if self.held:
                    self.watch_out()
                    return
                # src was not read while dst was full: events (an EOF among them) may have
                # come and gone meanwhile.
                drain = 1
            if self.eof:
                shutdown_write(self.dst_sock)
                self.done = True
                return
            try:
                n = recv_into(view)
            except BlockingIOError:
                return
            if not n:
                self.eof = True
                continue
            try:
                sent = send(view[:n])
            except BlockingIOError:
                sent = 0
            counts[slot] += sent
            if sent < n:
                self.held = bytes(view[sent:n])
                self.watch_out()
                return
            if n == COPY_SIZE:
                self.bulk = True
                self._splice()
                return
            if not drain:
                return

    def _splice(self) -> None:
        splice, counts, slot = os.splice, self.counts, self.slot
        read = 0
        while not self.done:
            try:
                if self.buffered:
                    assert self.pipe is not None
                    sent = splice(self.pipe[0], self.dst, self.buffered, flags=SPLICE_FLAGS)
                    self.buffered -= sent
                    counts[slot] += sent  # shared with the supervisor: survives a crash
                elif self.eof:
                    self._return_pipe()
                    shutdown_write(self.dst_sock)
                    self.done = True
                else:
                    if self.pipe is None:
                        self.pipe = self.pipes.take()
                    moved = splice(self.src, self.pipe[1], CHUNK, flags=SPLICE_FLAGS)
                    if moved == 0:
                        self.eof = True
                    else:
                        self.buffered += moved
                        read += moved
            except BlockingIOError:
                if self.buffered:
                    self.watch_out()
                else:
                    self._return_pipe()
                    # src is empty: less than a buffer's worth since the last wake-up
                    # means small messages again, copied.
                    self.bulk = read >= COPY_SIZE
                return

    def _return_pipe(self) -> None:
        if self.pipe is not None:
            self.pipes.give(self.pipe)
            self.pipe = None

    def close(self) -> None:
        self.held = b""
        if self.pipe is None:
            return
        if self.buffered:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
        else:
            self.pipes.give(self.pipe)
        self.pipe = None


def shutdown_write(sock: _socket.socket) -> None:
    """Every byte of this way is queued: FIN after it. From here this socket's close must
    deliver, not reset, what is still in its send buffer (even if this process dies): the
    way towards its peer is complete. Its incoming way is still guarded: unread bytes at
    close, or any the peer sends after it, get a reset from the kernel."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, LINGER_OFF)
        sock.shutdown(_socket.SHUT_WR)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


class TcpConnection:
    # Slots, not a __dict__: ~1 KiB less per connection (5,000 held connections: ~5 MiB).
    __slots__ = (
        "loop", "pool", "pipes", "counts", "client", "targets", "log", "on_close", "preamble",
        "upstream", "ways", "closed", "answered", "tried", "peer", "source", "from_client",
        "client_out", "relay", "handed_over",
    )

    def __init__(
        self,
        loop: EventLoop,
        pool: SocketPool,
        pipes: PipePool,
        client: _socket.socket,
        targets: Sequence[Target],
        counts: Counters,
        log: HookLog,
        on_close: Callable[[TcpConnection], None],
        peer: Address = (),
        source: SourceBinder | None = None,
        preamble: bytes = b"",
        relay: NativeRelay | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.pipes = pipes
        self.counts = counts
        self.client = client
        self.targets = list(targets)
        self.log = log
        self.on_close = on_close
        self.preamble = preamble  # what the service gets before the client's bytes
        self.upstream: _socket.socket | None = None
        self.ways: tuple[Direction, Direction] | None = None
        self.closed = False
        self.answered = False
        self.tried: list[str] = []
        self.peer = peer
        self.source = source
        self.from_client = False
        self.client_out = False  # EPOLLOUT watched on the client's socket
        self.relay = relay  # the C threads that relay established pairs, if they run
        self.handed_over = False

    # 1. a container-side socket
    def start(self) -> None:
        self._dial_next()

    def _dial_next(self) -> None:
        if not self.targets:
            self.log.debug("no container service answers on %s: resetting the client", ", ".join(self.tried))
            self._abort()
            return
        target = self.targets[0]
        self.pool.get(kind_of(target.family, "tcp"), self._on_socket)

    # 2. connect, with family fallback
    def _on_socket(self, sock: _socket.socket | None) -> None:
        if self.closed:
            if sock is not None:
                sock.close()
            return
        if sock is None:
            self.log.warning("the dialer is gone; dropping a connection")
            self._abort()
            return
        target = self.targets.pop(0)
        self.tried.append(str(target))
        self.upstream = sock
        if self.source is not None:
            self.from_client = self.source.bind(sock, self.peer, target.family, target.port)
        err = sock.connect_ex((target.address, target.port))
        if err in SOURCE_COLLISION_ERRNOS and self.from_client:
            self.log.debug("dial of %s from the client's address failed (%s); dialling from loopback",
                           target, os.strerror(err))
            self.loop.unregister(sock.fileno())
            sock.close()
            self.upstream = None
            self.source = None
            self.targets.insert(0, target)
            self._dial_next()
            return
        if err == errno.EINPROGRESS:
            # The handshake with a container on this host has mostly happened inside that
            # connect() (the SYN and its answer are processed in the caller's context): a
            # second connect() says so at once (0, or the refusal), and the connection skips
            # an epoll registration, a wake-up and its removal. EALREADY: still under way.
            err = sock.connect_ex((target.address, target.port))
        if err == errno.EALREADY:
            # Registered once, for the connect and then the relay: one epoll_ctl, not three.
            self.loop.register(sock.fileno(), ET_EVENTS, self._on_connected)
        else:
            self._connected(err)

    def _on_connected(self, events: int) -> None:
        assert self.upstream is not None
        if events & CONNECT_FAILED or not events & select.EPOLLOUT:
            self._connected(self.upstream.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR), events)
        else:
            self._connected(0, events)  # writable, no error: connected (no SO_ERROR to ask)

    def _connected(self, err: int, events: int = 0) -> None:
        assert self.upstream is not None
        if err == 0:
            self._start_relay(events)
            return
        self.loop.unregister(self.upstream.fileno())
        self.upstream.close()
        self.upstream = None
        if err in DIAL_FALLBACK_ERRNOS:
            self._dial_next()
        else:
            self.log.info("dial of %s failed: %s", self.tried[-1], os.strerror(err))
            self._abort()

    # 3. relay both ways (once the preamble is out: the client is not read before)
    def _start_relay(self, events: int = 0) -> None:
        """`events`: what the upstream socket's current event said (as of now: epoll reports
        every ready bit, not only the one that woke it). Bytes it announced (a service that
        speaks first) are read here: that edge is spent. Everything else arrives as events:
        registering a socket that is readable already queues one."""
        assert self.upstream is not None
        if self.preamble and not self._send_preamble():
            return
        self.answered = True
        if self.relay is not None:
            self._hand_over()
            return
        self.ways = (
            Direction(self.client, self.upstream, self.pipes, self.counts, TO_CONTAINER, _nothing),
            Direction(self.upstream, self.client, self.pipes, self.counts, TO_CLIENT, self._watch_client_out),
        )
        self.loop.register(self.client.fileno(), CLIENT_EVENTS, self._on_client)
        up = self.upstream.fileno()
        if up in self.loop.handlers:
            self.loop.rebind(up, self._on_upstream)
            if events & INPUT_EVENTS:
                self._on_upstream(events)
        else:
            self.loop.register(up, ET_EVENTS, self._on_upstream)

    def _hand_over(self) -> None:
        """Steps 3 and 4 in the C thread. Out of this loop's epoll set first: the thread's
        own registration sees what is pending (bytes the service sent first among it)."""
        assert self.upstream is not None and self.relay is not None
        self.loop.unregister(self.upstream.fileno())
        try:
            self.relay.hand_over(self.client, self.upstream)
        except OSError as e:
            self.log.warning("a relay thread could not take a connection (%s): both sides reset", e.strerror)
        self.handed_over = True  # open or reset, its end is the thread's to count
        self.closed = True
        self.on_close(self)

    def _watch_client_out(self) -> None:
        # Once, then kept: a connection whose client was slow once may well be again.
        if not self.client_out and not self.closed:
            self.client_out = True
            self.loop.modify(self.client.fileno(), ET_EVENTS)

    def _send_preamble(self) -> bool:
        """True once it is all written. A fresh socket takes the ~50 bytes at once; if it does
        not, the rest goes when the socket is writable again (_start_relay is called back)."""
        assert self.upstream is not None
        try:
            sent = self.upstream.send(self.preamble)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.log.debug("the service closed before the PROXY header was written: %s", e.strerror)
            self._abort()
            return False
        self.preamble = self.preamble[sent:]
        if not self.preamble:
            return True
        fd = self.upstream.fileno()
        if fd in self.loop.handlers:
            self.loop.rebind(fd, self._on_preamble_writable)
        else:
            self.loop.register(fd, ET_EVENTS, self._on_preamble_writable)
        return False

    def _on_preamble_writable(self, events: int) -> None:
        self._start_relay(events)

    # An event pumps only the way it concerns: input on a socket feeds the way it is the
    # source of; EPOLLOUT (which edge-triggered TCP raises whenever acks free buffer space)
    # matters only to the way that has bytes waiting for that socket.
    def _on_client(self, events: int) -> None:
        assert self.ways is not None
        to_container, to_client = self.ways
        try:
            if events & INPUT_EVENTS:
                to_container.pump(events & END_EVENTS)
            if events & EPOLLOUT and (to_client.buffered or to_client.held):
                to_client.pump(0)
        except ConnectionReset:
            self._abort()
            return
        # 4. both halves closed cleanly
        if to_container.done and to_client.done:
            self._close(graceful=True)

    def _on_upstream(self, events: int) -> None:
        assert self.ways is not None
        to_container, to_client = self.ways
        try:
            if events & INPUT_EVENTS:
                to_client.pump(events & END_EVENTS)
            if events & EPOLLOUT and (to_container.buffered or to_container.held):
                to_container.pump(0)
        except ConnectionReset:
            self._abort()
            return
        if to_container.done and to_client.done:
            self._close(graceful=True)

    def _abort(self) -> None:
        self._close(graceful=False)

    def _close(self, graceful: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            # Only this process holds these sockets (made or accepted after its last fork):
            # close() takes them out of the epoll set, no epoll_ctl needed.
            self.loop.forget(sock.fileno())
            # Graceful: both ways ended in FIN, and shutdown_write() turned the crash-time
            # reset off on both sockets. Otherwise SO_LINGER {1, 0}, set since
            # accept/socket(), is still on: close() resets the peer.
            sock.close()
        if self.ways:
            for way in self.ways:
                way.close()
            # A way holds this connection's _watch_client_out: without this the pair would be
            # a reference cycle, freed only by the collector's full passes (10,000 connections
            # of a burst stayed in memory, ~8 MB, until one ran).
            self.ways = None
        self.on_close(self)


def _nothing() -> None:
    """The container side is watched for EPOLLOUT from its connect on."""


class TcpListener:
    """Accepts on one host socket and starts a TcpConnection per client."""

    ACCEPT_BATCH = 64

    def __init__(
        self,
        loop: EventLoop,
        pool: SocketPool,
        pipes: PipePool,
        sock: _socket.socket,
        targets: Sequence[Target],
        counts: Counters,
        log: HookLog,
        proxy: bool = False,
        source: SourceBinder | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.pipes = pipes
        self.sock = sock
        self.targets = tuple(targets)
        self.counts = counts
        self.log = log
        self.proxy = proxy  # each connection starts with a PROXY protocol v2 header
        self.source = source
        # The core's relay threads, once they run (core._start_relay); until then, or
        # without them, the connections are relayed here.
        self.relay: NativeRelay | None = None
        # Client sockets come with SO_LINGER {1, 0} and TCP_NODELAY: accepted sockets inherit
        # them from the listener, which has them from its bind (listeners._bind_one).
        self.connections: set[TcpConnection] = set()
        self.handle: int | None = None  # the threads accept here (give_to_threads)

    def _closed(self, conn: TcpConnection) -> None:
        self.connections.discard(conn)
        if conn.handed_over:
            return  # still open: the relay thread counts its end (stats.RELAY_CLOSED)
        self.counts[TCP_OPEN] -= 1
        if not conn.answered:
            self.counts[TCP_UNANSWERED] += 1

    def start(self) -> None:
        if self.handle is None:
            self.loop.register(self.sock.fileno(), select.EPOLLIN, self._on_readable)

    # The relay threads accept and dial themselves (thread_accept.py), for a listener that
    # needs nothing of this loop's but its slow cases: no PROXY header, the targets known.
    def give_to_threads(self, listener_id: int) -> bool:
        """True once the relay threads accept on this listener (now or before)."""
        if self.handle is not None:
            return True
        if self.relay is None or self.proxy or not self.targets:
            return False
        target = self.targets[0]
        bind_client = self.source is not None and bool(self.source.routing.ready.get(target.family))
        try:
            self.handle = self.relay.listen(
                self.sock.fileno(), listener_id, target.family, target.address, target.port, bind_client=bind_client,
            )
        except (OSError, ValueError) as e:  # ValueError: an address C cannot read (a scope)
            why = e.strerror if isinstance(e, OSError) else str(e)
            self.log.info("the relay threads do not accept on %s (%s): the loop does", self.label, why)
            return False
        self.loop.unregister(self.sock.fileno())
        return True

    def adopt(self, fd: int, err: int) -> None:
        """A connection the threads accepted and passed on: the pool was empty, the dial
        failed (`err`: the next target, or the dial from loopback, is the loop's), or its
        client's address needs the loop's rules (source_address.py)."""
        client = _socket.socket(self.sock.family, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK, self.sock.proto, fd)
        try:
            peer = client.getpeername()
        except OSError:
            client.close()  # reset before we could ask its address: nobody to serve
            return
        if err:
            self.log.debug("a relay thread's dial of %s failed (%s); the loop serves the connection",
                           self.targets[0], os.strerror(err))
        self._serve(client, peer, b"")

    def paused(self, err: int) -> None:
        """The threads stopped accepting here after an accept error (out of descriptors)."""
        assert self.relay is not None and self.handle is not None
        self.log.warning("accept failed (%s); pausing this listener for 100 ms", os.strerror(err))
        relay, handle = self.relay, self.handle
        self.loop.call_later(0.1, lambda: relay.resume(handle))

    @property
    def label(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return str(Target(self.sock.family, host, port))

    def _on_readable(self, _events: int) -> None:
        for _ in range(self.ACCEPT_BATCH):
            try:
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]  # socket.accept's C half
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin;
                    # the kernel keeps queueing in the backlog meanwhile.
                    self.log.warning("accept failed (%s); pausing this listener for 100 ms", e.strerror)
                    self.loop.unregister(self.sock.fileno())
                    self.loop.call_later(0.1, self.start)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            # The rest of socket.accept (family and type given: the constructor asks the kernel
            # for nothing but getsockname), then non-blocking (FIONBIO) as before.
            client = _socket.socket(self.sock.family, _socket.SOCK_STREAM, self.sock.proto, fd)
            client.setblocking(False)
            try:
                preamble = header_for(client, peer) if self.proxy else b""
            except OSError:
                client.close()  # reset before we could ask its address: nobody to serve
                continue
            self._serve(client, peer, preamble)

    def _serve(self, client: _socket.socket, peer: Address, preamble: bytes) -> None:
        conn = TcpConnection(
            self.loop, self.pool, self.pipes, client, self.targets, self.counts, self.log, self._closed,
            peer, self.source, preamble, self.relay,
        )
        self.connections.add(conn)
        self.counts[TCP_OPEN] += 1
        self.counts[TCP_TOTAL] += 1
        conn.start()
