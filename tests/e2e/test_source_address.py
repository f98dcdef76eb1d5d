"""The service sees who is calling (config `source_address`, annotation
io.oci-portfwd.source-address): the client's own address and port with `client` (the default),
loopback with `loopback`; TCP and UDP, IPv4 and IPv6, loopback clients, family fallback both
ways, rootful crun and runc.

Non-loopback clients bind to addresses added to the host's lo (e2ekit.clientaddrs) and dial
127.0.0.1 / [::1]. The services answer with the peer they see (servers.py `peer`, `udp-peer`).
"""

import ipaddress
import socket
from dataclasses import dataclass

import pytest
from e2ekit import clients
from e2ekit.clientaddrs import V4_CLIENT, V6_CLIENT, on_loopback
from e2ekit.container import Container, ContainerFactory
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.services import Services
from oci_portfwd.dialer import PYTHON_DIALER_ENV

# Ports inside the container: the peer services, per family they listen on.
PEER, PEER4, PEER6, PEER_DUAL, UPEER, UPEER4, UPEER6, SINK = 80, 81, 82, 83, 53, 54, 55, 90
SOURCE_ANNOTATION = "io.oci-portfwd.source-address"
NAMES = ["peer", "peer4", "peer6", "dual", "upeer", "upeer4", "upeer6", "sink"]


def nat64(v4: str) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ipaddress.IPv4Address(v4))))


def peer_services() -> Services:
    return (Services().peer(PEER).peer(PEER4, family="4").peer(PEER6, family="6")
            .peer(PEER_DUAL, family="dual").udp_peer(UPEER).udp_peer(UPEER4, family="4")
            .udp_peer(UPEER6, family="6").sink(SINK))


def peer_spec(port: dict[str, int]) -> str:
    return ",".join([
        f"{port['peer']}:{PEER}", f"{port['peer4']}:{PEER4}", f"{port['peer6']}:{PEER6}",
        f"{port['dual']}:{PEER_DUAL}", f"{port['upeer']}:{UPEER}/udp",
        f"{port['upeer4']}:{UPEER4}/udp", f"{port['upeer6']}:{UPEER6}/udp", f"{port['sink']}:{SINK}",
    ])


@pytest.fixture(scope="module")
def addresses(e2e_host):
    with on_loopback(V4_CLIENT, V6_CLIENT):
        yield


@dataclass
class Pub:
    container: Container
    hook: HookEnv
    port: dict[str, int]
    mode: str  # source_address


