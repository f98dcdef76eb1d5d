"""The builtin forwarding core: one process, one epoll loop, all of a container's ports.

It runs as the supervisor's child with the host listeners inherited, starts its dialer
inside the container's namespaces, tells the supervisor "ready" and then serves until it
is signalled. It never joins the container's namespaces itself.
"""

from __future__ import annotations

import os
import resource
import select
import time
from _socket import AF_INET  # not socket: its enums are memory of every container (issue 12)

from .addressing import Target, dial_targets
from .dialer import Addresses, Hello, SocketPool, await_hello, kind_of, native_dialer, start_dialer
from .eventloop import EventLoop
from .listeners import Listener
from .native_relay import NativeRelay, UdpBatch
from .native_relay import load as load_native_relay
from .native_relay import thread_count as relay_threads
from .plan import Plan
from .seccomp_filter import CoreSandbox, relay_filter
from .source_address import SourceBinder
from .stats import new_counters
from .status import StatusWriter
from .tcp_relay import PipePool, TcpListener
from .thread_accept import ThreadAccept

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .logs import HookLog
    from .stats import Counters
    from .udp_relay import UdpListener


def run_core(
    plan: Plan,
    listeners: Sequence[Listener],
    status: StatusWriter,
    log: HookLog,
    until_readable: int | None = None,
    sandbox: CoreSandbox | None = None,
) -> int:
    """Serve until signalled, or until `until_readable` (a driver program's pidfd) fires."""
    from . import procctl  # noqa: PLC0415

    if until_readable is None:
        procctl.set_name("portfwd-core")
    procctl.set_dumpable(False)
    _raise_fd_limit(log)

    deadline = time.monotonic() + plan.ready_timeout
    native, why_not = native_dialer()
    if native is None:
        log.info("the dialer's loop runs in Python (~6 MB more per container): %s", why_not)
    dialer_pid, dialer_sock = start_dialer(
        plan.container_pid,
        plan.loopback == "container-address",
        deadline,
        client_udp_ports(listeners) if plan.source_address == "client" else None,
        native,
    )
    log.debug("dialer started, pid %d (%s)", dialer_pid, native or "Python")
    # After the dialer's fork: it stays as it was (the measured setting), the relay threads
    # started later inherit this thread's policy.
    _batch_scheduling(log)
    hello = await_hello(dialer_sock, max(0.1, deadline - time.monotonic()))
    if hello is None:
        log.info("the container has not exec'd yet (rootless crun); connections wait until the dialer joins it")
    elif note := hello.congestion_note():
        log.info("%s", note)

    loop = EventLoop()
    servers: list[tuple[Listener, TcpListener | UdpListener]] = []
    # The TCP listeners the relay threads accept on themselves, once they run (_start_relay).
    accepting: ThreadAccept | None = None

    def targets_for(listener: Listener, found: Addresses) -> tuple[Target, ...]:
        t = listener.target
        return dial_targets(plan.loopback, t.family, t.address, t.mapping.container_port, found)

    def on_hello(found: Hello) -> None:
        log.info("the dialer joined the container's namespaces")
        if note := found.congestion_note():
            log.info("%s", note)
        for listener, server in servers:
            server.targets = targets_for(listener, found.addresses)
        if accepting is not None:
            accepting.targets_known = True
            accepting.offer()

    def on_error(message: str) -> None:
        log.error("%s", message)
        loop.running = False

    def on_gone(message: str) -> None:
        # A delete right after the start: the supervisor tears down; no error to keep the log for.
        log.info("%s (the container ended while the forwarding started)", message)
        loop.running = False

    pool = SocketPool(dialer_sock, on_hello, on_error, on_gone)
    pipes = PipePool()
    counts = status.counters if status.counters is not None else new_counters()

    def on_routing(notes: list[str], took_ms: int) -> None:
        ready = [f"IPv{4 if f == AF_INET else 6}" for f, ok in pool.routing.ready.items() if ok]
        for note in notes:
            log.info("client addresses: %s", note)
        if ready:
            log.info(
                "client addresses: routing ready for %s in %d ms; services see their clients",
                " and ".join(ready),
                took_ms,
            )
        else:
            log.warning("client addresses unavailable: services see loopback")
        if accepting is not None:
            accepting.offer()

    pool.on_routing = on_routing

    def on_dialer(_events: int) -> None:
        if not pool.on_readable():
            log.error("the dialer (pid %d) is gone; the core exits to be restarted", dialer_pid)
            loop.running = False

    loop.register(dialer_sock.fileno(), select.EPOLLIN, on_dialer)
    kinds: set[bytes] = set()
    for listener in listeners:
        t = listener.target
        targets = targets_for(listener, hello.addresses if hello else {})
        kinds.update(kind_of(target.family, t.proto) for target in targets)
        server: TcpListener | UdpListener
        source = SourceBinder(str(t), pool.routing, log) if plan.source_address == "client" else None
        if t.proto == "tcp":
            server = TcpListener(loop, pool, pipes, listener.sock, targets, counts, log, t.mapping.proxy, source)
        else:
            # Here, not at the top: a TCP-only container's core keeps none of it (issue 12).
            from .udp_relay import UdpListener  # noqa: PLC0415

            server = UdpListener(loop, pool, listener.sock, targets, plan.udp_idle_timeout, counts, log, source)
        server.start()
        servers.append((listener, server))
        log.debug("serving %s → %s", t, " then ".join(str(x) for x in targets))
    pool.prefill(kinds)
    if until_readable is not None:

        def stop(_events: int) -> None:
            loop.running = False

        loop.register(until_readable, select.EPOLLIN, stop)

    status.ready()
    # The extension after "ready", off the hook's path: the loop has not read anything yet.
    # Relay threads only for TCP listeners (the external drivers' core serves UDP only).
    relay = _native_data_path(servers, log)
    if sandbox is not None:
        # Least privilege from here on (privileges.py, seccomp_filter.py): the dialer runs,
        # every module the loop uses is imported and every descriptor it needs is open.
        log.seal()  # its syslog is not connected again: no socket() in the sandbox
        if relay is not None:
            bpf = relay_filter()
            sandbox.enter(lambda: _start_relay(relay, bpf, counts, loop, servers, log))
        else:
            sandbox.enter()
    elif relay is not None:
        _start_relay(relay, b"", counts, loop, servers, log)
    if relay is not None and relay.ctls:
        accepting = ThreadAccept(
            relay, loop, pool, [server for _, server in servers], log,
            targets_known=hello is not None, wants_routing=plan.source_address == "client",
        )
        accepting.offer()
    loop.run()
    if accepting is not None:
        accepting.stop()  # what the backlogs hold now is the next core's
    return 3


