"""A container's forwarding processes as the tests observe them from the host: supervisor, core
and dialer, their descriptors, memory and capabilities, and the host sockets they hold."""

import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .hookenv import HookEnv
from .procs import Proc, children
from .wait import wait_until

CORE, DIALER = "portfwd-core", "portfwd-dialer"


@dataclass(frozen=True)
class Forwarding:
    supervisor: Proc
    core: Proc
    dialer: Proc

    @property
    def procs(self) -> dict[str, Proc]:
        return {"supervisor": self.supervisor, "core": self.core, "dialer": self.dialer}


def child_by_comm(parent: int, comm: str, exclude: tuple[int, ...] = ()) -> Proc | None:
    return next((p for p in children(parent)
                 if p.pid not in exclude and p.alive() and p.comm() == comm), None)


def forwarding_of(hook: HookEnv, container_id: str, timeout: float = 5) -> Forwarding:
    """The live processes of a container's forwarding, from its state file (the dialer of rootless
    crun joins only after the container exec'd: waited for)."""
    pid = int(hook.read_state(container_id)["supervisor_pid"])
    sup = Proc.of(pid)
    assert sup is not None and sup.alive(), f"supervisor {pid} of the state file is not running"
    core = wait_until(lambda: child_by_comm(sup.pid, CORE), timeout, "the forwarding core")
    dialer = wait_until(lambda: child_by_comm(core.pid, DIALER), timeout, "the dialer")
    return Forwarding(sup, core, dialer)


def fd_kinds(pid: int) -> Counter:
    """Open descriptors of a process by kind: socket, pipe, anon (eventpoll, pidfd…), file."""
    kinds: Counter = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon"] += 1
        else:
            kinds["file"] += 1
    return kinds


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(f"/proc/{pid}/status has no {name}")


def rss_kib(pid: int) -> int:
    return int(status_field(pid, "VmRSS").split()[0])


def capabilities(pid: int) -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, as integers."""
    return {k: int(status_field(pid, k), 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def listening_inodes(port: int) -> set[int]:
    """Inodes of the host netns' TCP sockets listening on `port` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(int(m.group(1)))
    return inodes


def echo_once(host: str, port: int, payload: bytes = b"ping", timeout: float = 5) -> bytes:
    """One connection to an echo service: send, half-close, read to EOF."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        parts = []
        while data := sock.recv(65536):
            parts.append(data)
    return b"".join(parts)


def wait_dead(procs: list[Proc], timeout: float) -> float:
    """Wait until every process is gone; returns the seconds it took."""
    start = time.monotonic()
    wait_until(lambda: not [p for p in procs if p.alive()], timeout,
               lambda: f"pids {[p.pid for p in procs if p.alive()]} to end")
    return time.monotonic() - start


def tcp_sockets_of(pid: int) -> list[socket.socket]:
    """Copies of every TCP socket `pid` holds (pidfd_getfd: root may, even for a process that
    is not dumpable), to ask them their options. The caller closes them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(438, pidfd, int(entry), 0)  # SYS_pidfd_getfd
            if fd < 0:
                continue  # closed meanwhile
            sock = socket.socket(fileno=fd)
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                found.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found
