"""Run by test_native_relay.py in a process of its own (a relay thread lives until its
process ends, and under its filter a forbidden call kills the process): the relay threads
of hook/native/portfwd_relay.c between real loopback TCP sockets, as the core hands them
over. Prints one line per scenario and exits 0, or raises.

    python native_relay_scenarios.py [--filter] SCENARIO...
"""

import errno
import hashlib
import os
import select
import socket
import struct
import sys
import threading
import time

from oci_portfwd.native_relay import SLOW_CONNECTION, SLOW_NEED_SOCKETS, SLOW_PAUSED, NativeRelay, load
from oci_portfwd.seccomp_filter import relay_filter
from oci_portfwd.stats import RELAY_ACCEPTED, RELAY_CLOSED, TO_CLIENT, TO_CONTAINER, new_counters

BOUND = 20
LINGER_RESET = struct.pack("ii", 1, 0)


class Bench:
    """A relay with its threads, and pairs made as the core makes them."""

    def __init__(self, filtered: bool) -> None:
        module, why = load()
        assert module is not None, why
        self.counts = new_counters()
        self.relay = NativeRelay(module, 2)
        self.relay.start(self.counts, relay_filter() if filtered else b"")
        self.host = self._listener(relayed=True)  # what the client connects to (the host listener)
        self.service = self._listener(relayed=False)  # the container's service
        self.pairs = 0
        # The listeners given to the threads, open until the process ends, as in the core
        # (which closes one only after stop_accepting). Closed with its scenario, a listener's
        # descriptor number went to the next scenario's listener while a thread still held a
        # wake-up of the closed one: it accepted the new listener's client as the old one's.
        self.accepting: list[socket.socket] = []

    @staticmethod
    def _listener(relayed: bool) -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        if relayed:
            # What the relayed sockets carry from the start (listeners._bind_one, the dialer).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """(client, service): the two ends the relay connects."""
        client = socket.create_connection(self.host.getsockname(), timeout=BOUND)
        relayed_client, _ = self.host.accept()
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.connect(self.service.getsockname())
        service, _ = self.service.accept()
        service.settimeout(BOUND)
        relayed_client.setblocking(False)
        upstream.setblocking(False)
        self.relay.hand_over(relayed_client, upstream)
        self.pairs += 1
        return client, service

    def closed(self) -> int:
        return self.counts[RELAY_CLOSED]

    def wait_closed(self, n: int) -> None:
        deadline = time.monotonic() + BOUND
        while self.closed() < n:
            assert time.monotonic() < deadline, f"{self.closed()} of {n} pairs closed"
            time.sleep(0.01)

    def stop(self) -> str:
        """Close the pipes: the threads end and say why."""
        for fd in self.relay.ctls:
            os.close(fd)
        readable, _, _ = select.select([self.relay.report], [], [], BOUND)
        assert readable, "no relay thread reported its end"
        return self.relay.why_stopped()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(1 << 20, n - len(data)))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def assert_reset(sock: socket.socket, what: str) -> None:
    """`sock`'s next read is a reset (ECONNRESET), not bytes nor an EOF."""
    sock.settimeout(BOUND)
    try:
        data = sock.recv(10)
    except ConnectionResetError:
        return
    raise AssertionError(f"{what} reached the other side as {data!r}, not as a reset")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_messages(b: Bench) -> None:
    before = (b.counts[TO_CONTAINER], b.counts[TO_CLIENT])
    client, service = b.pair()
    for i in range(300):
        message = b"request %d" % i
        client.sendall(message)
        assert read_exactly(service, len(message)) == message
        service.sendall(message.upper())
        assert read_exactly(client, len(message)) == message.upper()
    client.close()  # its SO_LINGER is off here: a FIN
    assert read_to_eof(service) == b""
    service.close()
    b.wait_closed(b.pairs)
    sent = sum(len(b"request %d" % i) for i in range(300))
    assert (b.counts[TO_CONTAINER] - before[0], b.counts[TO_CLIENT] - before[1]) == (sent, sent)


