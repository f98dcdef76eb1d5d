"""UDP datagrams in batches (hook/native/udp_batch.c, native_relay.UdpBatch) between real
loopback sockets: runs by source named as recvfrom() names them (the sessions' keys), every
datagram delivered once, in order and whole, whatever the mix of sizes that UDP_SEGMENT
messages are made of, a route that cannot segment (datagram by datagram, and said so), an ICMP
refusal reported with how much went, and the bounds of the batch. The containers' view:
tests/e2e/test_forwarding.py (test_udp_burst*)."""

import errno
import socket

import pytest
from oci_portfwd.native_relay import NATIVE_RELAY, UdpBatch, load

SO_NO_CHECK = 11  # <asm-generic/socket.h>: no UDP checksum, so no UDP_SEGMENT (EINVAL)
IP_RECVERR = 11


@pytest.fixture(scope="module")
def module():
    m, why_not = load()
    if m is None:
        pytest.fail(f"the extension does not load ({why_not}): run `make venv` ({NATIVE_RELAY})")
    return m


def udp(family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)
    return s


def drain(sock):
    got = []
    while True:
        try:
            got.append(sock.recvfrom(70000))
        except BlockingIOError:
            return got


def relay(batch, rx, tx, destination, *, segment=True):
    """Receive one batch from rx and send every run to destination from tx."""
    runs = batch.receive(rx.fileno(), by_source=True)
    results = [batch.send(tx.fileno(), tx.family, first, count, destination, segment=segment)
               for _, first, count, _ in runs]
    return runs, results


def test_nothing_to_read_is_an_empty_list(module):
    rx = udp()
    assert UdpBatch(module).receive(rx.fileno(), by_source=True) == []


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_runs_by_source_named_like_recvfrom(module, family):
    rx, a, b = udp(family), udp(family), udp(family)
    order = [a, a, b, a, a, a, b, b]
    for i, s in enumerate(order):
        s.sendto(b"%d" % i, rx.getsockname())
    runs = UdpBatch(module).receive(rx.fileno(), by_source=True)
    # recvfrom's own names for the senders: the same tuples, so the same dict keys.
    named = {s: s.getsockname() for s in (a, b)}
    assert [(src, first, count) for src, first, count, _ in runs] == [
        (named[a], 0, 2), (named[b], 2, 1), (named[a], 3, 3), (named[b], 6, 2)]
    assert [size for *_, size in runs] == [2, 1, 3, 2]


def test_one_run_without_sources(module):
    rx, a, b = udp(), udp(), udp()
    for s in (a, b, a):
        s.sendto(b"xy", rx.getsockname())
    assert UdpBatch(module).receive(rx.fileno(), by_source=False) == [(None, 0, 3, 6)]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("sizes", [
    [1400] * 64,                                   # one size: UDP_SEGMENT messages of 46
    [1400] * 10 + [700] + [1400] * 5,              # a shorter one ends a message
    [1400, 0, 0, 1400, 1400],                      # empty datagrams are datagrams too
    [1] * 30 + [2] * 30,                           # a longer one starts a new message
    [30000] * 5,                                   # two per message: 65,507 bytes at most
    [65507, 65507],                                # the largest IPv4 datagram
], ids=["one-size", "shorter-ends", "empty", "longer-starts", "big", "largest"])
def test_every_datagram_once_in_order_and_whole(module, family, sizes):
    rx, tx, dst, client = udp(family), udp(family), udp(family), udp(family)
    sent = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    for data in sent:
        client.sendto(data, rx.getsockname())
    runs, results = relay(UdpBatch(module), rx, tx, dst.getsockname())
    assert [count for _, _, count, _ in runs] == [len(sizes)]
    assert results == [(len(sizes), 0, True)]
    got = drain(dst)
    assert [len(data) for data, _ in got] == sizes
    assert [data for data, _ in got] == sent
    assert {src for _, src in got} == {tx.getsockname()}


