"""`/tcp+proxy`: the service gets a PROXY protocol v2 header before the client's bytes, and a
real parser (haproxy's `accept-proxy`, in the container) reads from it the client's address and
port and the host address and port the client dialled. Rootful crun and runc, IPv4 and IPv6
clients, loopback and non-loopback (addresses of this test's own on the host's lo), a family
fallback; a mapping without +proxy is unchanged; `udp+proxy` is refused. One rootless run.
"""

import socket
import subprocess
import uuid
from contextlib import contextmanager

import pytest
from e2ekit import haproxy
from e2ekit.container import ContainerFactory, published
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.ports import port_is_free
from e2ekit.procs import find_by_comm, supervisor_comm
from e2ekit.tools import need_tools

# Ports inside the container: haproxy frontends with accept-proxy on both families, with
# accept-proxy on IPv4 only, and a plain one.
PROXIED, PROXIED4, PLAIN = 8443, 8444, 8080
# This test's sub-range of the documentation prefixes (kept apart from other tests').
CLIENT4, CLIENT6 = "198.51.100.81", "2001:db8:11b::81"


@pytest.fixture(scope="module")
def client_addresses(e2e_host):
    """CLIENT4 and CLIENT6 on the host's lo for the module, removed again whatever happens."""
    added = []
    try:
        for argv in (["ip", "addr", "add", f"{CLIENT4}/32", "dev", "lo"],
                     ["ip", "-6", "addr", "add", f"{CLIENT6}/128", "dev", "lo", "nodad"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)
            added.append(argv[argv.index("add") + 1])
        yield
    finally:
        for address in added:
            subprocess.run(["ip", "addr", "del", address, "dev", "lo"], capture_output=True, timeout=10)


def services() -> haproxy.Haproxy:
    if not haproxy.available():
        pytest.skip(f"{haproxy.HAPROXY} is missing (make deps installs haproxy)")
    return (haproxy.Haproxy().frontend(PROXIED, accept_proxy=True)
            .frontend(PROXIED4, accept_proxy=True, ipv4_only=True)
            .frontend(PLAIN, accept_proxy=False))


def spec_for(port: dict[str, int]) -> str:
    return ",".join([
        f"{port['proxied']}:{PROXIED}/tcp+proxy",
        f"{port['proxied4']}:{PROXIED4}/TCP+proxy",
        f"{port['plain']}:{PLAIN}",
    ])


@contextmanager
def haproxy_published(factory, hook, port_alloc):
    port = {name: port_alloc.take() for name in ("proxied", "proxied4", "plain")}
    with published(factory, services(), hook, spec_for(port), port) as pub:
        yield pub


@pytest.fixture(scope="module")
def pub(runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"proxy-{runtime.name}")
    hook = HookEnv(hook_command, work / "hook")
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    with haproxy_published(factory, hook, port_alloc) as pub:
        yield pub


def ask(dst: str, port: int, src: str | None = None) -> tuple[str, tuple[str, int]]:
    """One HTTP request from src (any port) to dst:port; (body, the client's own address)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        sock.connect((dst, port))
        me = sock.getsockname()[:2]
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), reply[:200]
    return body.decode(), me


# Client source (None: the kernel picks) → host address dialled.
CASES = [
    pytest.param(None, "127.0.0.1", id="ipv4-loopback"),
    pytest.param(None, "127.0.0.3", id="ipv4-other-loopback-destination"),
    pytest.param(CLIENT4, "127.0.0.1", id="ipv4-non-loopback-client"),
    pytest.param(None, "::1", id="ipv6-loopback"),
    pytest.param(CLIENT6, "::1", id="ipv6-non-loopback-client"),
]


@pytest.mark.parametrize("src, dst", CASES)
def test_service_sees_the_client_and_the_dialled_host_address(pub, client_addresses, src, dst):
    port = pub.port["proxied"]
    body, (me, my_port) = ask(dst, port, src)
    assert body == f"{me}:{my_port} {dst}:{port}"
    if src:
        assert me == src


@pytest.mark.parametrize("src, dst", CASES)
def test_header_survives_the_family_fallback(pub, client_addresses, src, dst):
    # The IPv4-only frontend: an IPv6 client is dialled in over IPv4 after ::1 is refused, and
    # the service still learns the IPv6 client from the header.
    port = pub.port["proxied4"]
    body, (me, my_port) = ask(dst, port, src)
    assert body == f"{me}:{my_port} {dst}:{port}"


@pytest.mark.parametrize("dst, relay", [("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
def test_mapping_without_proxy_is_unchanged(pub, dst, relay):
    # No header: haproxy without accept-proxy would answer 400 to one; it reports the TCP peer
    # and the container-side address the relay dialled.
    body, _ = ask(dst, pub.port["plain"])
    assert body.split(" ")[1] == f"{relay}:{PLAIN}", body
    assert body.split(" ")[0].rsplit(":", 1)[0] == relay, body


def test_state_file_shows_the_option(pub):
    ports = pub.hook.read_state(pub.container.id)["ports"]
    assert f"{pub.port['proxied']}:{PROXIED}/tcp+proxy" in ports
    assert f"{pub.port['plain']}:{PLAIN}/tcp" in ports


def test_udp_proxy_is_refused_with_one_line(containers, hook_env, port_alloc):
    port, udp = port_alloc.take(), port_alloc.take()
    spec = f"{port}:80,{udp}:53/udp+proxy"
    container = containers.new(["/bin/sleep", "60"], hook=hook_env, ports=spec)
    try:
        result = container.create()
        assert not result.ok, "a container with udp+proxy started"
        expected = f"port spec '{udp}:53/udp+proxy': +proxy (a PROXY protocol header) is for TCP only"
        # runc folds the hook's stderr into its error; crun sends it to /dev/null: the log has it.
        assert expected in result.stderr + hook_env.log_text(container.id)
        assert "Traceback" not in result.stderr + hook_env.log_text(container.id)
    finally:
        container.stop()
        reap_leftovers(hook_env)
    assert all(port_is_free(a, p, proto) for a in ("0.0.0.0", "::")
               for p, proto in ((port, "tcp"), (udp, "udp")))
    assert not find_by_comm(supervisor_comm(container.id))


@pytest.mark.parametrize("driver", ["slirp4netns", "pasta"])
def test_external_drivers_refuse_proxy(containers, hook_env, port_alloc, driver):
    # Their own programs relay TCP: no header could be sent, and the service expects one.
    need_tools(driver)
    port = port_alloc.take()
    container = containers.new(["/bin/sleep", "60"], hook=hook_env, ports=f"{port}:443/tcp+proxy",
                               annotations={"io.oci-portfwd.driver": driver})
    try:
        result = container.create()
        assert not result.ok, f"a +proxy mapping started with driver {driver}"
        said = result.stderr + hook_env.log_text(container.id)
        assert f"driver {driver} cannot send a PROXY protocol header ({port}:443/tcp+proxy)" in said
    finally:
        container.stop()
        reap_leftovers(hook_env)
    assert all(port_is_free(a, port) for a in ("0.0.0.0", "::"))


def test_rootless(rootless_runtime, user_rootfs, user_area, rootless_hook_command, test_user,
                  port_alloc, client_addresses):
    work = test_user.make_dir(user_area / f"proxy-{rootless_runtime.name}-{uuid.uuid4().hex[:6]}")
    hook = HookEnv(rootless_hook_command, test_user.make_dir(work / "hook"))
    factory = ContainerFactory(rootless_runtime, user_rootfs, test_user.make_dir(work / "bundles"))
    with haproxy_published(factory, hook, port_alloc) as rpub:
        for src, dst in ((CLIENT4, "127.0.0.1"), (CLIENT6, "::1"), (None, "127.0.0.3")):
            port = rpub.port["proxied"]
            body, (me, my_port) = ask(dst, port, src)
            assert body == f"{me}:{my_port} {dst}:{port}"
        body, _ = ask("::1", rpub.port["plain"])
        assert body.startswith("::1:"), body