def half_close_both_ways(b: Bench) -> None:
    """5 MiB up and a half-close, then 3 MiB down after it, then the other half-close."""
    before = (b.counts[TO_CONTAINER], b.counts[TO_CLIENT])
    client, service = b.pair()
    up, down = os.urandom(5 << 20), os.urandom(3 << 20)
    writer = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(socket.SHUT_WR)))
    writer.start()
    got = read_to_eof(service)
    writer.join(BOUND)
    assert (len(got), sha(got)) == (len(up), sha(up))
    service.sendall(down)
    service.shutdown(socket.SHUT_WR)
    got = read_to_eof(client)
    assert (len(got), sha(got)) == (len(down), sha(down))
    client.close()
    service.close()
    b.wait_closed(b.pairs)
    assert (b.counts[TO_CONTAINER] - before[0], b.counts[TO_CLIENT] - before[1]) == (len(up), len(down))


def slow_reader(b: Bench) -> None:
    """The client reads nothing for half a second while 8 MiB come: held, then every byte."""
    client, service = b.pair()
    data = os.urandom(8 << 20)
    writer = threading.Thread(target=lambda: (service.sendall(data), service.close()))
    writer.start()
    time.sleep(0.5)
    got = read_to_eof(client)
    writer.join(BOUND)
    assert (len(got), sha(got)) == (len(data), sha(data))
    client.close()
    b.wait_closed(b.pairs)


def reset_both_ways(b: Bench) -> None:
    """A reset on either side reaches the other as a reset, never as a clean end."""
    for resetting in ("service", "client"):
        client, service = b.pair()
        client.sendall(b"x")
        assert read_exactly(service, 1) == b"x"
        ends = {"client": client, "service": service}
        gone, other = ends.pop(resetting), next(iter(ends.values()))
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        gone.close()
        assert_reset(other, f"{resetting}'s reset")
        other.close()
        b.wait_closed(b.pairs)


def service_speaks_first(b: Bench) -> None:
    """Bytes already waiting on the container side when the pair is handed over."""
    client = socket.create_connection(b.host.getsockname(), timeout=BOUND)
    relayed_client, _ = b.host.accept()
    upstream = socket.create_connection(b.service.getsockname(), timeout=BOUND)
    service, _ = b.service.accept()
    service.sendall(b"220 hello\r\n")
    time.sleep(0.05)  # queued on upstream before the hand-over (no event will announce it again)
    relayed_client.setblocking(False)
    upstream.setblocking(False)
    b.relay.hand_over(relayed_client, upstream)
    b.pairs += 1
    assert read_exactly(client, 11) == b"220 hello\r\n"
    client.close()
    service.close()
    b.wait_closed(b.pairs)


def many_pairs(b: Bench) -> None:
    """200 pairs at once, dealt over both threads, all closed and counted."""
    pairs = [b.pair() for _ in range(200)]
    for i, (client, _service) in enumerate(pairs):
        client.sendall(b"%d" % i)
    for i, (client, service) in enumerate(pairs):
        assert read_exactly(service, len(b"%d" % i)) == b"%d" % i
        client.close()
        service.close()
    b.wait_closed(b.pairs)


def ended_before_hand_over(b: Bench) -> None:
    """2,000 pairs one after the other whose both sides wrote and closed their way before the
    hand-over: add() puts the container side in the thread's set first, so its bytes wake the
    thread before add() armed the pair (the thread waits for it); the thread relays both ways
    and ends the pair while the next ones are added; their memory is handed back and reused."""
    for i in range(2000):
        client = socket.create_connection(b.host.getsockname(), timeout=BOUND)
        relayed_client, _ = b.host.accept()
        upstream = socket.create_connection(b.service.getsockname(), timeout=BOUND)
        service, _ = b.service.accept()
        service.settimeout(BOUND)
        client.sendall(b"%d" % i)
        client.shutdown(socket.SHUT_WR)
        service.sendall(b"s%d" % i)
        service.shutdown(socket.SHUT_WR)
        relayed_client.setblocking(False)
        upstream.setblocking(False)
        b.relay.hand_over(relayed_client, upstream)
        b.pairs += 1
        assert read_to_eof(service) == b"%d" % i
        service.close()
        assert read_to_eof(client) == b"s%d" % i
        client.close()
    b.wait_closed(b.pairs)


