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

from oci_portfwd.native_relay import NativeRelay, load
from oci_portfwd.seccomp_filter import relay_filter
from oci_portfwd.stats import RELAY_CLOSED, TO_CLIENT, TO_CONTAINER, new_counters

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


SCENARIOS = {f.__name__: f for f in (small_messages, half_close_both_ways, slow_reader, reset_both_ways,
                                     service_speaks_first, many_pairs, ended_before_hand_over, add_refused)}


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
