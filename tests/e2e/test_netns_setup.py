"""The dialer's netlink work (pyroute2) in a fresh network namespace, where lo is down: with
the venv's pyroute2 and with Debian 12's own python3-pyroute2 0.7.2 (what the .deb runs on).
The runtimes bring lo up themselves, so the container tests never reach this code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import socket
from oci_portfwd.netns_setup import bring_loopback_up, container_addresses, loopback_is_up
assert not loopback_is_up(), "a new netns should start with lo down"
bring_loopback_up()
assert loopback_is_up()
import subprocess
# A veth pair (this kernel has no dummy interfaces); both ends stay in this netns.
subprocess.run(["ip", "link", "add", "pf0", "type", "veth", "peer", "name", "pf1"], check=True)
subprocess.run(["ip", "addr", "add", "192.0.2.7/24", "dev", "pf0"], check=True)
subprocess.run(["ip", "addr", "add", "2001:db8::7/64", "dev", "pf0", "nodad"], check=True)
subprocess.run(["ip", "link", "set", "pf0", "up"], check=True)
subprocess.run(["ip", "link", "set", "pf1", "up"], check=True)
found = container_addresses()
assert found[socket.AF_INET] == ["192.0.2.7"], found
assert found[socket.AF_INET6] == ["2001:db8::7"], found
import pyroute2
print("ok", getattr(pyroute2, "__version__", "?"))
"""

INTERPRETERS = {
    "venv": [sys.executable],
    # -s: no user site; the source tree first, then Debian's dist-packages.
    "debian-python3": ["/usr/bin/python3", "-s"],
}


@pytest.mark.parametrize("interpreter", sorted(INTERPRETERS))
def test_loopback_up_and_addresses_in_a_fresh_netns(interpreter):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a network namespace")
    argv = INTERPRETERS[interpreter]
    if interpreter == "debian-python3":
        check = subprocess.run([*argv, "-c", "import pyroute2, prctl"], capture_output=True)
        if check.returncode != 0:
            pytest.skip("Debian's python3-pyroute2/python3-prctl are not installed (make deps)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "hook"))
    r = subprocess.run(["unshare", "-n", *argv, "-c", PROBE], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.startswith(b"ok"), r.stdout