def add_refused(b: Bench) -> None:
    """A pair the thread cannot take (a regular file is no epoll target: EPERM): add() says so,
    the client is reset, the close is counted, and the threads go on taking pairs."""
    client = socket.create_connection(b.host.getsockname(), timeout=BOUND)
    relayed_client, _ = b.host.accept()
    file_fd = os.open("/dev/null", os.O_RDONLY)
    before = b.closed()
    try:
        b.relay.module.add(b.relay.indexes[0], relayed_client.detach(), file_fd)
    except OSError as e:
        assert e.errno == errno.EPERM, e
    else:
        raise AssertionError("add() took a regular file")
    assert b.closed() == before + 1
    assert_reset(client, "a pair add() refused")
    client.close()
    many_pairs(b)


# --- the threads accept and dial themselves (native_relay.listen, thread_accept.py) --------


class Accepting:
    """A host listener given to the threads, and the loop's side of their records."""

    def __init__(self, b: Bench, target: tuple[str, int], listener_id: int, *, bind_client: bool = False) -> None:
        self.b = b
        self.sock = b._listener(relayed=True)
        b.accepting.append(self.sock)
        self.id = listener_id
        self.handle = b.relay.listen(self.sock.fileno(), listener_id, socket.AF_INET, target[0], target[1],
                                     bind_client=bind_client)
        self.connections: list[tuple[int, int]] = []  # (client fd, errno) passed to the loop
        self.paused: list[int] = []
        self.asked = 0
        self.dialled = 0  # by serve_records(dial=True), as the loop would

    def connect(self, source: tuple[str, int] | None = None) -> socket.socket:
        client = socket.socket()
        if source is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.bind(source)
        client.settimeout(BOUND)
        client.connect(self.sock.getsockname())
        return client

    def serve_records(self, *, supply: bool = True, dial: bool = False) -> None:
        """What the loop does: sockets when asked (`supply`), and with `dial` the connections
        passed to it, dialled and handed back (a dial still under way when the thread tried
        again, EALREADY, on a loaded machine); the rest kept for the scenario."""
        assert self.b.relay.slow is not None
        select.select([self.b.relay.slow], [], [], 0.2)
        for what, a, c, err in self.b.relay.records():
            if what == SLOW_NEED_SOCKETS:
                assert a == 0, "asked for IPv6 sockets by an IPv4 listener"
                self.asked += c
                if supply:
                    self.b.supply(c)
            elif what == SLOW_CONNECTION:
                assert a == self.id, f"listener {self.id} got a connection of listener {a} (errno {err})"
                if dial and err in (0, errno.EALREADY):
                    upstream = socket.socket()
                    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    upstream.connect(self.b.service.getsockname())
                    upstream.setblocking(False)
                    client = socket.socket(fileno=c)
                    client.setblocking(False)
                    self.b.relay.hand_over(client, upstream)
                    self.dialled += 1
                else:
                    self.connections.append((c, err))
            elif what == SLOW_PAUSED:
                if a < self.id and c == errno.EMFILE:
                    # An earlier scenario's listener, woken with a stale event while
                    # threads_paused holds every descriptor: accept4 takes a descriptor number
                    # before it looks at the backlog, so it pauses too (seen once in ~6 runs).
                    continue
                assert a == self.id, f"listener {self.id} got the pause of listener {a}"
                self.paused.append(c)

    def wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + BOUND
        while not condition():
            assert time.monotonic() < deadline, f"no {what}"
            self.serve_records()


def supply(b: Bench, n: int, reuse: bool = False) -> None:
    for _ in range(n):
        sock = socket.socket()
        # What the dialer gives every container-side socket (and SO_REUSEADDR with the client's
        # address, with which it makes them transparent).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        b.relay.supply(socket.AF_INET, [sock.detach()])


Bench.supply = supply  # type: ignore[attr-defined]


def threads_pool_empty(b: Bench) -> None:
    """No socket supplied yet: the client goes to the loop whole (its own descriptor, nothing
    tried), and the threads ask for sockets."""
    a = Accepting(b, b.service.getsockname(), 3)
    client = a.connect()
    a.wait(lambda: a.connections and a.asked, "record of the connection and of the request for sockets")
    (fd, err), = a.connections
    assert err == 0 and a.asked == b.relay.module.POOL_ASK, (err, a.asked)
    passed = socket.socket(fileno=fd)
    assert passed.getpeername() == client.getsockname()
    passed.close()
    client.close()


