"""The test harness itself, without the hook: a container runs under each runtime and its
services answer inside the container's netns. When these fail, the forwarding tests' failures
say nothing about the hook."""

import socket

from e2ekit import clients
from e2ekit.ports import PortAllocator, port_is_free
from e2ekit.rootfs import INDEX_HTML
from e2ekit.services import Services


def test_services_answer_inside_container_netns(containers):
    services = Services().http(80).whoami(81, family="46").udp_echo(53, family="46")
    c = containers.new(services.argv())
    pid = c.start()
    services.wait_ready(pid)
    assert c.status() == "running"

    for host in ("127.0.0.1", "::1"):
        r = c.exec_in_netns(["curl", "-g", "-sS", "--noproxy", "*", "--max-time", "5",
                             clients.url(host, 80)])
        assert r.returncode == 0, r.stderr
        assert r.stdout == INDEX_HTML
        r = c.exec_in_netns(["socat", "-t", "1", "-T", "3", "-",
                             f"UDP6:[{host}]:53" if ":" in host else f"UDP4:{host}:53"],
                            input=b"ping")
        assert r.stdout == b"ping", r.stderr

    c.stop()
    assert c.status() is None


def test_port_is_free_sees_a_listener():
    # Every "nothing bound" check rests on port_is_free: it must see a listener, per family.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        assert port_is_free("::1", port)
    assert port_is_free("127.0.0.1", port)
    # A port below the ephemeral range, free for both protocols: an ephemeral UDP port may be
    # some other process's TCP port at the same time (seen once in CI).
    port = PortAllocator().take()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder:
        holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        holder.bind(("::", port))
        assert not port_is_free("::", port, "udp")
        assert port_is_free("::", port, "tcp")
