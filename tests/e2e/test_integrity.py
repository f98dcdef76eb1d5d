"""Data integrity through the forwarding, under crun and runc, IPv4 and IPv6 clients: random
sizes and chunkings with checksums, each way on its own and both ways at once (hypothesis picks
sizes, chunkings and seeds); half-close each way; a server's reset reaches the client as a reset
(not a clean close), and a client's reset reaches the server as one.

Every case runs through both relays: the C threads (native_relay.py, the default) and the
Python loop (tcp_relay.py's Direction: without the extension, or with its test switch).

What the server saw comes back through netserver's `report`, never from timing. The half-close
with the client first and a small reply is also test_forwarding's
test_client_half_close_still_gets_full_reply; here it carries a large echo.
"""

import hashlib
import random
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass

import pytest
from e2ekit.clients import read_exactly
from e2ekit.container import Container, ContainerFactory
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.netservice import NetServices
from e2ekit.wait import wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from netserver import chunk_sizes, stream
from oci_portfwd.native_relay import PYTHON_RELAY_ENV

ECHO, EVENTS = 7, 8
HOSTS = ["127.0.0.1", "::1"]
TIMEOUT = 20
LINGER_RESET = struct.pack("ii", 1, 0)
PROPERTY = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Served:
    container: Container
    echo: int
    events: int


@pytest.fixture(scope="module", params=["c-relay", "python-relay"])
def served(request, runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"integrity-{runtime.name}-{request.param}")
    env = [f"{PYTHON_RELAY_ENV}=1"] if request.param == "python-relay" else []
    hook = HookEnv(hook_command, work / "hook", settings={"log_level": "info"}, extra_env=env)
    echo, events = port_alloc.take(), port_alloc.take()
    services = NetServices().echo(ECHO).events(EVENTS)
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    try:
        c = factory.new(services.argv(), hook=hook, ports=f"{echo}:{ECHO},{events}:{EVENTS}")
        services.wait_ready(c.start())
        # The core says which relay serves once it serves (after "ready": waited for).
        python = f"TCP is relayed by the Python loop: {PYTHON_RELAY_ENV} is set"
        said = wait_until(lambda: [line for line in hook.log_text(c.id).splitlines()
                                   if python in line or "TCP relayed by" in line], 10, "the relay's log line")
        assert (python in said[0]) == (request.param == "python-relay"), said
        yield Served(c, echo, events)
    finally:
        factory.cleanup()
        reap_leftovers(hook)


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(host: str, port: int, line: str) -> socket.socket:
    sock = connect(host, port)
    sock.sendall(line.encode() + b"\n")
    return sock


def read_to_eof(sock: socket.socket, rng: random.Random | None = None) -> bytes:
    parts = []
    while data := sock.recv(rng.randint(1, 1 << 17) if rng else 1 << 16):
        parts.append(data)
    return b"".join(parts)


def send_chunked(sock: socket.socket, data: bytes, seed: int) -> None:
    view, offset, sizes = memoryview(data), 0, chunk_sizes(seed)
    while offset < len(data):
        n = next(sizes)
        sock.sendall(view[offset:offset + n])
        offset += n


def report(served: Served, host: str, token: str) -> str:
    with request(host, served.events, f"{token} report") as sock:
        return read_to_eof(sock).decode().strip()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Log-uniform from 1 byte to 4 MiB (plain integers would be mostly tiny), and the edges.
sizes = st.one_of(st.sampled_from([0, 1, 65535, 65536, 65537, (1 << 20) + 1]),
                  st.integers(0, 21).flatmap(lambda b: st.integers(1 << b, (2 << b) - 1)))
seeds = st.integers(0, 2**32 - 1)
BIG = example(size=(4 << 20) - 3, seed=12345)


@pytest.mark.parametrize("host", HOSTS)
@PROPERTY
@given(size=sizes, seed=seeds)
@BIG
def test_client_to_container_random_chunks(served, host, size, seed):
    token = uuid.uuid4().hex
    data = stream(size, seed)
    with request(host, served.events, f"{token} watch") as sock:
        assert read_exactly(sock, 3) == b"ok\n"
        send_chunked(sock, data, seed)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    assert report(served, host, token) == f"eof {size} {sha(data)}"


