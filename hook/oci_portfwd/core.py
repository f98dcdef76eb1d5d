"""The builtin forwarding core: one process, one epoll loop, all of a container's ports.

It runs as the supervisor's child with the host listeners inherited, starts its dialer
inside the container's namespaces, tells the supervisor "ready" and then serves until it
is signalled. It never joins the container's namespaces itself.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import signal
import socket
from typing import Sequence

from .addressing import dial_targets
from .dialer import SocketPool, await_hello, kind_of, start_dialer
from .eventloop import EventLoop
from .listeners import Listener
from .plan import Plan
from .tcp_relay import TcpListener
from .udp_relay import UdpListener
from .status import StatusWriter


def run_core(plan: Plan, listeners: Sequence[Listener], status: StatusWriter, log: logging.Logger) -> int:
    import prctl  # noqa: PLC0415

    prctl.set_name("portfwd-core")
    prctl.set_pdeathsig(signal.SIGKILL)
    prctl.set_dumpable(False)
    _raise_fd_limit(log)

    deadline = _deadline(plan.ready_timeout)
    dialer_pid, dialer_sock = start_dialer(
        plan.container_pid, plan.loopback == "container-address", deadline
    )
    log.debug("dialer started, pid %d", dialer_pid)
    addresses = await_hello(dialer_sock, max(0.1, deadline - _now()))

    loop = EventLoop()
    pool = SocketPool(dialer_sock)

    def on_dialer(_events: int) -> None:
        if not pool.on_readable():
            log.error("the dialer (pid %d) is gone; the core exits to be restarted", dialer_pid)
            loop.running = False

    loop.register(dialer_sock.fileno(), select.EPOLLIN, on_dialer)
    kinds = set()
    for listener in listeners:
        t = listener.target
        targets = dial_targets(plan.loopback, t.family, t.address, t.mapping.container_port, addresses)
        kinds.update(kind_of(target.family, t.proto) for target in targets)
        if t.proto == "tcp":
            TcpListener(loop, pool, listener.sock, targets, log).start()
        else:
            UdpListener(loop, pool, listener.sock, targets, plan.udp_idle_timeout, log).start()
        log.debug("serving %s → %s", t, " then ".join(str(x) for x in targets))
    pool.prefill(kinds)
    status.ready()
    loop.run()
    return 3


def _raise_fd_limit(log: logging.Logger) -> None:
    # Each TCP connection costs six descriptors (two sockets, two pipes).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit to %d: %s", hard, e)


def _now() -> float:
    import time  # noqa: PLC0415

    return time.monotonic()


def _deadline(timeout: float) -> float:
    return _now() + timeout