# client-python-dialer: the dialer's loop in Python (no native portfwd-dialer), whose
# transparent sockets are made by other code than the C program's.
@pytest.fixture(scope="module", params=["client", "loopback", "client-python-dialer"])
def pub(request, addresses, runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    mode = request.param.removesuffix("-python-dialer")
    work = tmp_path_factory.mktemp(f"source-{runtime.name}-{request.param}")
    env = [f"{PYTHON_DIALER_ENV}=1"] if request.param.endswith("-python-dialer") else []
    hook = HookEnv(hook_command, work / "hook", extra_env=env)
    port = {name: port_alloc.take() for name in NAMES}
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    services = peer_services()
    # `client` is the default: only `loopback` is asked for, by annotation.
    annotations = {SOURCE_ANNOTATION: "loopback"} if mode == "loopback" else {}
    try:
        container = factory.new(services.argv(), hook=hook, ports=peer_spec(port), annotations=annotations)
        services.wait_ready(container.start())
        yield Pub(container, hook, port, mode)
    finally:
        factory.cleanup()
        reap_leftovers(hook)


LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
CASES = [  # client source, address dialled
    (V4_CLIENT, "127.0.0.1"), ("127.0.0.5", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"),
    (V6_CLIENT, "::1"), ("::1", "::1"),
]


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


@pytest.mark.parametrize("source, host", CASES)
def test_tcp_service_sees_the_client(pub, source, host):
    seen, seen_port, own = clients.tcp_peer(source, host, pub.port["peer"])
    if pub.mode == "client":
        assert (seen, seen_port) == (source, own)
    else:
        assert seen == LOOPBACK[_family(source)]


@pytest.mark.parametrize("source, host", CASES)
def test_udp_service_sees_the_client(pub, source, host):
    got = clients.udp_peer(source, host, pub.port["upeer"])
    assert got is not None, f"no answer to {source}\n{pub.hook.log_text(pub.container.id)}"
    seen, seen_port, own = got
    if pub.mode == "client":
        assert (seen, seen_port) == (source, own)
    else:
        assert seen == LOOPBACK[_family(source)]


@pytest.mark.parametrize("name", ["dual"])
def test_ipv4_client_of_dual_stack_service_seen_mapped(pub, name):
    # A service on [::] without IPV6_V6ONLY accepts the IPv4 dial itself.
    seen, seen_port, own = clients.tcp_peer(V4_CLIENT, "127.0.0.1", pub.port[name])
    if pub.mode == "client":
        assert (seen, seen_port) == (f"::ffff:{V4_CLIENT}", own)
    else:
        assert seen == "::ffff:127.0.0.1"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("source, expected", [(V4_CLIENT, nat64(V4_CLIENT)), ("127.0.0.5", "::1")])
def test_ipv4_client_of_ipv6_only_service(pub, proto, source, expected):
    if proto == "tcp":
        got = clients.tcp_peer(source, "127.0.0.1", pub.port["peer6"])
    else:
        got = clients.udp_peer(source, "127.0.0.1", pub.port["upeer6"])
    assert got is not None, f"no answer\n{pub.hook.log_text(pub.container.id)}"
    seen, seen_port, own = got
    if pub.mode == "client":
        assert (seen, seen_port) == (expected, own)
    else:
        assert seen == "::1"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6_client_of_ipv4_only_service_sees_loopback_logged_once(pub, proto):
    for _ in range(2):
        if proto == "tcp":
            got = clients.tcp_peer(V6_CLIENT, "::1", pub.port["peer4"])
        else:
            got = clients.udp_peer(V6_CLIENT, "::1", pub.port["upeer4"])
        assert got is not None, f"no answer\n{pub.hook.log_text(pub.container.id)}"
        assert got[0] == "127.0.0.1"
    if pub.mode == "client":
        log = pub.hook.log_text(pub.container.id)
        listener = f"[::]:{pub.port['peer4' if proto == 'tcp' else 'upeer4']}/{proto}"
        lines = [ln for ln in log.splitlines() if "IPv4-only service" in ln and listener in ln]
        assert len(lines) == 1, log


def test_log_says_what_the_service_sees(pub):
    clients.tcp_peer("127.0.0.1", "127.0.0.1", pub.port["peer"])  # the routing is ready by now
    log = pub.hook.log_text(pub.container.id)
    if pub.mode == "client":
        assert "client addresses: routing ready for IPv4 and IPv6" in log, log
    else:
        assert "client addresses" not in log, log


def test_client_reusing_its_port_at_once_is_answered_every_time(pub):
    # Whichever side of the last connection waits in TIME_WAIT in the container, a client that
    # comes back from the same address and port is answered (from loopback at worst).
    with socket.socket() as probe:
        probe.bind((V4_CLIENT, 0))
        port = probe.getsockname()[1]
    for i in range(5):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(5)
            sock.bind((V4_CLIENT, port))
            sock.connect(("127.0.0.1", pub.port["peer"]))
            answer = clients.read_to_eof(sock).decode().split()
        assert answer[0] in (V4_CLIENT, "127.0.0.1"), (i, answer)


def test_client_port_our_last_dial_holds_in_time_wait_is_the_source_again(pub):
    # The client closes first: our container-side socket sends the first FIN and waits in
    # TIME_WAIT in the container, bound to the client's address and port. The client's next
    # connection from that address and port (to another service: another 4-tuple) is dialled
    # from it again, because both sockets have SO_REUSEADDR (the dialer sets it on every
    # transparent TCP socket); without it the bind fails and the service sees loopback.
    with socket.socket() as probe:
        probe.bind((V4_CLIENT, 0))
        port = probe.getsockname()[1]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(5)
        sock.bind((V4_CLIENT, port))
        sock.connect(("127.0.0.1", pub.port["sink"]))
        sock.shutdown(socket.SHUT_WR)
        assert len(clients.read_to_eof(sock).split()[0]) == 64  # the sink's sha256: both ends closed
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(5)
        sock.bind((V4_CLIENT, port))
        sock.connect(("127.0.0.1", pub.port["peer"]))
        seen, seen_port = clients.read_to_eof(sock).decode().split()
    if pub.mode == "client":
        assert (seen, int(seen_port)) == (V4_CLIENT, port), pub.hook.log_text(pub.container.id)
    else:
        assert seen == "127.0.0.1"
