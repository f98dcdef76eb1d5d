"""Connections that stay on this machine are not paced (congestion_control.py). Where the
container's netns defaults to BBR, the dialer's TCP sockets get cubic (or reno where cubic is
not allowed); where the host's does, so do the sockets a listener on a loopback address
accepts. Any other default stays, and so do the service's own sockets and those a listener on
every address accepts. Rootful runc with the container joined to a netns of the test's own
whose default the test sets (the host's stays untouched); the runtime and hook in such a netns;
rootless crun and runc in the netns the runtime makes, which copies the host's default; and
the choice itself, with and without CAP_NET_ADMIN."""

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.services import Services
from e2ekit.wait import wait_until
from oci_portfwd.dialer import PYTHON_DIALER_ENV

REPO = Path(__file__).resolve().parents[2]
SYSCTL = Path("/proc/sys/net/ipv4")
NOTE = "container-side connections use {used}: the container's default congestion control, {default}, paces"


def available() -> list[str]:
    return (SYSCTL / "tcp_available_congestion_control").read_text().split()


def require(name: str) -> None:
    if name not in available():
        subprocess.run(["modprobe", f"tcp_{name}"], capture_output=True, timeout=30, check=False)
    if name not in available():
        pytest.skip(f"this kernel has no {name} congestion control (tcp_{name} cannot be loaded)")


@contextlib.contextmanager
def netns_may_default_to(name: str):
    """A netns other than the host's may take as its default only an algorithm the host allows
    to everyone (tcp_allowed_congestion_control: the boot default and reno, unless an admin
    added more); for the time of the test, `name` is among them (then the list as it was)."""
    path = SYSCTL / "tcp_allowed_congestion_control"
    before = path.read_text().strip()
    if name in before.split():
        yield
        return
    path.write_text(f"{before} {name}")
    try:
        yield
    finally:
        path.write_text(before)


def expected_choice(default: str, net_admin: bool = True) -> str | None:
    """What congestion_control.unpaced_choice should pick in a netns with this default."""
    if not default.startswith("bbr"):
        return None
    allowed = (SYSCTL / "tcp_allowed_congestion_control").read_text().split()
    return "cubic" if "cubic" in available() and (net_admin or "cubic" in allowed) else "reno"


def congestion_of(netns_argv: list[str], selector: str) -> list[str]:
    """The congestion control of each established TCP socket `ss` selects (`dport = :80`) in
    the netns `netns_argv` enters ([] for this one), sorted."""
    r = subprocess.run([*netns_argv, "ss", "-tinH", "state", "established", f"( {selector} )"],
                       capture_output=True, text=True, timeout=10, check=True)
    # One line per socket and one of details under it, which starts with the algorithm.
    return sorted(line.split()[0] for line in r.stdout.splitlines()
                  if line.startswith(("\t", " ")) and "wscale" in line)


def connect_both_families(port: int, netns_argv: list[str]):
    """Connections from 127.0.0.1 and ::1, and once both reached the service, the algorithms
    of the dialer's sockets (to port 80) and of the service's (from it)."""
    clients = [socket.create_connection((host, port), timeout=5) for host in ("127.0.0.1", "::1")]
    for c in clients:
        c.sendall(b"x")

    def both() -> tuple[list[str], list[str]] | None:
        ours = congestion_of(netns_argv, "dport = :80")
        return (ours, congestion_of(netns_argv, "sport = :80")) if len(ours) == 2 else None

    return clients, wait_until(both, timeout=10, what="the container-side connections")


@pytest.fixture(params=["native-dialer", "python-dialer"])
def hook(hook_command, tmp_path, request):
    # The dialer's loop in C (portfwd-dialer's cc=NAME) and in Python (dialer_process.serve).
    env = [f"{PYTHON_DIALER_ENV}=1"] if request.param == "python-dialer" else []
    h = HookEnv(hook_command, tmp_path / "hook", extra_env=env)
    yield h
    reap_leftovers(h)


