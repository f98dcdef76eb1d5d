"""What runs inside a test container: busybox httpd and servers.py, described once, so that the
same description gives the container's argv and what to wait for before any client dials."""

import shlex
from dataclasses import dataclass, field

from . import ports
from .wait import WaitTimeout, wait_until

SERVERS = "/srv/servers.py"


@dataclass
class Services:
    _shell: list[str] = field(default_factory=list)
    _specs: list[str] = field(default_factory=list)
    _expect: set[tuple[str, int]] = field(default_factory=set)

    def http(self, port: int, ipv4_only: bool = False) -> "Services":
        """busybox httpd serving /www: `-p 0.0.0.0:P` is IPv4 only, `-p P` both families."""
        listen = f"0.0.0.0:{port}" if ipv4_only else str(port)
        self._shell.append(f"busybox httpd -p {listen} -h /www")
        self._expect.add(("tcp", port))
        return self

    def _add(self, kind: str, family: str, first: int, last: int, proto: str) -> "Services":
        self._specs.append(f"{kind}:{family}:{first}-{last}")
        self._expect.update((proto, p) for p in range(first, last + 1))
        return self

    def whoami(self, first: int, last: int | None = None, family: str = "46") -> "Services":
        return self._add("whoami", family, first, last or first, "tcp")

    def sink(self, port: int, family: str = "46") -> "Services":
        return self._add("sink", family, port, port, "tcp")

    def source(self, port: int, family: str = "46") -> "Services":
        return self._add("source", family, port, port, "tcp")

    def peer(self, port: int, family: str = "46") -> "Services":
        """TCP: answers with the client address and port the service sees."""
        return self._add("peer", family, port, port, "tcp")

    def request_reply(self, port: int, family: str = "46") -> "Services":
        """TCP: requests of servers.REQUEST_SIZE bytes, each answered with one byte."""
        return self._add("request-reply", family, port, port, "tcp")

    def udp_peer(self, port: int, family: str = "46") -> "Services":
        """UDP: answers each datagram with the client address and port the service sees."""
        return self._add("udp-peer", family, port, port, "udp")

    def udp_echo(self, port: int, family: str = "46") -> "Services":
        return self._add("udp-echo", family, port, port, "udp")

    def argv(self) -> list[str]:
        # httpd without -f daemonizes; servers.py stays in front as the container's init.
        steps = [*self._shell, shlex.join(["exec", "/usr/bin/python3", SERVERS, *self._specs])]
        return ["/bin/sh", "-c", " && ".join(steps)]

    def wait_ready(self, pid: int, timeout: float = 15) -> None:
        """Wait until every service listens in the container's netns: a dial before that would
        race the service's start and fail for reasons that are not the forwarder's."""
        def missing() -> set[tuple[str, int]]:
            bound = {("tcp", p) for p in ports.bound_ports("tcp", netns_pid=pid)}
            bound |= {("udp", p) for p in ports.bound_ports("udp", netns_pid=pid)}
            return self._expect - bound

        try:
            wait_until(lambda: not missing(), timeout, f"services in container pid {pid}")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; not listening: {sorted(missing())}") from None