def threads_relay(b: Bench) -> None:
    """50 clients at once, each accepted, dialled and relayed by the threads; all counted."""
    a = Accepting(b, b.service.getsockname(), 4)
    b.supply(b.relay.module.POOL_MAX - b.relay.module.POOL_ASK)  # (asked for in threads_pool_empty)
    accepted, closed = b.counts[RELAY_ACCEPTED], b.closed()
    clients = [a.connect() for _ in range(50)]
    services = []
    for i, client in enumerate(clients):
        client.sendall(b"%02d" % i)
    by_id = {}
    b.service.settimeout(BOUND)
    for _ in clients:
        a.serve_records(dial=True)
        service, _ = b.service.accept()
        service.settimeout(BOUND)
        by_id[int(read_exactly(service, 2))] = service
        services.append(service)
    for i, client in enumerate(clients):
        by_id[i].sendall(b"answer %02d" % i)
        assert read_exactly(client, 9) == b"answer %02d" % i
        client.close()
        assert read_to_eof(by_id[i]) == b""
        by_id[i].close()
    b.wait_closed(closed + 50)
    a.serve_records(dial=True)
    assert not a.connections, f"{len(a.connections)} connections went to the loop: {a.connections}"
    # Passed to the loop only where a dial was still under way (a loaded machine).
    assert b.counts[RELAY_ACCEPTED] - accepted == 50 - a.dialled, (b.counts[RELAY_ACCEPTED] - accepted, a.dialled)
    assert a.dialled < 50
    assert b.relay.module.pairs() == [0, 0]


def threads_spread(b: Bench) -> None:
    """Two connections opened together are relayed by the two threads, whichever accepted."""
    a = Accepting(b, b.service.getsockname(), 5)
    clients = [a.connect() for _ in range(2)]
    services = [b.service.accept()[0] for _ in clients]
    a.serve_records()
    assert b.relay.module.pairs() == [1, 1], b.relay.module.pairs()
    for sock in clients + services:
        sock.close()
    b.wait_closed(b.closed() + 0)


def threads_refused(b: Bench) -> None:
    """A refused dial: the client goes to the loop with the errno (the loop tries the next
    target), the container-side socket is closed by the threads."""
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    port = gone.getsockname()[1]
    gone.close()
    a = Accepting(b, ("127.0.0.1", port), 6)
    client = a.connect()
    a.wait(lambda: a.connections, "record of the refused connection")
    (fd, err), = a.connections
    assert err == errno.ECONNREFUSED, os.strerror(err)
    passed = socket.socket(fileno=fd)
    assert passed.getpeername() == client.getsockname()
    passed.close()
    client.close()


def threads_bind_client(b: Bench) -> None:
    """bind_client: the service sees the client's own address and port; a port the threads
    cannot bind goes to the loop with the errno."""
    a = Accepting(b, b.service.getsockname(), 7, bind_client=True)
    b.supply(4, reuse=True)
    for _attempt in range(3):
        client = a.connect(("127.0.0.3", 0))  # SO_REUSEADDR on both: the same address:port twice
        a.wait(lambda: a.connections or select.select([b.service], [], [], 0)[0], "dial or record")
        if not a.connections:
            break
        # A dial still under way at the second connect() (EALREADY: a loaded machine; the
        # loop would dial again, unbound): not this scenario's question, so once more.
        (fd, err), = a.connections
        assert err == errno.EALREADY, f"the bound dial went to the loop: {os.strerror(err) if err else 'no socket'}"
        a.connections.clear()
        os.close(fd)
        client.close()
        b.supply(1, reuse=True)
    service, peer = b.service.accept()
    assert peer == client.getsockname(), (peer, client.getsockname())
    client.sendall(b"x")
    service.settimeout(BOUND)
    assert service.recv(1) == b"x"
    client.close()
    service.close()
    # Without SO_REUSEADDR on the client's socket, its address:port cannot be bound twice here.
    taken = socket.socket()
    taken.bind(("127.0.0.4", 0))
    taken.settimeout(BOUND)
    taken.connect(a.sock.getsockname())
    a.wait(lambda: a.connections, "record of the connection whose address is taken")
    (fd, err), = a.connections
    assert err == errno.EADDRINUSE, os.strerror(err)
    os.close(fd)
    taken.close()