def test_a_route_that_cannot_segment_goes_datagram_by_datagram(module):
    # Without checksums the kernel refuses UDP_SEGMENT (EINVAL): the batch is sent again one
    # datagram per message, and the caller is told to stop asking on this socket.
    rx, tx, dst, client = udp(), udp(), udp(), udp()
    tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sent = [b"%02d" % i * 700 for i in range(20)]
    for data in sent:
        client.sendto(data, rx.getsockname())
    _, results = relay(UdpBatch(module), rx, tx, dst.getsockname())
    assert results == [(20, 0, False)]
    assert [data for data, _ in drain(dst)] == sent


def test_segment_false_sends_one_per_message(module):
    rx, tx, dst, client = udp(), udp(), udp(), udp()
    for _ in range(10):
        client.sendto(b"z" * 1000, rx.getsockname())
    _, results = relay(UdpBatch(module), rx, tx, dst.getsockname(), segment=False)
    assert results == [(10, 0, False)]
    assert len(drain(dst)) == 10


def nobody():
    closed = udp()
    address = closed.getsockname()
    closed.close()
    return address


def test_refusal_is_reported_with_what_went(module):
    rx, client, tx = udp(), udp(), udp()
    tx.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    batch = UdpBatch(module)
    destination = nobody()
    client.sendto(b"first", rx.getsockname())
    assert relay(batch, rx, tx, destination)[1] == [(1, 0, True)]  # refused (ICMP) after it went
    for _ in range(3):
        client.sendto(b"again", rx.getsockname())
    assert relay(batch, rx, tx, destination)[1] == [(0, errno.ECONNREFUSED, True)]  # none went


def test_refusal_raised_on_receive(module):
    # What a session's socket reads after its datagram was refused: the error, not a datagram.
    tx = udp()
    tx.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    tx.sendto(b"x", nobody())
    with pytest.raises(ConnectionRefusedError):
        UdpBatch(module).receive(tx.fileno(), by_source=False)


def test_datagram_copies_and_bounds(module):
    rx, client = udp(), udp()
    batch = UdpBatch(module)
    client.sendto(b"kept", rx.getsockname())
    client.sendto(b"", rx.getsockname())
    assert batch.receive(rx.fileno(), by_source=True)[0][1:] == (0, 2, 4)
    assert batch.datagram(0) == b"kept"
    assert batch.datagram(1) == b""
    with pytest.raises(IndexError):
        batch.datagram(2)
    with pytest.raises(IndexError):
        batch.send(rx.fileno(), socket.AF_INET, 1, 2, ("127.0.0.1", 9), segment=True)


def test_a_destination_of_another_family_is_refused(module):
    rx, client = udp(), udp()
    batch = UdpBatch(module)
    client.sendto(b"x", rx.getsockname())
    batch.receive(rx.fileno(), by_source=True)
    with pytest.raises(ValueError, match="family"):
        batch.send(rx.fileno(), socket.AF_INET, 0, 1, ("::1", 9), segment=True)
    with pytest.raises(OverflowError):
        batch.send(rx.fileno(), socket.AF_INET, 0, 1, ("127.0.0.1", 70000), segment=True)


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_release_gives_the_pages_back(module):
    rx, client = udp(), udp()
    batch = UdpBatch(module)
    before = rss_kib()
    for _ in range(40):
        client.sendto(b"b" * 60000, rx.getsockname())
    assert batch.receive(rx.fileno(), by_source=True)[0][2] == 40
    touched = rss_kib()
    assert touched - before > 2000, (before, touched)  # 40 slots of ~59 KiB
    batch.release()
    assert touched - rss_kib() > 2000, (touched, rss_kib())
    with pytest.raises(IndexError):
        batch.datagram(0)  # nothing left in it
    client.sendto(b"after", rx.getsockname())
    assert batch.receive(rx.fileno(), by_source=True)[0][1:] == (0, 1, 5)
    assert batch.datagram(0) == b"after"
