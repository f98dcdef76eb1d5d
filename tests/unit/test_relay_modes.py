"""The TCP relay's two ways of moving bytes, with real loopback sockets and the real event loop
(the dialer's pool is the only stand-in): small messages are copied through the shared buffer,
a read that fills it switches the way to splice, and back. What these check is what the
edge-triggered loop must not lose: bytes a full client could not take yet (held), and an EOF
that arrived while they were held (its event was spent then: nothing announces it again).
Every blocking call is bounded; nothing is timed."""

import hashlib
import socket
import threading

import pytest
from oci_portfwd import tcp_relay
from oci_portfwd.addressing import Target
from oci_portfwd.eventloop import EventLoop
from oci_portfwd.stats import TO_CLIENT, TO_CONTAINER, new_counters
from oci_portfwd.tcp_relay import COPY_SIZE, PipePool, TcpConnection

from .relaykit import run_until_closed

BOUND = 20


class FreshSockets:
    def get(self, kind, callback):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        callback(sock)


def relay_with_client(loop, closed, client, service, bound=None):
    """Run the relay's loop until the connection closes (or `bound` seconds pass, recorded in
    `closed`), with `client` in a thread of its own; then wait for client and service."""
    reader = threading.Thread(target=client)
    reader.start()
    if bound is not None:
        loop.call_later(bound, lambda: closed.append("timed out"))
    run_until_closed(loop, closed)
    reader.join(BOUND)
    service.join(BOUND)


def _log():
    import logging

    return logging.getLogger("test_relay_modes")


def serve_once(handler):
    """A one-connection service running `handler(conn)` in a thread; returns (target, thread)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(BOUND)

    def run():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(BOUND)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(conn)
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return Target(socket.AF_INET, "127.0.0.1", listener.getsockname()[1]), thread


def relay(target, client_sndbuf=None):
    """A TcpConnection from a socketpair's end (the client's socket as the relay sees it) to
    `target`; returns (loop, conn, the client's end, closed list, counters)."""
    client_end, relay_end = socket.socketpair()
    relay_end.setblocking(False)
    if client_sndbuf:
        relay_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, client_sndbuf)
        client_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_sndbuf)
    loop = EventLoop()
    closed: list = []
    counts = new_counters()
    conn = TcpConnection(loop, FreshSockets(), PipePool(), relay_end, [target], counts, _log(), closed.append)
    return loop, conn, client_end, closed, counts


def relay_a_hello():
    """A service that says hello and closes, relayed to a client that has closed its side;
    returns (the connection, the client's end) once it is closed, all of the hello through."""
    target, service = serve_once(lambda conn: conn.sendall(b"hello"))
    loop, conn, client_end, closed, _counts = relay(target)
    client_end.shutdown(socket.SHUT_WR)
    conn.start()
    got = {}
    relay_with_client(loop, closed, lambda: got.setdefault("data", read_to_eof(client_end)), service, BOUND)
    assert closed == [conn] and got["data"] == b"hello"
    closed.clear()  # it holds the connection, whose on_close is closed.append: the test's own cycle
    return conn, client_end


def read_to_eof(sock):
    sock.settimeout(BOUND)
    parts = []
    while data := sock.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def test_small_messages_a_full_client_cannot_take_are_held_and_its_eof_still_follows(monkeypatch):
    """The client reads nothing until the service's FIN has reached the relay while the relay
    held bytes for it: the relay's sends to the client fell short, the rest was held, and the
    FIN's edge was spent on a way that could not move. Once the client reads, everything and
    then EOF must arrive (the read after the held bytes went out finds the FIN with the last
    bytes: the relay must read on to see it)."""
    # A buffer's worth and a little: the relay holds most of the first read, and the little
    # rest comes with the FIN, which the read after the held bytes went out finds.
    messages = [bytes(range(251)) * 262, b"the rest"]
    fin_while_held = threading.Event()
    original_pump = tcp_relay.Direction.pump

    def pump(self, drain=1):
        original_pump(self, drain)
        if drain and self.held and not self.eof:
            fin_while_held.set()  # the FIN's event came and went; the client still takes nothing

    monkeypatch.setattr(tcp_relay.Direction, "pump", pump)
    watched = []
    original = TcpConnection._watch_client_out
    monkeypatch.setattr(TcpConnection, "_watch_client_out", lambda self: (watched.append(1), original(self)))
    target, service = serve_once(lambda conn: [conn.sendall(m) for m in messages])
    loop, conn, client_end, closed, counts = relay(target, client_sndbuf=4096)
    client_end.shutdown(socket.SHUT_WR)  # the client has nothing to say
    conn.start()
    result: dict = {}

    def client():
        result["fin while held"] = fin_while_held.wait(BOUND)
        result["data"] = read_to_eof(client_end)

    relay_with_client(loop, closed, client, service, BOUND)
    assert closed == [conn], "the relay never finished the connection"
    assert result["fin while held"], "the service's FIN did not come while bytes were held"
    expected = b"".join(messages)
    assert hashlib.sha256(result["data"]).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert watched, "the client never was full: the held path was not taken"
    assert counts[TO_CLIENT] == len(expected)
    assert counts[TO_CONTAINER] == 0
    client_end.close()