def threads_pool_grows(b: Bench) -> None:
    """A take that finds the pool empty after a supply doubles its low mark: from then on the
    threads keep more sockets ready (asked for sooner) for a burst like the last one."""
    m = b.relay.module
    ready, _asked, low = m.pool_state(0)
    assert low == m.POOL_LOW and ready > 0, m.pool_state(0)  # no shortfall in the scenarios before
    a = Accepting(b, b.service.getsockname(), 10)
    pairs = []
    for _ in range(ready):  # each takes one; what the threads ask for is not supplied yet
        client = a.connect()
        pairs += [client, b.service.accept()[0]]
    assert m.pool_state(0)[0] == 0, m.pool_state(0)
    assert m.pool_state(0)[2] == low, "an empty pool after the last take is no shortfall yet"
    late = a.connect()
    deadline = time.monotonic() + BOUND
    while not a.connections:
        assert time.monotonic() < deadline, "no record of the connection the empty pool could not serve"
        a.serve_records(supply=False)
    (fd, err), = a.connections
    assert err == 0, os.strerror(err)  # nothing tried: no socket
    os.close(fd)
    late.close()
    ready, asked, grown = m.pool_state(0)
    assert grown == min(2 * low, m.POOL_LOW_MAX), (ready, asked, grown)
    assert asked >= grown - m.POOL_ASK, (asked, grown)  # asked for up to the new mark
    b.supply(asked)  # what was asked for: the pool is full again for the scenarios after
    for sock in pairs:
        sock.close()


def threads_paused(b: Bench) -> None:
    """Out of descriptors: the threads stop accepting on the listener and say so; resumed,
    the waiting connection is served."""
    import resource

    a = Accepting(b, b.service.getsockname(), 8)
    a.serve_records()
    client = socket.socket()
    client.settimeout(BOUND)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    fillers = []
    try:
        while True:  # every free number below the limit taken: the next accept has none
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                assert e.errno == errno.EMFILE, e
                break
        client.connect(a.sock.getsockname())  # no descriptor of its own: the backlog takes it
        deadline = time.monotonic() + BOUND
        while not a.paused:
            assert time.monotonic() < deadline, "no record of the pause"
            a.serve_records(supply=False)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert a.paused == [errno.EMFILE], a.paused
    b.relay.resume(a.handle)
    service, _ = b.service.accept()
    client.sendall(b"late")
    service.settimeout(BOUND)
    assert read_exactly(service, 4) == b"late"
    client.close()
    service.close()


def threads_stopped(b: Bench) -> None:
    """stop_accepting (the core is ending): a new connection stays in the backlog, for the
    next core, instead of being accepted by a thread and reset by this process's end. Last:
    it stops every listener of the process."""
    a = Accepting(b, b.service.getsockname(), 9)
    b.relay.stop_accepting()
    b.relay.resume(a.handle)  # a no-op after a stop
    accepted = b.counts[RELAY_ACCEPTED]
    client = a.connect()
    time.sleep(0.2)
    a.serve_records()
    assert b.counts[RELAY_ACCEPTED] == accepted and not a.connections
    readable, _, _ = select.select([a.sock], [], [], BOUND)
    assert readable, "the connection is not in the backlog"
    queued, _ = a.sock.accept()
    assert queued.getpeername() == client.getsockname()
    queued.close()
    client.close()


SCENARIOS = {f.__name__: f for f in (small_messages, half_close_both_ways, slow_reader, reset_both_ways,
                                     service_speaks_first, many_pairs, ended_before_hand_over, add_refused,
                                     threads_pool_empty, threads_relay, threads_spread, threads_refused,
                                     threads_bind_client, threads_pool_grows, threads_paused, threads_stopped)}


def main(argv: list[str]) -> int:
    filtered = "--filter" in argv
    bench = Bench(filtered)
    for name in (a for a in argv if not a.startswith("--")):
        SCENARIOS[name](bench)
        print(name, "ok", flush=True)
    print("stopped:", bench.stop(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
