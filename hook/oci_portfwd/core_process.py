"""The core's process: forked by the supervisor, which execs a fresh interpreter here with
what the core needs in a memfd (handover.py). Fresh, so that each container keeps only what
the core runs: a fork would keep everything the hook and the supervisor imported (issue 12).

    supervisor ─fork─▶ child ─exec─▶ python3 -IS -c "... core_process.main(FD)"

Inherited across the exec: the listeners, the status pipe's write end, the sandbox's socket
(builtin), stdout/stderr on the container's log. The counters page is mapped again from its
file (a mapping does not survive an exec).
"""

from __future__ import annotations

import os
import sys
from _signal import SIGKILL

from .forking import exit_with


def main(handover_fd: int) -> None:
    exit_with(lambda: _run(handover_fd))


def _run(handover_fd: int) -> int:
    import _socket  # noqa: PLC0415

    from . import handover  # noqa: PLC0415
    from .listeners import BindTarget, Listener  # noqa: PLC0415
    from .plan import Plan  # noqa: PLC0415
    from .ports import PortMapping  # noqa: PLC0415

    given = handover.read(handover_fd, (Plan, PortMapping, BindTarget))
    from . import procctl  # noqa: PLC0415

    # As fork_child's children: gone with the supervisor, and at once if it already went.
    procctl.set_pdeathsig(SIGKILL)
    if os.getppid() != given["supervisor"]:
        return 1
    # The supervisor's installation (its sys.prefix: where the native dialer is), which -S
    # does not work out for a virtual environment.
    sys.prefix = given["prefix"]

    from .drivers import get_driver  # noqa: PLC0415
    from .errors import ContainerGone, StartError  # noqa: PLC0415
    from .logs import HookLog  # noqa: PLC0415
    from .seccomp_filter import CoreSandbox  # noqa: PLC0415
    from .stats import counters_file  # noqa: PLC0415
    from .status import StatusWriter  # noqa: PLC0415

    plan = given["plan"]
    listeners = []
    for target, fd in given["listeners"]:
        sock = _socket.socket(fileno=fd)
        sock.setblocking(False)  # as the hook bound it (SOCK_NONBLOCK: timeout 0), which an exec forgets
        listeners.append(Listener(target, sock))
    log = HookLog(given["log_path"], given["log_level"], stderr=False)
    sandbox = None
    if given["sandbox"] is not None:
        identity, theirs = given["sandbox"]
        sandbox = CoreSandbox.across_exec(identity, theirs=theirs)
    status = StatusWriter(given["status_fd"], counters_file(given["counters"], fresh=False))
    try:
        return get_driver(plan.driver).run(plan, listeners, status, log, sandbox=sandbox)
    except (StartError, ContainerGone) as e:
        if isinstance(e, ContainerGone) or _exited(plan.container_pid):
            # The container ended while this core started (a delete right after the start,
            # which the hook no longer waits out): nothing failed, and the supervisor tears
            # down; no error to keep the log for. The dialer's word comes first: a process
            # loses its namespaces before its pidfd is readable.
            log.info("%s (the container ended while the forwarding started)", e)
            return 1
        log.error("%s", e)
        status.error(str(e))
        return 1


def _exited(pid: int) -> bool:
    """Whether the process has exited, a zombie included: a pidfd is readable from the exit on."""
    from .polling import wait_readable  # noqa: PLC0415

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(wait_readable([fd], 0))
    finally:
        os.close(fd)
