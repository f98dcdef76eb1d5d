"""The hook on Debian's own interpreter and packages (python3-pyroute2, python3-jsonschema,
python3-prctl, python3-seccomp: the versions the .deb depends on), not the venv's newer ones
(the venv has pyseccomp instead of Debian's libseccomp binding)."""

import os
import subprocess
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.forwarding import forwarding_of, status_field
from e2ekit.hookenv import HookEnv
from e2ekit.ports import port_is_free
from e2ekit.services import Services

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"

# -s: no user site; the source tree first. PYTHONPATH in the hook's env as well, so that a
# process the hook re-executes finds the package too.
WRAPPER = f"""#!{SYSTEM_PYTHON} -s
import sys
sys.path.insert(0, {str(REPO / "hook")!r})
from oci_portfwd.cli import main
sys.exit(main())
"""

PROBE = """
import importlib.metadata as md, pyroute2, jsonschema, prctl, seccomp
for name, mod in (("pyroute2", pyroute2), ("jsonschema", jsonschema), ("python-prctl", prctl)):
    print(name, md.version(name), mod.__file__)
# python3-seccomp ships no dist-info: its version is libseccomp's API level here.
print("seccomp", seccomp.get_api(), seccomp.__file__)
"""


@pytest.fixture
def system_hook(tmp_path, e2e_host):
    probe = subprocess.run([SYSTEM_PYTHON, "-s", "-c", PROBE], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"Debian's python3-pyroute2/-jsonschema/-prctl/-seccomp missing: {probe.stderr}")
    for line in probe.stdout.splitlines():
        name, version, path = line.split()
        # Not the venv's: the point is to run against the distribution's versions.
        assert path.startswith(DIST_PACKAGES), f"{name} {version} comes from {path}"
    wrapper = tmp_path / "oci-portfwd-hook-system"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    return HookEnv(wrapper, tmp_path / "hook", extra_env=[f"PYTHONPATH={REPO / 'hook'}"])


def test_tcp_forwarding_with_debian_packages(containers, system_hook, port_alloc):
    port = port_alloc.take()
    services = Services().whoami(81)
    c = containers.new(services.argv(), hook=system_hook, ports=f"{port}:81")
    services.wait_ready(c.start())
    assert clients.whoami("127.0.0.1", port) == ("127.0.0.1", 81)
    assert clients.whoami("::1", port) == ("::1", 81)
    # The sandbox works with Debian's libseccomp binding too (test_privileges.py has the rest).
    fwd = forwarding_of(system_hook, c.id)
    assert [status_field(p.pid, "Seccomp") for p in (fwd.core, fwd.dialer)] == ["2", "2"]
    # sys.prefix is /usr here: the native dialer is the package's. Not installed (as on a
    # build machine), the dialer's loop runs in Python and the core says why.
    native = "/usr/libexec/oci-portfwd-hook/portfwd-dialer"
    exe = os.readlink(f"/proc/{fwd.dialer.pid}/exe")
    if not os.access(native, os.X_OK):
        assert exe.startswith("/usr/bin/python3"), exe
        assert (f"the dialer's loop runs in Python (~6 MB more per container): {native} is missing"
                in system_hook.log_text(c.id))
    else:
        assert exe == native
    c.stop()
    assert port_is_free("0.0.0.0", port) and port_is_free("::", port)


def test_client_addresses_with_debian_packages(containers, system_hook, port_alloc):
    # The client-address routing is set up with Debian's pyroute2 0.7.2 here.
    port, uport = port_alloc.take(), port_alloc.take()
    services = Services().peer(80).udp_peer(53)
    c = containers.new(services.argv(), hook=system_hook, ports=f"{port}:80,{uport}:53/udp")
    services.wait_ready(c.start())
    for source, host in (("127.0.0.5", "127.0.0.1"), ("::1", "::1")):
        seen, seen_port, own = clients.tcp_peer(source, host, port)
        assert (seen, seen_port) == (source, own)
        got = clients.udp_peer(source, host, uport)
        assert got is not None and (got[0], got[1]) == (source, got[2])
    assert "routing ready for IPv4 and IPv6" in system_hook.log_text(c.id)