@pytest.mark.parametrize("default", ["bbr", "cubic", "reno"])
def test_container_side_connections_of_a_netns_with_this_default(runc_containers, hook, port_alloc, netns_factory, default):
    require(default)
    require("cubic")
    ns = netns_factory()
    with netns_may_default_to(default):
        ns.run(["sysctl", "-qw", f"net.ipv4.tcp_congestion_control={default}"])
    port = port_alloc.take()
    services = Services().sink(80)
    c = runc_containers.new(services.argv(), hook=hook, ports=f"{port}:80", host_network=str(ns.path))
    services.wait_ready(c.start())
    clients, (ours, service) = connect_both_families(port, ns.prefix())
    try:
        used = expected_choice(default) or default
        assert ours == [used, used], hook.log_text(c.id)
        # The service's accepted sockets are its own: the netns's default.
        assert service == [default, default]
        # The client-facing half (accepted by the core in the host's netns) keeps the host's.
        host_default = (SYSCTL / "tcp_congestion_control").read_text().strip()
        for client in clients:
            assert congestion_of([], f"dport = :{client.getsockname()[1]}") == [host_default]
    finally:
        for client in clients:
            client.close()
    log = hook.log_text(c.id)
    if default == "bbr":
        assert NOTE.format(used=used, default="bbr") in log, log
    else:
        assert "congestion control" not in log, log


def test_rootless_container_side_connections(rootless_containers, rootless_hook_env, port_alloc):
    """The rootless dialer holds CAP_NET_ADMIN in the container's user namespace, which owns
    its netns: cubic is its to set. The netns copied the host's default."""
    require("cubic")
    port = port_alloc.take()
    services = Services().sink(80)
    c = rootless_containers.new(services.argv(), hook=rootless_hook_env, ports=f"{port}:80")
    pid = c.start()
    services.wait_ready(pid)
    netns = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    clients, (ours, service) = connect_both_families(port, netns)
    try:
        default = service[0]
        used = expected_choice(default) or default
        assert ours == [used, used], rootless_hook_env.log_text(c.id)
    finally:
        for client in clients:
            client.close()
    assert c.stop().ok


@pytest.mark.parametrize("net_admin", [True, False], ids=["net_admin", "no-net_admin"])
@pytest.mark.parametrize("default", ["bbr", "cubic"])
def test_the_choice_in_a_netns_of_its_own(e2e_host, default, net_admin):
    """Without CAP_NET_ADMIN (as where the dialer is denied it), cubic only if the host allows
    it to everyone (tcp_allowed_congestion_control), reno otherwise."""
    require(default)
    require("cubic")
    code = ("from oci_portfwd.congestion_control import current, unpaced_choice; import socket; "
            "print(current(socket.socket()), *(unpaced_choice() or ('kept', 'None'))[1:])")
    drop = [] if net_admin else ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    with netns_may_default_to(default):
        expected = [default, str(expected_choice(default, net_admin))]
        r = subprocess.run(
            ["unshare", "--net", "sh", "-c", f"sysctl -qw net.ipv4.tcp_congestion_control={default} && exec \"$@\"",
             "sh", *drop, sys.executable, "-c", code],
            capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(REPO / "hook")}, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected, r.stdout


CLIENT = """
import socket, sys, time
conns = []
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    conns.append(socket.create_connection((host.strip("[]"), int(port)), timeout=5))
for c in conns:
    c.sendall(b"x")
print("connected", flush=True)
time.sleep(30)
"""


def test_loopback_listeners_give_their_connections_no_pacing(containers, hook_env, netns_factory, port_alloc):
    """The runtime, and so the hook, in a test netns whose default is bbr: what the listeners on
    127.0.0.1 and ::1 accept gets cubic (their clients are on this machine; the hook, root here,
    may set it), what the listener on every address accepts keeps bbr, and the log names the
    loopback ones."""
    require("bbr")
    require("cubic")
    ns = netns_factory()
    ns.run(["sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr"])
    local, anywhere = port_alloc.take(), port_alloc.take()
    services = Services().sink(80)
    c = containers.new(services.argv(), hook=hook_env, netns=ns,
                       ports=f"127.0.0.1:{local}:80,[::1]:{local}:80,0.0.0.0:{anywhere}:80")
    services.wait_ready(c.start())
    client = subprocess.Popen(
        [*ns.prefix(), sys.executable, "-c", CLIENT, f"127.0.0.1:{local}", f"[::1]:{local}", f"127.0.0.1:{anywhere}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "connected", client.stderr.read() if client.poll() is not None else ""
        def accepted(port: int) -> list[str]:
            return congestion_of(ns.prefix(), f"sport = :{port}")

        assert wait_until(lambda: accepted(local), 10, "the loopback listeners' connections") == ["cubic", "cubic"]
        assert wait_until(lambda: accepted(anywhere), 10, "the other listener's connection") == ["bbr"]
    finally:
        client.kill()
        client.wait()
    log = hook_env.log_text(c.id)
    note = "use cubic: the host's default congestion control, bbr, paces every segment"
    assert f"connections to 127.0.0.1:{local}/tcp {note}" in log, log
    assert f"connections to [::1]:{local}/tcp {note}" in log, log
    assert f":{anywhere}/tcp use" not in log, log
