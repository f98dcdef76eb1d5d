"""Host ports: pick free ones, tell whether one is free, see what listens where.

Ports come from below the ephemeral range (32768+ here), so a client's source port never takes
a port that a test is about to map.
"""

import random
import socket
import subprocess

LOW, HIGH = 20000, 32000
PROTOS = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def port_is_free(addr: str, port: int, proto: str = "tcp") -> bool:
    """Can we bind addr:port right now? (TCP: also listen, which is what a forwarder needs.)"""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, PROTOS[proto]) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if proto == "tcp":
            # TIME_WAIT leftovers of earlier connections do not make a port "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
            if proto == "tcp":
                sock.listen(1)
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports free for TCP and UDP on every address family, never the same twice in a
    session (a port freed by one test could still be in TIME_WAIT, or bound by a leak)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._given: set[int] = set()

    def take(self, count: int = 1) -> int:
        """First port of `count` consecutive free ports."""
        for _ in range(2000):
            base = self._rng.randrange(LOW, HIGH - count)
            span = range(base, base + count)
            if any(p in self._given for p in span):
                continue
            if all(port_is_free(a, p, proto) for p in span
                   for a in ("0.0.0.0", "::") for proto in PROTOS):
                self._given.update(span)
                return base
        raise RuntimeError(f"no {count} consecutive free ports in {LOW}-{HIGH}")


def listeners(proto: str = "tcp", netns_pid: int | None = None,
              netns_path: str | None = None) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP / bound UDP socket, in the host netns or another.

    Addresses as ss prints them without brackets: "0.0.0.0", "::", "127.0.0.2", "::1", "*".
    """
    argv = ["ss", "-H", "-n", "-l", "-t" if proto == "tcp" else "-u"]
    if netns_pid is not None:
        netns_path = f"/proc/{netns_pid}/ns/net"
    if netns_path is not None:
        argv = ["nsenter", f"--net={netns_path}", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        found.add((addr, int(port)))
    return found


def bound_ports(proto: str = "tcp", **where) -> set[int]:
    return {port for _, port in listeners(proto, **where)}