@pytest.mark.parametrize("host", HOSTS)
@PROPERTY
@given(size=sizes, seed=seeds)
@BIG
def test_container_to_client_random_chunks(served, host, size, seed):
    with request(host, served.events, f"{uuid.uuid4().hex} send {size} {seed}") as sock:
        got = read_to_eof(sock, random.Random(seed))
    assert (len(got), sha(got)) == (size, sha(stream(size, seed)))


@pytest.mark.parametrize("host", HOSTS)
@PROPERTY
@given(size=sizes, seed=seeds)
@BIG
def test_both_ways_at_once_random_chunks(served, host, size, seed):
    """Echo: the client writes random chunks from a thread while it reads random sizes."""
    data = stream(size, seed)
    errors: list[BaseException] = []
    with connect(host, served.echo) as sock:
        def write() -> None:
            try:
                send_chunked(sock, data, seed)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            got = read_to_eof(sock, random.Random(seed + 1))
        finally:
            writer.join(TIMEOUT)
    assert not errors, errors
    assert (len(got), sha(got)) == (size, sha(data))


@pytest.mark.parametrize("host", HOSTS)
def test_client_half_close_keeps_the_other_direction(served, host):
    """The client sends 8 MiB and half-closes at once; the echo of most of it comes back after."""
    data = stream(8 << 20, 1)
    with connect(host, served.echo) as sock:
        writer = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        writer.start()
        try:
            got = read_to_eof(sock)
        finally:
            writer.join(TIMEOUT)
    assert (len(got), sha(got)) == (len(data), sha(data))


@pytest.mark.parametrize("host", HOSTS)
def test_a_client_that_stops_reading_gets_every_byte_later(served, host):
    """The service sends 8 MiB to a client that reads nothing for a second: the relay holds
    what the client's socket does not take and goes on when it is writable again."""
    size = 8 << 20
    with request(host, served.events, f"{uuid.uuid4().hex} send {size} 3") as sock:
        time.sleep(1)
        got = read_to_eof(sock)
    assert (len(got), sha(got)) == (size, sha(stream(size, 3)))


@pytest.mark.parametrize("host", HOSTS)
def test_server_half_close_keeps_the_other_direction(served, host):
    """The server says bye and half-closes first: the client sees a clean EOF, then its own
    bytes still reach the server, to the last one."""
    token = uuid.uuid4().hex
    data = stream(3 << 20, 2)
    with request(host, served.events, f"{token} halfclose") as sock:
        assert read_to_eof(sock) == b"bye\n"          # EOF: the server's side is closed
        send_chunked(sock, data, 2)                   # ours is still open
        sock.shutdown(socket.SHUT_WR)
    assert report(served, host, token) == f"eof {len(data)} {sha(data)}"


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("sent", [0, 5000])
def test_server_reset_reaches_the_client_as_a_reset(served, host, sent):
    action = "reset" if sent == 0 else f"send-reset {sent}"
    with request(host, served.events, f"{uuid.uuid4().hex} {action}") as sock:
        got = b""
        with pytest.raises(ConnectionResetError):
            while data := sock.recv(65536):
                got += data
            pytest.fail(f"the server's reset reached the client as a clean close after {len(got)} bytes")
    assert got == b"r" * sent, f"{len(got)} bytes before the reset, expected {sent}"


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("how", ["reset", "clean-close"])
def test_client_reset_reaches_the_server(served, host, how):
    token = uuid.uuid4().hex
    sock = request(host, served.events, f"{token} watch")
    try:
        assert read_exactly(sock, 3) == b"ok\n"
        sock.sendall(b"x" * 1000)
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    finally:
        sock.close()
    seen = report(served, host, token)
    if how == "reset":
        assert seen.startswith("reset "), f"the server saw {seen!r}, not the client's reset"
    else:
        assert seen == f"eof 1000 {sha(b'x' * 1000)}", seen
