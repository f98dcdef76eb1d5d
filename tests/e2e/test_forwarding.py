"""Forwarding through the hook, rootful, under crun and runc: TCP and UDP, IPv4 and IPv6,
unspecified and explicit loopback host addresses, a port range, family fallback, bulk integrity.

One container per runtime carries every mapping (starting containers is the slow part); the
tests then only dial.
"""

import os

import pytest
from e2ekit import clients
from e2ekit.container import ContainerFactory, published
from e2ekit.hookenv import HookEnv
from e2ekit.ports import listeners
from e2ekit.procs import Proc, descendants
from e2ekit.services import Services

# Ports inside the container.
HTTP, WHO, HTTP4, WHO6, RANGE, SINK, SOURCE, UDP = 80, 81, 82, 83, 7000, 9000, 9001, 53

BULK = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def pub(runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"forwarding-{runtime.name}")
    hook = HookEnv(hook_command, work / "hook")
    names = ["http", "who", "who_lo1", "who_lo2", "who_lo6", "http4", "http4_lo2", "who6",
             "sink", "source", "udp", "udp_lo1", "udp_lo2", "udp_lo6"]
    port = {name: port_alloc.take() for name in names}
    port["range"] = port_alloc.take(3)
    spec = ",".join([
        f"{port['http']}:{HTTP}",
        f"{port['who']}:{WHO}",
        f"127.0.0.1:{port['who_lo1']}:{WHO}",
        f"127.0.0.2:{port['who_lo2']}:{WHO}/tcp",
        f"[::1]:{port['who_lo6']}:{WHO}",
        f"{port['http4']}:{HTTP4}",
        f"127.0.0.2:{port['http4_lo2']}:{HTTP4}",
        f"{port['who6']}:{WHO6}",
        f"{port['range']}-{port['range'] + 2}:{RANGE}-{RANGE + 2}",
        f"{port['sink']}:{SINK}",
        f"{port['source']}:{SOURCE}",
        f"{port['udp']}:{UDP}/udp",
        f"127.0.0.1:{port['udp_lo1']}:{UDP}/udp",
        f"127.0.0.2:{port['udp_lo2']}:{UDP}/udp",
        f"[::1]:{port['udp_lo6']}:{UDP}/udp",
    ])
    services = (Services().http(HTTP).http(HTTP4, ipv4_only=True)
                .whoami(WHO).whoami(WHO6, family="6").whoami(RANGE, RANGE + 2)
                .sink(SINK).source(SOURCE).udp_echo(UDP))
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    with published(factory, services, hook, spec, port) as pub:
        yield pub


def test_unspecified_address_binds_both_families(pub):
    tcp, udp = listeners("tcp"), listeners("udp")
    for name in ("http", "who"):
        assert {("0.0.0.0", pub.port[name]), ("::", pub.port[name])} <= tcp, name
    assert {("0.0.0.0", pub.port["udp"]), ("::", pub.port["udp"])} <= udp


def test_explicit_addresses_bind_only_that_address(pub):
    tcp, udp = listeners("tcp"), listeners("udp")
    for name, addr in (("who_lo1", "127.0.0.1"), ("who_lo2", "127.0.0.2"), ("who_lo6", "::1")):
        assert {a for a, p in tcp if p == pub.port[name]} == {addr}, name
    for name, addr in (("udp_lo1", "127.0.0.1"), ("udp_lo2", "127.0.0.2"), ("udp_lo6", "::1")):
        assert {a for a, p in udp if p == pub.port[name]} == {addr}, name
    assert clients.connection_refused("127.0.0.1", pub.port["who_lo2"])
    assert clients.connection_refused("127.0.0.1", pub.port["who_lo6"])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_http_on_unspecified_address(pub, host):
    clients.assert_http_ok(host, pub.port["http"])


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
def test_unspecified_address_dials_container_loopback_of_same_family(pub, host, expected):
    assert clients.whoami(host, pub.port["who"]) == (expected, WHO)


@pytest.mark.parametrize("name, host", [("who_lo1", "127.0.0.1"), ("who_lo2", "127.0.0.2"),
                                        ("who_lo6", "::1")])
def test_loopback_host_address_is_preserved_in_container(pub, name, host):
    assert clients.whoami(host, pub.port[name]) == (host, WHO)


@pytest.mark.parametrize("host", ["::1", "localhost", "127.0.0.1"])
def test_ipv4_only_service_reached_from_any_family(pub, host):
    # busybox httpd -p 0.0.0.0:P: a [::1] client must get the body (fallback to IPv4), not a reset.
    clients.assert_http_ok(host, pub.port["http4"])


def test_127_0_0_2_host_binding_reaches_ipv4_service(pub):
    clients.assert_http_ok("127.0.0.2", pub.port["http4_lo2"])
    assert clients.connection_refused("127.0.0.1", pub.port["http4_lo2"])


def test_ipv6_only_service_reached_from_ipv4_client(pub):
    assert clients.whoami("127.0.0.1", pub.port["who6"]) == ("::1", WHO6)


@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_port_range_maps_port_by_port(pub, offset, host):
    assert clients.whoami(host, pub.port["range"] + offset)[1] == RANGE + offset


@pytest.mark.parametrize("name, host", [("udp", "127.0.0.1"), ("udp", "::1"),
                                        ("udp_lo1", "127.0.0.1"), ("udp_lo2", "127.0.0.2"),
                                        ("udp_lo6", "::1")])
def test_udp_echo(pub, name, host):
    # The echo server binds the wildcard address, like most UDP servers (and socat): its reply
    # to a datagram sent to 127.0.0.2 leaves from the route's source, 127.0.0.1. A forwarder
    # whose container-side socket is connect()ed to 127.0.0.2 never sees that reply.
    payload = f"hello {name} {host}".encode()
    assert clients.udp_echo(host, pub.port[name], payload) == payload, "no reply"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_with_socat(pub, host):
    r = clients.socat_udp(host, pub.port["udp"], b"socat datagram")
    assert r.stdout == b"socat datagram", r.stderr.decode()


def test_udp_datagram_boundaries_kept(pub):
    for size in (1, 1400, 8000, 65000):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert clients.udp_echo("127.0.0.1", pub.port["udp"], payload) == payload, size


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_client_half_close_still_gets_full_reply(pub, host):
    # The sink answers only after EOF: the client's shutdown(SHUT_WR) must cross the forwarder
    # without closing the other direction.
    assert clients.sink_roundtrip(host, pub.port["sink"], 10) == clients.pattern_sha256(10)


@pytest.mark.timeout(300)
def test_100mb_each_way_intact(pub):
    expected = clients.pattern_sha256(BULK)
    assert clients.sink_roundtrip("127.0.0.1", pub.port["sink"], BULK) == expected
    assert clients.source_fetch("::1", pub.port["source"], BULK) == (BULK, expected)


def _open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p.pid}/fd"))
               for p in [Proc(pid, 0), *descendants(pid)] if os.path.isdir(f"/proc/{p.pid}/fd"))


def test_connections_release_their_fds(pub):
    # Per-connection sockets and pipes must be closed when a connection ends; a leak shows as
    # growth of the supervisor's and core's fd count (slack for a pool of pre-made sockets).
    supervisor = int(pub.hook.read_state(pub.container.id)["supervisor_pid"])
    clients.whoami("127.0.0.1", pub.port["who"])
    before = _open_fds(supervisor)
    for i in range(300):
        host = "127.0.0.1" if i % 2 else "::1"
        assert clients.whoami(host, pub.port["who"])[1] == WHO, i
    after = _open_fds(supervisor)
    assert after <= before + 20, f"fds before {before}, after 300 connections {after}"
