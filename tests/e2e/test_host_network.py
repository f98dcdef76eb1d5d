"""A container that shares the host's network (no network namespace of its own, or a netns
path that is the host's) is not forwarded: one warning, nothing bound, nothing started, the
container runs and its own service keeps the port (what docker does with --network host -p).

Forwarding it would forward into itself: every connection dials the hook's own listener,
which accepts and dials again, until no descriptor is left; and a port the container's own
process wants is taken by the hook first, so the container dies.

Rootful runc/crun (namespace compared through /proc/PID/ns/net), rootless runc/crun (rootless
crun: /proc/PID/ns/net is unreadable at prestart, the bundle's linux.namespaces tells), each
with the builtin driver and slirp4netns. Podman `--network host`: test_podman.py.
"""

import os
import time

import pytest
from e2ekit import clients
from e2ekit.ports import port_is_free
from e2ekit.procs import find_by_comm, supervisor_comm
from e2ekit.tools import need_tools
from e2ekit.wait import wait_until

DRIVER_ANNOTATION = "io.oci-portfwd.driver"
WARNING = "uses the host's network"


@pytest.fixture(params=["builtin", "slirp4netns"])
def driver(request) -> str:
    if request.param == "slirp4netns":
        need_tools("slirp4netns")
    return request.param


def _httpd(port: int) -> list[str]:
    # The container's own service on the port the annotation also asks for (P:P).
    return ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]


def _serving(port: int) -> bool:
    return clients.curl("127.0.0.1", port).returncode == 0


def check_not_forwarded(c, hook, own: int, other: int) -> None:
    """The container runs and serves its own port; the hook warned and left nothing."""
    wait_until(lambda: _serving(own), 10, f"the container's httpd on 127.0.0.1:{own}")
    r = clients.curl("127.0.0.1", own)
    assert b"oci-portfwd line 03999" in r.stdout, r
    assert c.status() == "running", c.status()
    log = hook.log_text(c.id)
    assert log.count(WARNING) == 1, log
    assert f"{own}:{own}/tcp" in log and "not published" in log, log
    assert not hook.state_file(c.id).exists(), "a state file for a host-network container"
    assert not find_by_comm(supervisor_comm(c.id)), "a supervisor for a host-network container"
    assert port_is_free("0.0.0.0", other) and port_is_free("::", other), \
        f"port {other} of the annotation is bound"


@pytest.mark.parametrize("how", ["no-netns", "host-netns-path"])
def test_rootful_host_network_is_not_forwarded(containers, hook_env, port_alloc, driver, how):
    own, other = port_alloc.take(), port_alloc.take()
    host_network = True if how == "no-netns" else f"/proc/{os.getpid()}/ns/net"
    c = containers.new(_httpd(own), hook=hook_env, ports=f"127.0.0.1:{own}:{own},{other}:80",
                       annotations={DRIVER_ANNOTATION: driver}, host_network=host_network)
    c.start()
    check_not_forwarded(c, hook_env, own, other)
    # Still running after a while: nothing took its port or made it die.
    time.sleep(0.5)
    assert c.status() == "running" and _serving(own)
    result = c.stop()
    assert result is not None and result.ok, result
    assert port_is_free("127.0.0.1", own)


def test_rootless_host_network_is_not_forwarded(rootless_containers, rootless_hook_env,
                                                port_alloc, driver):
    own, other = port_alloc.take(), port_alloc.take()
    c = rootless_containers.new(_httpd(own), hook=rootless_hook_env,
                                ports=f"127.0.0.1:{own}:{own},{other}:80",
                                annotations={DRIVER_ANNOTATION: driver}, host_network=True)
    c.start()
    check_not_forwarded(c, rootless_hook_env, own, other)
    result = c.stop()
    assert result is not None and result.ok, result


def test_runc_reports_the_warning_on_stderr(hook_env, port_alloc, tmp_path):
    """The warning is one line on the hook's stderr too (runtimes show a hook's stderr only
    when it fails, crun never: here the hook is run as a runtime would, to see it)."""
    from e2ekit.hookenv import oci_state

    own = port_alloc.take()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"linux": {"namespaces": [{"type": "pid"}]}}')
    # The test's own pid: a process of the hook's network namespace.
    state = oci_state("hostnet01", "creating", bundle, pid=os.getpid(),
                      annotations={"io.oci-portfwd.ports": f"127.0.0.1:{own}:80"})
    r = hook_env.run("prestart", stdin=state, cwd=bundle)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and WARNING in lines[0] and "WARNING" in lines[0], err
    assert port_is_free("127.0.0.1", own)
    assert not hook_env.state_file("hostnet01").exists()


def test_dialer_refuses_its_own_netns(e2e_host):
    """The safety net below the hook's check: a dialer pointed at a process of the core's own
    network namespace refuses instead of making sockets there."""
    from oci_portfwd.dialer import await_hello, start_dialer
    from oci_portfwd.errors import StartError

    pid, sock = start_dialer(os.getpid(), False, time.monotonic() + 10)
    try:
        with pytest.raises(StartError, match="refusing to forward into it"):
            await_hello(sock, 10)
    finally:
        sock.close()
        os.waitpid(pid, 0)


def test_unknown_driver_is_still_an_error(hook_env, port_alloc, tmp_path):
    """Host network or not, a mistyped driver annotation is the user's error to hear about."""
    from e2ekit.hookenv import oci_state

    state = oci_state("hostnet02", "creating", tmp_path, pid=os.getpid(),
                      annotations={"io.oci-portfwd.ports": f"127.0.0.1:{port_alloc.take()}:80",
                                   DRIVER_ANNOTATION: "no-such-driver"})
    r = hook_env.run("prestart", stdin=state, cwd=tmp_path)
    assert r.returncode == 1 and b"no-such-driver" in r.stderr, r
