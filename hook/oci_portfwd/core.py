"""The builtin forwarding core: one process, one epoll loop, all of a container's ports.

It runs as the supervisor's child with the host listeners inherited, starts its dialer
inside the container's namespaces, tells the supervisor "ready" and then serves until it
is signalled. It never joins the container's namespaces itself.
"""

from __future__ import annotations

import json
import logging
import resource
import select
import time
from collections.abc import Sequence

from .addressing import Target, dial_targets
from .dialer import Addresses, SocketPool, await_hello, kind_of, start_dialer
from .eventloop import EventLoop
from .listeners import Listener
from .plan import Plan
from .seccomp_filter import CoreSandbox
from .stats import REPORT_EVERY, Totals
from .status import StatusWriter
from .tcp_relay import PipePool, TcpListener
from .udp_relay import UdpListener


def run_core(
    plan: Plan,
    listeners: Sequence[Listener],
    status: StatusWriter,
    log: logging.Logger,
    until_readable: int | None = None,
    sandbox: CoreSandbox | None = None,
) -> int:
    """Serve until signalled, or until `until_readable` (a driver program's pidfd) fires."""
    import prctl  # noqa: PLC0415

    if until_readable is None:
        prctl.set_name("portfwd-core")
    prctl.set_dumpable(False)
    _raise_fd_limit(log)

    deadline = time.monotonic() + plan.ready_timeout
    dialer_pid, dialer_sock = start_dialer(
        plan.container_pid, plan.loopback == "container-address", deadline
    )
    log.debug("dialer started, pid %d", dialer_pid)
    addresses = await_hello(dialer_sock, max(0.1, deadline - time.monotonic()))
    if addresses is None:
        log.info("the container has not exec'd yet (rootless crun); connections wait until the dialer joins it")

    loop = EventLoop()
    servers: list[tuple[Listener, TcpListener | UdpListener]] = []

    def targets_for(listener: Listener, found: Addresses) -> tuple[Target, ...]:
        t = listener.target
        return dial_targets(plan.loopback, t.family, t.address, t.mapping.container_port, found)

    def on_hello(found: Addresses) -> None:
        log.info("the dialer joined the container's namespaces")
        for listener, server in servers:
            server.targets = targets_for(listener, found)

    def on_error(message: str) -> None:
        log.error("%s", message)
        loop.running = False

    pool = SocketPool(dialer_sock, on_hello, on_error)
    pipes = PipePool()

    def on_dialer(_events: int) -> None:
        if not pool.on_readable():
            log.error("the dialer (pid %d) is gone; the core exits to be restarted", dialer_pid)
            loop.running = False

    loop.register(dialer_sock.fileno(), select.EPOLLIN, on_dialer)
    kinds: set[bytes] = set()
    for listener in listeners:
        t = listener.target
        targets = targets_for(listener, addresses or {})
        kinds.update(kind_of(target.family, t.proto) for target in targets)
        server: TcpListener | UdpListener
        if t.proto == "tcp":
            server = TcpListener(loop, pool, pipes, listener.sock, targets, log)
        else:
            server = UdpListener(loop, pool, listener.sock, targets, plan.udp_idle_timeout, log)
        server.start()
        servers.append((listener, server))
        log.debug("serving %s → %s", t, " then ".join(str(x) for x in targets))
    pool.prefill(kinds)
    if until_readable is not None:

        def stop(_events: int) -> None:
            loop.running = False

        loop.register(until_readable, select.EPOLLIN, stop)
    status.ready()
    # After "ready": before it, the supervisor reads nothing but the ready line.
    _report_totals(loop, [server for _, server in servers], status, None)
    if sandbox is not None:
        # Least privilege from here on (privileges.py, seccomp_filter.py): the dialer runs,
        # every module the loop uses is imported and every descriptor it needs is open.
        sandbox.enter()
    loop.run()
    return 3


def _report_totals(
    loop: EventLoop, servers: Sequence[TcpListener | UdpListener], status: StatusWriter, last: dict[str, int] | None
) -> None:
    """Every few seconds, the totals up the status pipe when they changed (for `ps`)."""
    totals = Totals()
    for server in servers:
        totals.add(server.snapshot())
    now = totals.as_dict()
    if now != last:
        status.send("stats " + json.dumps(now, separators=(",", ":")))
    loop.call_later(REPORT_EVERY, lambda: _report_totals(loop, servers, status, now))


def _raise_fd_limit(log: logging.Logger) -> None:
    # Each TCP connection costs two descriptors, four more while bytes are in flight.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit to %d: %s", hard, e)

