"""Running a real forwarding program (slirp4netns, pasta) as the supervised core.

    core (this process, a child of the supervisor)
      1. open the container's namespaces (rootless crun: only after it exec'd; then the
         hook is told "ready" first, since the container cannot exec while it waits)
      2. start the program with the namespace fds inherited (/proc/self/fd/N) and a
         death signal, its output going to the container's log
      3. wait until it serves every mapping; "ready"
      4. wait for it to exit: the core exits with it and the supervisor restarts both
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

from ..errors import DriverError, StartError
from ..listeners import Listener, socket_address
from ..namespaces import open_namespaces, same_file
from ..plan import Plan
from ..ports import PortMapping
from ..status import StatusWriter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..logs import HookLog

POLL = 0.01


def find_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DriverError(
            f"the {name} driver needs the program {name}, which is not installed "
            f"(Debian: apt-get install {package}; Fedora: dnf install {package})"
        )
    return path


class ContainerNamespaces:
    """The container's namespace fds, as paths a child program can open."""

    def __init__(self, plan: Plan, status: StatusWriter, log: HookLog) -> None:
        def deferred() -> None:
            log.info("the container has not exec'd yet (rootless crun); the driver starts once it has")
            status.ready()

        deadline = time.monotonic() + max(plan.ready_timeout, 30.0)
        self.user_fd, self.net_fd = open_namespaces(plan.container_pid, deadline, deferred)
        if same_file(os.fstat(self.net_fd), os.stat("/proc/self/ns/net")):
            # The hook checks this before anything starts; this is the safety net.
            for fd in self.fds():
                os.close(fd)
            raise StartError(
                f"container pid {plan.container_pid} shares the forwarder's network namespace "
                "(host network): refusing to forward into it"
            )
        for fd in self.fds():
            os.set_inheritable(fd, True)

    def fds(self) -> list[int]:
        return [fd for fd in (self.user_fd, self.net_fd) if fd is not None]

    @property
    def net_path(self) -> str:
        return f"/proc/self/fd/{self.net_fd}"

    @property
    def user_path(self) -> str | None:
        return None if self.user_fd is None else f"/proc/self/fd/{self.user_fd}"


def spawn(argv: Sequence[str], pass_fds: Sequence[int], log: HookLog) -> subprocess.Popen[bytes]:
    """Start the program; it dies with this process (PDEATHSIG), output to our stderr (the log)."""

    def die_with_parent() -> None:
        from .. import procctl  # noqa: PLC0415

        procctl.set_pdeathsig(signal.SIGTERM)

    log.info("starting %s", " ".join(argv))
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=2,
        stderr=2,
        pass_fds=tuple(pass_fds),
        preexec_fn=die_with_parent,  # noqa: PLW1509 - the core is single-threaded
    )


def wait_until_bound(
    proc: subprocess.Popen[bytes], mappings: Sequence[PortMapping], deadline: float, name: str
) -> None:
    """Until the program serves every host port: we can no longer bind them ourselves, and a
    TCP port also listens (a program binds before it listens: a client in between is refused)."""
    pending = list(mappings)
    while pending:
        if proc.poll() is not None:
            raise StartError(f"{name} exited ({_exit_text(proc)}) before it served {pending[0]}; see the log")
        pending = [m for m in pending if _can_bind(m) or (m.proto == "tcp" and not _listens(m))]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise StartError(f"{name} did not publish {pending[0]} in time")
        time.sleep(POLL)


def _can_bind(m: PortMapping) -> bool:
    assert m.host_ip is not None
    family = socket.AF_INET6 if ":" in m.host_ip else socket.AF_INET
    kind = socket.SOCK_STREAM if m.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(socket_address(m.host_ip, m.host_port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# /proc/net/tcp{,6}: "sl local_address rem_address st ...", the port in hex after the colon;
# st 0A is TCP_LISTEN.
TCP_LISTEN = "0A"


def _listens(m: PortMapping) -> bool:
    """Whether a TCP socket of this netns listens on the mapping's host port (its family)."""
    assert m.host_ip is not None
    table = "/proc/net/tcp6" if ":" in m.host_ip else "/proc/net/tcp"
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == m.host_port:
                    return True
    except OSError:
        return True  # cannot tell: the bind check alone decides, as before
    return False


def serve_until_exit(
    proc: subprocess.Popen[bytes],
    name: str,
    plan: Plan,
    listeners: Sequence[Listener],
    status: StatusWriter,
    log: HookLog,
) -> int:
    """Say ready and wait for the program to exit; meanwhile the builtin relay serves the
    listeners the hook bound for this driver (the protocols the program gets wrong)."""
    if listeners:
        from ..core import run_core  # noqa: PLC0415

        run_core(plan, listeners, status, log, until_readable=os.pidfd_open(proc.pid))
    else:
        status.ready()
    code = proc.wait()
    log.warning("%s exited (%s)", name, _exit_text(proc))
    return 4 if code == 0 else 5


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_text(proc: subprocess.Popen[bytes]) -> str:
    code = proc.returncode
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
