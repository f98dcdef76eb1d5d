"""Client addresses where the container's netns is not the simple case: two containers sharing
one netns (a pod), each forwarded by its own hook; a netns with a default route of its own; and
1,000 UDP clients at once, each answered on its own port. Rootful runc (the shared-netns spec
joins the first container's netns by path)."""

import json
import resource
import select
import socket
import subprocess
import time

import pytest
from e2ekit import clients
from e2ekit.clientaddrs import V4_CLIENT, V6_CLIENT, on_loopback
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.services import Services
from e2ekit.wait import wait_until

TABLE, MARK = 7071, 0x7071


@pytest.fixture(scope="module")
def addresses(e2e_host):
    with on_loopback(V4_CLIENT, V6_CLIENT):
        yield


@pytest.fixture
def hook(hook_command, tmp_path):
    h = HookEnv(hook_command, tmp_path / "hook")
    yield h
    reap_leftovers(h)


def _in_netns(pid: int, *argv: str) -> str:
    r = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def _rules(pid: int) -> list[str]:
    return [line for fam in ("-4", "-6") for line in _in_netns(pid, "ip", fam, "rule").splitlines()
            if str(TABLE) in line]


def _sees_client(port_tcp: int, port_udp: int, log: str) -> None:
    for source, host in ((V4_CLIENT, "127.0.0.1"), (V6_CLIENT, "::1")):
        seen, seen_port, own = clients.tcp_peer(source, host, port_tcp)
        assert (seen, seen_port) == (source, own), log
        got = clients.udp_peer(source, host, port_udp)
        assert got is not None and (got[0], got[1]) == (source, got[2]), f"{got}\n{log}"


def test_pod_routing_set_up_once_and_kept_for_the_remaining_container(addresses, runc_containers, hook, port_alloc):
    port = {name: port_alloc.take() for name in ("a", "ua", "b", "ub")}
    first = Services().peer(80).udp_peer(53)
    a = runc_containers.new(first.argv(), hook=hook, ports=f"{port['a']}:80,{port['ua']}:53/udp")
    first.wait_ready(a.start())
    second = Services().peer(81).udp_peer(54)
    b = runc_containers.new(second.argv(), hook=hook, ports=f"{port['b']}:81,{port['ub']}:54/udp")
    # The second container joins the first one's netns, as a pod's containers do.
    b.config["linux"]["namespaces"] = [
        ns if ns["type"] != "network" else {"type": "network", "path": a.netns_path}
        for ns in b.config["linux"]["namespaces"]]
    (b.bundle / "config.json").write_text(json.dumps(b.config))
    b.start()
    assert _in_netns(b.pid, "readlink", "/proc/self/ns/net") == _in_netns(a.pid, "readlink", "/proc/self/ns/net")
    second.wait_ready(b.pid)

    _sees_client(port["a"], port["ua"], hook.log_text(a.id))
    _sees_client(port["b"], port["ub"], hook.log_text(b.id))
    rules = _rules(a.pid)
    # Per family: one fwmark rule, one UDP rule per forwarded UDP port (53 from a, 54 from b).
    assert sorted(rules).count(f"97:\tfrom all fwmark {hex(MARK)} lookup {TABLE}") == 2, rules
    assert len(rules) == 6, rules

    # The first container (whose netns the second joined) goes; the second keeps working with
    # client addresses, and the routing it relies on is still there.
    survivor = b.pid
    assert a.stop().ok
    _sees_client(port["b"], port["ub"], hook.log_text(b.id))
    assert _rules(survivor) == rules


@pytest.fixture
def peer_netns(netns_factory):
    return netns_factory()


