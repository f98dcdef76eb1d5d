"""UDP bursts through a real container, under crun and runc, IPv4 and IPv6 clients, through both
paths of the core: datagrams in batches (udp_batch.c: recvmmsg, sendmmsg with UDP_SEGMENT, the
default) and one by one in the Python loop (without the extension, or with its test switch).

What must hold whatever the batching: the service gets every datagram once, whole and in
order (one size in a row travels as one UDP_SEGMENT message: the service must still see them
one by one), the client gets every reply the same way, a burst sent before the session has
its container-side socket waits for it, several clients in one batch each get their own
replies, the traffic page counts every byte, and a core whose sessions all went idle gives
the memory of a burst of large datagrams back.

Each burst stays under the service's default receive buffer (~90 datagrams of 1,400 bytes)
so that a loss can only be ours.
"""

import os
import socket

import pytest
from e2ekit.container import ContainerFactory, published
from e2ekit.forwarding import forwarding_of, rss_kib
from e2ekit.hookenv import HookEnv
from e2ekit.services import Services
from e2ekit.wait import wait_until
from oci_portfwd.native_relay import PYTHON_RELAY_ENV

UDP = 53
TIMEOUT = 10
HOSTS = ["127.0.0.1", "::1"]
BATCHES = "UDP datagrams relayed in batches"
PYTHON = f"UDP is relayed by the Python loop: {PYTHON_RELAY_ENV} is set"


@pytest.fixture(scope="module", params=["batches", "python-loop"])
def pub(request, runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"udp-{runtime.name}-{request.param}")
    env = [f"{PYTHON_RELAY_ENV}=1"] if request.param == "python-loop" else []
    hook = HookEnv(hook_command, work / "hook", settings={"log_level": "info"}, extra_env=env)
    port = {"udp": port_alloc.take()}
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    with published(factory, Services().udp_echo(UDP), hook, f"{port['udp']}:{UDP}/udp", port) as p:
        # The core says how it relays UDP once it serves.
        said = wait_until(lambda: [line for line in hook.log_text(p.container.id).splitlines()
                                   if BATCHES in line or PYTHON in line], TIMEOUT, "the UDP relay's log line")
        assert (BATCHES in said[0]) == (request.param == "batches"), said
        yield p


def client(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(TIMEOUT)
    return sock


def replies(sock: socket.socket, n: int) -> list[bytes]:
    got = []
    try:
        while len(got) < n:
            got.append(sock.recv(65535))
    except TimeoutError:
        pass
    return got


def answered(sock: socket.socket, host: str, port: int) -> None:
    """One round trip: the session has its socket and has been answered (the batch path)."""
    for _ in range(3):
        sock.sendto(b"hello", (host, port))
        try:
            if sock.recv(65535) == b"hello":
                return
        except TimeoutError:
            continue
    pytest.fail("no reply to the first datagram")


def payloads(sizes: list[int]) -> list[bytes]:
    return [bytes([i % 251]) * size if size < 2 else os.urandom(size) for i, size in enumerate(sizes)]


BURSTS = {
    "one-size": [1400] * 40,
    "mixed": [1400] * 12 + [700] + [1400] * 6 + [0] + [1] * 5 + [1200] * 6 + [65] * 3,
    "big": [30000, 30000, 20000, 65000],
}


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("burst", list(BURSTS))
def test_a_burst_arrives_whole_once_and_in_order(pub, host, burst):
    sent = payloads(BURSTS[burst])
    with client(host) as sock:
        answered(sock, host, pub.port["udp"])
        for data in sent:
            sock.sendto(data, (host, pub.port["udp"]))
        got = replies(sock, len(sent))
    assert [len(d) for d in got] == [len(d) for d in sent]
    assert got == sent


@pytest.mark.parametrize("host", HOSTS)
def test_a_burst_before_the_session_has_its_socket_waits_for_it(pub, host):
    sent = payloads([900] * 20 + [100])
    with client(host) as sock:
        for data in sent:
            sock.sendto(data, (host, pub.port["udp"]))
        assert replies(sock, len(sent)) == sent


def test_clients_interleaved_each_get_their_own(pub):
    socks = [client("127.0.0.1") for _ in range(3)]
    try:
        for sock in socks:
            answered(sock, "127.0.0.1", pub.port["udp"])
        sent = {sock: [] for sock in socks}
        for i in range(45):  # one batch holds runs of each client in turn
            sock = socks[i % 3] if i < 30 else socks[(i // 5) % 3]
            data = b"%d:%d " % (socks.index(sock), i) * 50
            sock.sendto(data, ("127.0.0.1", pub.port["udp"]))
            sent[sock].append(data)
        for sock in socks:
            assert replies(sock, len(sent[sock])) == sent[sock]
    finally:
        for sock in socks:
            sock.close()


def test_every_byte_is_counted(pub):
    stats = pub.hook.read_stats(pub.container.id)
    sent = payloads([1400] * 30 + [10] * 10)
    with client("127.0.0.1") as sock:
        answered(sock, "127.0.0.1", pub.port["udp"])
        for data in sent:
            sock.sendto(data, ("127.0.0.1", pub.port["udp"]))
        assert replies(sock, len(sent)) == sent
    total = sum(map(len, sent)) + len(b"hello")

    def counted() -> dict | None:
        now = pub.hook.read_stats(pub.container.id)
        moved = {k: now[k] - stats[k] for k in ("bytes_to_container", "bytes_to_client", "udp_datagrams", "udp_sessions")}
        return moved if moved["bytes_to_client"] >= total else None

    moved = wait_until(counted, TIMEOUT, "the replies counted")
    assert moved == {"bytes_to_container": total, "bytes_to_client": total,
                     "udp_datagrams": len(sent) + 1, "udp_sessions": 1}


def test_an_idle_core_gives_a_bursts_memory_back(runtime, rootfs, hook_command, port_alloc, tmp_path):
    hook = HookEnv(hook_command, tmp_path / "hook", settings={"log_level": "info", "udp_idle_timeout": 1})
    port = {"udp": port_alloc.take()}
    factory = ContainerFactory(runtime, rootfs, tmp_path / "bundles")
    with published(factory, Services().udp_echo(UDP), hook, f"{port['udp']}:{UDP}/udp", port) as p:
        wait_until(lambda: BATCHES in hook.log_text(p.container.id), TIMEOUT, "the batch in use")
        core = forwarding_of(hook, p.container.id).core.pid
        sent = payloads([60000] * 3)
        with client("127.0.0.1") as sock:
            answered(sock, "127.0.0.1", port["udp"])
            before = rss_kib(core)
            peak = before
            for _ in range(30):  # bursts fill the batch's slots (one per datagram read together)
                for data in sent:
                    sock.sendto(data, ("127.0.0.1", port["udp"]))
                assert replies(sock, len(sent)) == sent
                peak = max(peak, rss_kib(core))
        assert peak - before > 100, (before, peak)  # the slots touched, both ways
        # Sessions idle for 1 s are forgotten by the sweep (every 0.5 s): the pages go back.
        wait_until(lambda: rss_kib(core) < peak - 100, TIMEOUT,
                   lambda: f"the core's RSS back from {peak} KiB (now {rss_kib(core)})")
