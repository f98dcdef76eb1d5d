"""A real PROXY protocol parser in the container: Debian's haproxy, from the host's /usr.

Each frontend answers every HTTP request with what haproxy believes about the connection,
"SRC:SRC_PORT DST:DST_PORT": behind `accept-proxy` that is what the PROXY header said (a
connection without a valid header is refused), without it the relay's own socket addresses.
haproxy runs in the foreground (-db) from a config written to the container's /tmp (the rootfs
is read-only), so it needs no pid file, no socket and no writable place of its own.
"""

import os
import shlex
from dataclasses import dataclass, field

from . import ports
from .wait import WaitTimeout, wait_until

HAPROXY = "/usr/sbin/haproxy"
REPORT = 'http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port] %[dst]:%[dst_port]"'
DEFAULTS = """\
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
"""


def available() -> bool:
    return os.access(HAPROXY, os.X_OK)


@dataclass
class Haproxy:
    _frontends: list[str] = field(default_factory=list)
    _expect: set[int] = field(default_factory=set)

    def frontend(self, port: int, accept_proxy: bool, ipv4_only: bool = False) -> "Haproxy":
        option = " accept-proxy" if accept_proxy else ""
        binds = [f"    bind 0.0.0.0:{port}{option}"]
        if not ipv4_only:
            binds.append(f"    bind [::]:{port} v6only{option}")
        self._frontends.append("\n".join([f"frontend fe{port}", *binds, f"    {REPORT}"]))
        self._expect.add(port)
        return self

    def config(self) -> str:
        return DEFAULTS + "\n".join(self._frontends) + "\n"

    def argv(self) -> list[str]:
        script = (f"printf '%s' {shlex.quote(self.config())} > /tmp/haproxy.cfg"
                  f" && exec {HAPROXY} -db -f /tmp/haproxy.cfg")
        return ["/bin/sh", "-c", script]

    def wait_ready(self, pid: int, timeout: float = 15) -> None:
        def missing() -> set[int]:
            return self._expect - ports.bound_ports("tcp", netns_pid=pid)

        try:
            wait_until(lambda: not missing(), timeout, f"haproxy in container pid {pid}")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; not listening: {sorted(missing())}") from None
