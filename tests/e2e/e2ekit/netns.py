"""Network namespaces made by a test (`ip netns`), e.g. one without IPv6, to run a runtime in."""

import subprocess
import uuid
from pathlib import Path


class Netns:
    def __init__(self, ipv6: bool = True) -> None:
        self.name = f"pftest-{uuid.uuid4().hex[:8]}"
        self.path = Path("/run/netns") / self.name
        self.ipv6 = ipv6
        self._made = False

    def __enter__(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        self._made = True
        if not self.ipv6:
            # Netns-local sysctls: the host's settings are untouched.
            self.run(["sh", "-c", "for c in all default lo; do "
                      "echo 1 > /proc/sys/net/ipv6/conf/$c/disable_ipv6; done"])
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def delete(self) -> None:
        if self._made:
            subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=10)
            self._made = False

    def prefix(self) -> list[str]:
        """argv prefix that runs a command in this netns only (not `ip netns exec`, which also
        remounts /sys and would hide the cgroup mounts from a runtime)."""
        return ["nsenter", f"--net={self.path}"]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", True)
        kwargs.setdefault("timeout", 30)
        return subprocess.run([*self.prefix(), *argv], **kwargs)