def test_bulk_is_spliced_then_small_messages_are_copied_again_in_order(monkeypatch):
    """A megabyte (reads that fill the buffer: splice), then a request/answer exchange of
    small messages on the same connection (copied), then the client's half-close."""
    bulk = bytes(range(256)) * 4096  # 1 MiB
    modes = []
    original_splice = tcp_relay.Direction._splice
    monkeypatch.setattr(tcp_relay.Direction, "_splice", lambda self: (modes.append("splice"), original_splice(self)))
    at_close = []  # each way's mode when the connection closes (it lets go of its ways then)
    original_close = tcp_relay.Direction.close
    monkeypatch.setattr(tcp_relay.Direction, "close", lambda self: (at_close.append(self.bulk), original_close(self)))

    def talk(conn):
        conn.sendall(bulk)
        for _ in range(5):
            question = conn.recv(64)
            conn.sendall(b"answer to " + question)
        assert conn.recv(64) == b""  # the client's half-close came through
        conn.sendall(b"last words")

    target, service = serve_once(talk)
    loop, conn, client_end, closed, counts = relay(target)
    conn.start()
    result: dict = {"answers": []}

    def client():
        client_end.settimeout(BOUND)
        got = b""
        while len(got) < len(bulk):
            got += client_end.recv(1 << 16)
        result["bulk"] = got
        for i in range(5):
            client_end.sendall(b"q%d" % i)
            result["answers"].append(client_end.recv(64))
        client_end.shutdown(socket.SHUT_WR)
        result["last"] = read_to_eof(client_end)

    relay_with_client(loop, closed, client, service)
    assert result["bulk"] == bulk
    assert result["answers"] == [b"answer to q%d" % i for i in range(5)]
    assert result["last"] == b"last words"
    assert modes, "the megabyte was never spliced"
    assert at_close == [False, False]  # small again at the end (to the client: the second way)
    assert counts[TO_CLIENT] == len(bulk) + sum(len(b"answer to q0") for _ in range(5)) + len(b"last words")
    assert counts[TO_CONTAINER] == 5 * len(b"q0")
    assert COPY_SIZE < len(bulk)
    client_end.close()


@pytest.mark.parametrize("preamble", [b"", bytes(range(256)) * (8 * 4096)], ids=["plain", "long-preamble"])
def test_a_service_that_speaks_first_is_heard_before_the_client_says_anything(preamble):
    """The service's banner can come with the very event that says the connect completed (or
    while a long preamble is still going out): that edge is spent, the relay must read it
    then, not wait for a next one that never comes."""

    def talk(conn):
        conn.sendall(b"220 hello\r\n")
        got = b""
        while not got.endswith(b"quit\r\n"):
            data = conn.recv(1 << 16)
            assert data, "EOF before the client's quit"
            got += data
        assert got == preamble + b"quit\r\n"
        conn.sendall(b"221 bye\r\n")

    target, service = serve_once(talk)
    client_end, relay_end = socket.socketpair()
    relay_end.setblocking(False)
    loop = EventLoop()
    closed: list = []
    conn = TcpConnection(
        loop, FreshSockets(), PipePool(), relay_end, [target], new_counters(), _log(), closed.append, preamble=preamble
    )
    conn.start()
    result: dict = {}

    def client():
        client_end.settimeout(BOUND)
        result["banner"] = client_end.recv(64)
        client_end.sendall(b"quit\r\n")
        client_end.shutdown(socket.SHUT_WR)
        result["rest"] = read_to_eof(client_end)

    relay_with_client(loop, closed, client, service, BOUND)
    assert closed == [conn]
    assert result == {"banner": b"220 hello\r\n", "rest": b"221 bye\r\n"}
    client_end.close()


def test_a_closed_connection_is_freed_at_once_not_by_the_collector():
    """No reference cycle per connection (a way held the connection's own bound method): a
    burst of 10,000 connections then stayed in the core's memory, ~8 MB, until a full
    collection ran (tests/e2e/test_load.py saw it grow round after round)."""
    import gc

    conn, client_end = relay_a_hello()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, to be seen
    try:
        del conn
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if type(o) in (TcpConnection, tcp_relay.Direction)]
        assert not cyclic, cyclic
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        client_end.close()


def _count_dial_events(monkeypatch):
    """How many times a connection waited for its connect's event (TcpConnection._on_connected)."""
    calls: list = []
    original = TcpConnection._on_connected

    def counted(self, events):
        calls.append(events)
        original(self, events)

    monkeypatch.setattr(TcpConnection, "_on_connected", counted)
    return calls


def test_a_service_on_this_host_is_connected_within_the_dial_no_event_waited_for(monkeypatch):
    """The SYN to a local service is answered inside connect(): the second connect() says so and
    the connection relays at once, without waiting for the loop."""
    calls = _count_dial_events(monkeypatch)
    _conn, client_end = relay_a_hello()
    assert calls == []
    client_end.close()


def test_a_dial_still_under_way_after_connect_completes_through_the_loop(monkeypatch):
    """A service whose accept queue is full drops the SYN: the connect is still under way
    (EALREADY) and the connection waits for its event; once the queue has room, the SYN's
    retransmission (~1 s) is answered and the bytes flow."""
    calls = _count_dial_events(monkeypatch)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # room for one connection in the accept queue
    listener.settimeout(BOUND)
    filler = socket.create_connection(listener.getsockname(), timeout=BOUND)
    target = Target(socket.AF_INET, "127.0.0.1", listener.getsockname()[1])

    def serve():
        first, _ = listener.accept()  # the filler: the queue has room again
        first.close()
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"hello")
        listener.close()

    loop, conn, client_end, closed, _counts = relay(target)
    client_end.shutdown(socket.SHUT_WR)
    conn.start()
    assert conn.upstream is not None and conn.upstream.fileno() in loop.handlers, "the dial did not wait"
    service = threading.Thread(target=serve, daemon=True)
    service.start()
    got = {}
    relay_with_client(loop, closed, lambda: got.setdefault("data", read_to_eof(client_end)), service, BOUND)
    assert closed == [conn] and got["data"] == b"hello"
    assert len(calls) == 1
    filler.close()
    client_end.close()
