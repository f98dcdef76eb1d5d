"""The service sees the client's address and port, rootless (crun and runc as a plain user) and
under podman (hooks.d, rootful and rootless): TCP and UDP, IPv4 and IPv6, a loopback client."""

import json
import socket
import uuid
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.clientaddrs import V4_CLIENT, V6_CLIENT, on_loopback
from e2ekit.container import ContainerFactory, published
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.podman import Podman
from e2ekit.services import Services
from test_podman import PACKAGED_HOOKS_FILE, hooks_file, podman_store  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
PEER, UPEER = 80, 53
CASES = [(V4_CLIENT, "127.0.0.1"), ("127.0.0.5", "127.0.0.1"), (V6_CLIENT, "::1"), ("::1", "::1")]


def _services() -> Services:
    return Services().peer(PEER).udp_peer(UPEER)


@pytest.fixture(scope="module")
def addresses(e2e_host):
    with on_loopback(V4_CLIENT, V6_CLIENT):
        yield


@pytest.fixture(scope="module")
def rpub(addresses, rootless_runtime, user_rootfs, user_area, rootless_hook_command, test_user, port_alloc):
    work = test_user.make_dir(user_area / f"source-{rootless_runtime.name}-{uuid.uuid4().hex[:6]}")
    hook = HookEnv(rootless_hook_command, test_user.make_dir(work / "hook"))
    port = {"peer": port_alloc.take(), "upeer": port_alloc.take()}
    spec = f"{port['peer']}:{PEER},{port['upeer']}:{UPEER}/udp"
    factory = ContainerFactory(rootless_runtime, user_rootfs, test_user.make_dir(work / "bundles"))
    with published(factory, _services(), hook, spec, port) as pub:
        yield pub


def _check(port: dict[str, int], source: str, host: str, log: str) -> None:
    seen, seen_port, own = clients.tcp_peer(source, host, port["peer"])
    assert (seen, seen_port) == (source, own), log
    got = clients.udp_peer(source, host, port["upeer"])
    assert got is not None, f"no UDP answer to {source}\n{log}"
    assert (got[0], got[1]) == (source, got[2]), log


@pytest.mark.parametrize("source, host", CASES)
def test_rootless_service_sees_the_client(rpub, source, host):
    _check(rpub.port, source, host, rpub.hook.log_text(rpub.container.id))


@pytest.fixture
def podman(podman_store, hook_command, tmp_path):  # noqa: F811 - this module's own podman
    if podman_store.rootless:
        work = podman_store.user.make_dir(podman_store.workdir / f"t-{uuid.uuid4().hex[:8]}")
        hook = HookEnv(hook_command, podman_store.user.make_dir(work / "hook"))
    else:
        work = tmp_path
        hook = HookEnv(hook_command, work / "hook")
    hooks_dir = work / "hooks.d"
    hooks_dir.mkdir(mode=0o755)
    doc = hooks_file(PACKAGED_HOOKS_FILE, hook_command, hook.env)
    (hooks_dir / PACKAGED_HOOKS_FILE.name).write_text(json.dumps(doc, indent=2))
    runner = Podman(podman_store, hooks_dir, hook)
    yield runner
    runner.cleanup()
    reap_leftovers(hook)


# The busybox image has no Python: the host's /usr (read-only) and servers.py go in as volumes.
SERVERS_PY = Path(__file__).resolve().parent / "servers.py"
VOLUMES = ["-v", "/usr:/usr:ro", "-v", "/usr/lib:/lib:ro", "-v", "/usr/lib64:/lib64:ro",
           "-v", f"{SERVERS_PY}:/srv/servers.py:ro"]


@pytest.mark.parametrize("podman_store", ["rootful", "rootless"], indirect=True)
def test_podman_service_sees_the_client(addresses, podman, port_alloc):
    port = {"peer": port_alloc.take(), "upeer": port_alloc.take()}
    services = _services()
    argv = ["/usr/bin/python3", "/srv/servers.py", f"peer:46:{PEER}", f"udp-peer:46:{UPEER}"]
    c = podman.start(f"{port['peer']}:{PEER},{port['upeer']}:{UPEER}/udp", command=argv, extra=VOLUMES)
    services.wait_ready(c.pid)
    for source, host in CASES:
        _check(port, source, host, podman.hook.log_text(c.id))


def test_rootless_client_port_below_1024_is_kept(rpub):
    # Binding a port below ip_unprivileged_port_start (1024) in the container's netns takes
    # CAP_NET_BIND_SERVICE in its user namespace. The rootless core has it without holding any
    # capability: it runs, in the parent namespace, as the owner of the container's one.
    for proto in ("tcp", "udp"):
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.settimeout(5)
            sock.bind(("127.0.0.5", 700 + (proto == "udp")))
            if proto == "tcp":
                sock.connect(("127.0.0.1", rpub.port["peer"]))
                answer = clients.read_to_eof(sock).decode().split()
            else:
                sock.sendto(b"low", ("127.0.0.1", rpub.port["upeer"]))
                answer = sock.recv(100).decode().split()
        assert answer[:2] == ["127.0.0.5", str(700 + (proto == "udp"))], (proto, answer)
