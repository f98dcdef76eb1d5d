"""Link-local host addresses: `[fe80::…%IFACE]:P:80` binds on that interface (the scope goes to
bind() as the interface's index) and a real client reaches the container through it; the
scope shows in the log, the state file and `ps`. A missing interface is named in the error.

The interface is made for the test (pfa…, a dummy one, or a veth pair where the kernel has no
dummy driver; removed afterwards) with an fe80:: address of its own: a local address, so the
host itself can connect to it.
"""

import subprocess
import uuid

import pytest
from e2ekit import clients
from e2ekit.ports import port_is_free
from e2ekit.rootfs import INDEX_HTML
from e2ekit.services import Services
from e2ekit.tools import need_tools

ADDRESS = "fe80::a:10"


@pytest.fixture
def dummy_iface(e2e_host):
    need_tools("ip", "curl")
    name = f"pfa{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "link", "add", name, "type", "dummy"], capture_output=True,
                          timeout=10, check=False)
    if made.returncode != 0:
        # No dummy driver on some kernels (these machines): a veth pair does as well; deleting
        # one end removes both.
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                       check=True, timeout=10)
        subprocess.run(["ip", "link", "set", f"{name}p", "up"], check=True, timeout=10)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True, timeout=10)
        subprocess.run(["ip", "-6", "addr", "add", f"{ADDRESS}/64", "dev", name, "nodad"],
                       check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, timeout=10)


def test_link_local_binds_on_its_interface(containers, hook_env, port_alloc, dummy_iface):
    port = port_alloc.take()
    scoped = f"{ADDRESS}%{dummy_iface}"
    services = Services().http(80)
    c = containers.new(services.argv(), hook=hook_env, ports=f"[{scoped}]:{port}:80")
    services.wait_ready(c.start())

    # curl takes the zone as %25 in a URL.
    r = subprocess.run(["curl", "-g", "-sS", "--noproxy", "*", "--max-time", "5",
                        f"http://[{ADDRESS}%25{dummy_iface}]:{port}/index.html"],
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == INDEX_HTML

    ss = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                        timeout=10, check=True).stdout
    assert f"[{ADDRESS}]%{dummy_iface}:{port}" in ss, ss
    assert clients.connection_refused("::1", port), "bound beyond its interface"

    shown = f"[{scoped}]:{port}:80/tcp"
    assert hook_env.read_state(c.id)["ports"] == [shown]
    assert shown in hook_env.log_text(c.id)
    assert shown in hook_env.run("ps").stdout.decode()
    assert c.stop().ok
    assert port_is_free("::", port)


def test_missing_interface_is_named(containers, hook_env, port_alloc):
    port, other = port_alloc.take(), port_alloc.take()
    iface = f"pfa{uuid.uuid4().hex[:6]}"
    c = containers.new(Services().http(80).argv(), hook=hook_env,
                       ports=f"127.0.0.1:{other}:80,[{ADDRESS}%{iface}]:{port}:80")
    result = c.create()
    assert not result.ok, "started with an interface that does not exist"
    # runc shows the hook's stderr in its error; crun drops it, the log has it.
    text = result.stderr if c.runtime.name == "runc" else hook_env.log_text(c.id)
    assert f"interface {iface} does not exist" in text, text
    assert f"[{ADDRESS}%{iface}]:{port}" in text, text
    assert "Name or service not known" not in text and "Traceback" not in text, text
    assert port_is_free("127.0.0.1", other)


@pytest.mark.parametrize("driver", ["pasta", "slirp4netns"])
def test_other_drivers_warn_and_skip_link_local(containers, hook_env, port_alloc, dummy_iface,
                                                driver):
    """pasta binds a link-local address but never delivers a connection (checked, 2023-03-09);
    slirp4netns has no IPv6: both warn that the mapping is not forwarded and bind nothing."""
    need_tools(driver)
    port, other = port_alloc.take(), port_alloc.take()
    scoped = f"{ADDRESS}%{dummy_iface}"
    services = Services().http(80)
    c = containers.new(services.argv(), hook=hook_env,
                       ports=f"[{scoped}]:{port}:80,127.0.0.1:{other}:80",
                       annotations={"io.oci-portfwd.driver": driver})
    services.wait_ready(c.start())
    log = hook_env.log_text(c.id)
    assert f"[{scoped}]:{port}:80/tcp is not forwarded" in log, log
    assert clients.connection_refused(f"{ADDRESS}%{dummy_iface}", port)
    clients.assert_http_ok("127.0.0.1", other)