def test_default_route_tcp_keeps_client_udp_falls_back_outbound_unchanged(
        addresses, runc_containers, hook, port_alloc, peer_netns):
    port = {name: port_alloc.take() for name in ("t", "u")}
    services = Services().peer(80).udp_peer(53)
    c = runc_containers.new(services.argv(), hook=hook, ports=f"{port['t']}:80,{port['u']}:53/udp")
    pid = c.start()
    services.wait_ready(pid)
    clients.tcp_peer(V4_CLIENT, "127.0.0.1", port["t"])  # routing ready before the veth comes

    # A veth into the container's netns with a default route of each family, its peer in a
    # netns of the test's own (as a podman network would give the container).
    veth = f"pfsa{pid % 100000}"
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth9",
                    "netns", str(pid)], check=True, timeout=10)
    subprocess.run(["ip", "link", "set", veth, "netns", peer_netns.name], check=True, timeout=10)
    peer_netns.run(["ip", "addr", "add", "10.77.0.1/24", "dev", veth])
    peer_netns.run(["ip", "-6", "addr", "add", "2001:db8:5:77::1/64", "dev", veth, "nodad"])
    peer_netns.run(["ip", "link", "set", veth, "up"])
    for cmd in (["ip", "addr", "add", "10.77.0.2/24", "dev", "eth9"],
                ["ip", "-6", "addr", "add", "2001:db8:5:77::2/64", "dev", "eth9", "nodad"],
                ["ip", "link", "set", "eth9", "up"],
                ["ip", "route", "add", "default", "via", "10.77.0.1"],
                ["ip", "-6", "route", "add", "default", "via", "2001:db8:5:77::1"]):
        _in_netns(pid, *cmd)
    log = lambda: hook.log_text(c.id)  # noqa: E731

    # TCP: still the client's address, both families (the mark steers around the default route).
    for source, host in ((V4_CLIENT, "127.0.0.1"), (V6_CLIENT, "::1"), ("127.0.0.5", "127.0.0.1")):
        seen, seen_port, own = clients.tcp_peer(source, host, port["t"])
        assert (seen, seen_port) == (source, own), log()
    # UDP: the reply to a non-local client would follow the default route: loopback instead,
    # said once; a loopback client still is itself.
    for source, host in ((V4_CLIENT, "127.0.0.1"), (V6_CLIENT, "::1"), (V4_CLIENT, "127.0.0.1")):
        got = clients.udp_peer(source, host, port["u"])
        assert got is not None and got[0] in ("127.0.0.1", "::1"), f"{got}\n{log()}"
    got = clients.udp_peer("127.0.0.5", "127.0.0.1", port["u"])
    assert got is not None and (got[0], got[1]) == ("127.0.0.5", got[2]), log()
    said = [ln for ln in log().splitlines() if "UDP clients of" in ln and "seen as loopback" in ln]
    assert len(said) == 2, said  # once per listener (0.0.0.0 and ::)

    # The container's own traffic still takes its default route.
    assert "via 10.77.0.1 dev eth9" in _in_netns(pid, "ip", "route", "get", "203.0.113.9")
    assert "via 2001:db8:5:77::1 dev eth9" in _in_netns(pid, "ip", "-6", "route", "get", "2001:db8:9::9")
    with socket.socket(socket.AF_INET6) as listener:
        peer_netns_listen = subprocess.Popen(
            [*peer_netns.prefix(), "/usr/bin/python3", "-c",
             "import socket; s=socket.socket(socket.AF_INET6); s.bind(('2001:db8:5:77::1', 7777));"
             "s.listen(); c,a=s.accept(); c.sendall(a[0].encode()); c.close()"])
        try:
            listener.close()
            wait_until(lambda: "7777" in peer_netns.run(["ss", "-ltnH"], capture_output=True, text=True).stdout,
                       10, "the peer's listener")
            out = _in_netns(pid, "/usr/bin/python3", "-c",
                            "import socket; s=socket.create_connection(('2001:db8:5:77::1', 7777), 5);"
                            "print(s.recv(100).decode())")
            assert out.strip() == "2001:db8:5:77::2"
        finally:
            peer_netns_listen.kill()
            peer_netns_listen.wait(10)


@pytest.mark.timeout(180)
def test_1000_udp_clients_each_answered_on_its_own_port(addresses, runc_containers, hook, port_alloc):
    port = port_alloc.take()
    services = Services().udp_peer(53)
    c = runc_containers.new(services.argv(), hook=hook, ports=f"{port}:53/udp")
    services.wait_ready(c.start())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((V4_CLIENT, 0))
            s.setblocking(False)
            socks.append(s)
        own = {s.fileno(): s.getsockname()[1] for s in socks}
        assert len(set(own.values())) == 1000
        pending = {s.fileno(): s for s in socks}
        answers: dict[int, tuple[str, int]] = {}
        ep = select.epoll()
        for s in socks:
            ep.register(s.fileno(), select.EPOLLIN)
        for _round in range(10):
            for s in pending.values():  # all at once; resent only to those not yet answered
                s.sendto(b"x", ("127.0.0.1", port))
            end = time.monotonic() + 2
            while pending and time.monotonic() < end:
                for fd, _ in ep.poll(0.2):
                    s = pending.pop(fd, None)
                    if s is None:
                        continue
                    addr, seen, _rest = s.recv(100).split(b" ", 2)
                    answers[fd] = (addr.decode(), int(seen))
                    ep.unregister(fd)
            if not pending:
                break
        assert not pending, f"{len(pending)} clients never answered\n{hook.log_text(c.id)[-3000:]}"
        wrong = {fd: a for fd, a in answers.items() if a != (V4_CLIENT, own[fd])}
        assert not wrong, f"{len(wrong)} answers name another client, e.g. {list(wrong.items())[:3]}"
    finally:
        for s in socks:
            s.close()