def _native_data_path(servers: Sequence[tuple[Listener, TcpListener | UdpListener]], log: HookLog) -> NativeRelay | None:
    """The relay threads to start for the TCP listeners; the UDP listeners get the batch."""
    tcp = any(isinstance(server, TcpListener) for _, server in servers)
    udp = [server for _, server in servers if not isinstance(server, TcpListener)]
    module, why_not = load_native_relay()
    if module is None:
        log.info("%s relayed by the Python loop: %s", "TCP and UDP are" if tcp and udp else "TCP is" if tcp else "UDP is", why_not)
        return None
    if udp:
        batch = UdpBatch(module)
        for server in udp:
            server.batch = batch
        log.info("UDP datagrams relayed in batches (recvmmsg, sendmmsg with UDP_SEGMENT)")
    return NativeRelay(module, relay_threads()) if tcp else None


def _start_relay(
    relay: NativeRelay,
    seccomp_bpf: bytes,
    counts: Counters,
    loop: EventLoop,
    servers: Sequence[tuple[Listener, TcpListener | UdpListener]],
    log: HookLog,
) -> None:
    """The C threads, with this thread's privileges (none, in the sandbox) and a filter of
    their own; the TCP listeners hand their connections to them from here on."""
    try:
        relay.start(counts, seccomp_bpf)
    except OSError as e:
        if not relay.ctls:
            log.warning("the relay threads did not start (%s): TCP is relayed by the Python loop", e.strerror)
            return
        log.warning("%d of %d relay threads started (%s)", len(relay.ctls), len(relay.pipes), e.strerror)
    log.info("TCP relayed by %d thread(s) in C", len(relay.ctls))
    for _, server in servers:
        if isinstance(server, TcpListener):
            server.relay = relay

    def on_stopped(_events: int) -> None:
        log.error("a relay thread stopped (%s); the core exits to be restarted", relay.why_stopped())
        loop.running = False

    loop.register(relay.report, select.EPOLLIN, on_stopped)


def client_udp_ports(listeners: Sequence[Listener]) -> list[tuple[int, int]]:
    """The container's UDP ports this core forwards to, as ranges (one routing rule each)."""
    ports = sorted({listener.target.mapping.container_port for listener in listeners if listener.target.proto == "udp"})
    ranges: list[tuple[int, int]] = []
    for port in ports:
        if ranges and ranges[-1][1] == port - 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def _batch_scheduling(log: HookLog) -> None:
    """SCHED_BATCH: a wake-up of the core does not preempt what runs on that CPU (the
    service, its clients); the core runs when they block or their slice ends, and finds
    several events waiting instead of one. With the default policy every packet that woke a
    relay thread cost the sender's CPU two context switches: on 2 CPUs, the p99 of new
    connections was ~4.2 ms in about half the probes' runs, ~3.2-3.4 with it (docs/data-path.md,
    "The core runs as SCHED_BATCH"). Any process may choose it for itself."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        log.debug("the core runs as SCHED_BATCH (its wake-ups do not preempt the service or its clients)")
    except OSError as e:
        log.info("the core keeps the default scheduling policy (SCHED_BATCH refused: %s)", e.strerror)


def _raise_fd_limit(log: HookLog) -> None:
    # Each TCP connection costs two descriptors, four more while bytes are in flight.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit to %d: %s", hard, e)

