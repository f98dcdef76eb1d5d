"""A `+proxy` mapping in the TCP relay, with real loopback sockets and the real event loop (the
dialer's pool is the only stand-in): the header reaches the service before the client's bytes,
also when it does not fit into one send(); drivers that do not relay TCP themselves refuse it."""

import socket
import threading

import pytest
from oci_portfwd import tcp_relay
from oci_portfwd.addressing import Target
from oci_portfwd.drivers import Capabilities, check_capabilities
from oci_portfwd.errors import DriverError
from oci_portfwd.eventloop import EventLoop
from oci_portfwd.proxy_header import v2_header
from oci_portfwd.stats import new_counters
from oci_portfwd.tcp_relay import PipePool, TcpConnection, TcpListener

from .relaykit import run_until_closed
from .test_state_config_plan import plan_for

BOUND = 20  # seconds: every blocking call of these tests is bounded


class FreshSockets:
    """What the dialer's pool hands out: a new non-blocking socket of the asked family."""

    def get(self, kind, callback):
        family = socket.AF_INET if kind.endswith(b"4") else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        callback(sock)


class Service:
    """A TCP server that records every byte of one connection, then closes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(BOUND)
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def target(self):
        return Target(socket.AF_INET, "127.0.0.1", self.sock.getsockname()[1])

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(BOUND)
            while data := conn.recv(1 << 16):
                self.received += data
            conn.sendall(b"bye")


def client_exchange(port, payload, result):
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as client:
        result["client"] = client.getsockname()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while data := client.recv(1 << 16):
            reply += data
        result["reply"] = reply


def test_listener_sends_the_header_first_when_asked():
    service = Service()
    host = socket.create_server(("127.0.0.1", 0))
    host.setblocking(False)
    port = host.getsockname()[1]
    loop = EventLoop()
    listener = TcpListener(loop, FreshSockets(), PipePool(), host, [service.target], new_counters(), _log(), proxy=True)
    listener.start()
    result: dict = {}
    client = threading.Thread(target=client_exchange, args=(port, b"GET / HTTP/1.0\r\n\r\n", result))
    client.start()
    closed: list = []
    original = listener._closed
    listener._closed = lambda conn: (original(conn), closed.append(conn))
    run_until_closed(loop, closed)
    client.join(BOUND)
    service.thread.join(BOUND)
    header = v2_header(result["client"], ("127.0.0.1", port))
    assert service.received == header + b"GET / HTTP/1.0\r\n\r\n"
    assert result["reply"] == b"bye"
    host.close()


def test_listener_without_proxy_sends_only_the_clients_bytes():
    service = Service()
    host = socket.create_server(("127.0.0.1", 0))
    host.setblocking(False)
    loop = EventLoop()
    listener = TcpListener(loop, FreshSockets(), PipePool(), host, [service.target], new_counters(), _log())
    listener.start()
    result: dict = {}
    client = threading.Thread(target=client_exchange, args=(host.getsockname()[1], b"plain", result))
    client.start()
    closed: list = []
    original = listener._closed
    listener._closed = lambda conn: (original(conn), closed.append(conn))
    run_until_closed(loop, closed)
    client.join(BOUND)
    service.thread.join(BOUND)
    assert service.received == b"plain"
    host.close()


def test_a_preamble_that_does_not_fit_one_send_is_finished_before_the_client_is_read(monkeypatch):
    # The real header is ~50 bytes and goes at once; 8 MiB cannot, whatever the buffers.
    preamble = bytes(range(256)) * (8 * 4096)
    resumed = []
    original = TcpConnection._on_preamble_writable
    monkeypatch.setattr(
        TcpConnection, "_on_preamble_writable", lambda self, ev: (resumed.append(ev), original(self, ev))
    )
    service = Service()
    client_end, relay_end = socket.socketpair()
    relay_end.setblocking(False)
    loop = EventLoop()
    closed: list = []
    conn = TcpConnection(
        loop, FreshSockets(), PipePool(), relay_end, [service.target], new_counters(), _log(), closed.append, preamble=preamble
    )
    client_end.sendall(b"client bytes")
    client_end.shutdown(socket.SHUT_WR)
    conn.start()
    run_until_closed(loop, closed)
    service.thread.join(BOUND)
    client_end.settimeout(BOUND)
    assert client_end.recv(16) == b"bye"
    client_end.close()
    assert resumed, "the preamble went out in one send(): the short-write path was not taken"
    assert service.received == preamble + b"client bytes"
    assert conn.answered


def test_a_service_that_resets_during_the_preamble_resets_the_client():
    listener = socket.create_server(("127.0.0.1", 0))
    target = Target(socket.AF_INET, "127.0.0.1", listener.getsockname()[1])
    client_end, relay_end = socket.socketpair()
    relay_end.setblocking(False)
    loop = EventLoop()
    closed: list = []
    conn = TcpConnection(
        loop, FreshSockets(), PipePool(), relay_end, [target], new_counters(), _log(), closed.append, preamble=b"x" * (8 << 20)
    )

    def reset_the_first_connection():
        accepted, _ = listener.accept()
        tcp_relay.reset(accepted)

    thread = threading.Thread(target=reset_the_first_connection)
    thread.start()
    conn.start()
    run_until_closed(loop, closed)
    thread.join(BOUND)
    listener.close()
    assert not conn.answered
    client_end.settimeout(BOUND)
    assert client_end.recv(16) == b""  # the relay's end is gone
    client_end.close()


def _caps(holds):
    return Capabilities(
        tcp=True, udp=True, ipv4=True, ipv6=True, family_fallback=True,
        preserves_loopback_address=True, outbound=True, holds_listeners=frozenset(holds),
    )


def test_drivers_that_relay_tcp_themselves_refuse_proxy():
    plan = plan_for({"io.oci-portfwd.ports": "8443:443/tcp+proxy"})
    with pytest.raises(DriverError, match=r"cannot send a PROXY protocol header \(8443:443/tcp\+proxy\)"):
        check_capabilities(plan, "pasta", _caps({"udp"}), pytest.fail)
    assert check_capabilities(plan, "x", _caps({"tcp", "udp"}), pytest.fail).mappings == plan.mappings
    plain = plan.replace(mappings=tuple(m.replace(proxy=False) for m in plan.mappings))
    assert check_capabilities(plain, "pasta", _caps({"udp"}), pytest.fail).mappings == plain.mappings


def _log():
    import logging

    return logging.getLogger("test_proxy_relay")
