"""Client addresses that are not the host's usual ones: added to the host's `lo` for a test, so
that a client can bind to them and reach a published port on 127.0.0.1 / [::1] (IPv4 to a
non-loopback destination does not get through on these machines). Removed afterwards."""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

# This branch's own sub-ranges of the documentation ranges (other test suites use others).
V4_CLIENT = "198.51.100.3"
V4_CLIENT_2 = "198.51.100.4"
V6_CLIENT = "2001:db8:5::3"
V6_CLIENT_2 = "2001:db8:5::4"
ALL = (V4_CLIENT, V4_CLIENT_2, V6_CLIENT, V6_CLIENT_2)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


@contextmanager
def on_loopback(*addresses: str) -> Iterator[None]:
    added = []
    try:
        for addr in addresses:
            if ":" in addr:
                r = _ip("-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            else:
                r = _ip("addr", "add", f"{addr}/32", "dev", "lo")
            if r.returncode != 0 and "File exists" not in r.stderr:
                raise AssertionError(f"ip addr add {addr} dev lo: {r.stderr.strip()}")
            added.append(addr)
        yield
    finally:
        for addr in added:
            prefix = "128" if ":" in addr else "32"
            _ip("addr", "del", f"{addr}/{prefix}", "dev", "lo")
