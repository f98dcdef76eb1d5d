"""The relay threads in C (native_relay.py, hook/native/portfwd_relay.c) in a real container:
one per CPU (at most four) beside the core's Python thread; pairs dealt over all of them;
new connections accepted and dialled by the threads themselves;
the traffic page exact (bytes from the threads, open connections back to zero); a restarted
core has them again; the test switch keeps every byte in the Python loop.

Data integrity, half-close, resets and back-pressure through both relays: test_integrity.py.
Their credentials and filters: test_privileges.py.
"""

import os
import signal
import socket
import uuid
from pathlib import Path

import pytest
from e2ekit.clients import read_exactly
from e2ekit.container import ContainerFactory
from e2ekit.forwarding import CORE, child_by_comm, forwarding_of
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.netservice import NetServices
from e2ekit.wait import wait_until
from oci_portfwd.native_relay import MAX_THREADS, PYTHON_RELAY_ENV

ECHO = 7
TIMEOUT = 20
THREADS = min(MAX_THREADS, len(os.sched_getaffinity(0)))


def start(runtime, rootfs, hook_command, port_alloc, work: Path, env: list[str]):
    hook = HookEnv(hook_command, work / "hook", settings={"log_level": "debug"}, extra_env=env)
    port = port_alloc.take()
    services = NetServices().echo(ECHO)
    factory = ContainerFactory(runtime, rootfs, work / "bundles")
    c = factory.new(services.argv(), hook=hook, ports=f"{port}:{ECHO}")
    services.wait_ready(c.start())
    return hook, factory, c, port


@pytest.fixture(scope="module")
def echo(runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"relay-{runtime.name}")
    hook, factory, c, port = start(runtime, rootfs, hook_command, port_alloc, work, [])
    try:
        yield hook, c, port
    finally:
        factory.cleanup()
        reap_leftovers(hook)


def relay_tids(core_pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{core_pid}/task") if int(t) != core_pid)


def started_relay_tids(core_pid: int) -> list[int]:
    """The core's relay threads, once it has started them (after "ready", before it serves)."""
    return wait_until(lambda: len(relay_tids(core_pid)) == THREADS and relay_tids(core_pid), TIMEOUT,
                      lambda: f"{THREADS} relay threads in core {core_pid} (has {relay_tids(core_pid)})")


def timeslices(core_pid: int, tid: int) -> int:
    """How many times the thread has run (schedstat's third field): one per wake-up at least."""
    return int(Path(f"/proc/{core_pid}/task/{tid}/schedstat").read_text().split()[2])


def round_trips(socks: list[socket.socket], times: int, size: int) -> int:
    payload = os.urandom(size)
    for _ in range(times):
        for sock in socks:
            sock.sendall(payload)
        for sock in socks:
            assert read_exactly(sock, size) == payload
    return times * size * len(socks)


def test_the_core_relays_in_one_thread_per_cpu(echo):
    hook, c, _port = echo
    core = forwarding_of(hook, c.id).core
    assert len(started_relay_tids(core.pid)) == THREADS
    line = f"TCP relayed by {THREADS} thread(s) in C"
    wait_until(lambda: line in hook.log_text(c.id), TIMEOUT, line)


def batch_scheduled(pid: int) -> dict[int, bool]:
    """Each of the process's threads: whether it runs as SCHED_BATCH."""
    return {int(t): os.sched_getscheduler(int(t)) == os.SCHED_BATCH for t in os.listdir(f"/proc/{pid}/task")}


def test_the_core_runs_as_sched_batch_and_its_dialer_does_not(echo):
    # Its wake-ups do not preempt the service or the clients (core.py, _batch_scheduling).
    hook, c, _port = echo
    fw = forwarding_of(hook, c.id)
    started_relay_tids(fw.core.pid)
    core_threads = batch_scheduled(fw.core.pid)
    assert len(core_threads) == THREADS + 1
    assert all(core_threads.values()), core_threads
    assert batch_scheduled(fw.dialer.pid) == {fw.dialer.pid: False}
    assert batch_scheduled(fw.supervisor.pid) == {fw.supervisor.pid: False}
    line = "the core runs as SCHED_BATCH"
    wait_until(lambda: line in hook.log_text(c.id), TIMEOUT, line)


def test_pairs_are_dealt_over_every_thread_and_counted_exactly(echo):
    hook, c, port = echo
    core = forwarding_of(hook, c.id).core
    tids = started_relay_tids(core.pid)
    before_stats = hook.read_stats(c.id)
    before = {tid: timeslices(core.pid, tid) for tid in tids}
    n = 2 * THREADS
    socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(n)]
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        moved = round_trips(socks, 200, 1000)
        moved += round_trips(socks, 2, 3 << 20)  # bulk: the splice path
        assert hook.read_stats(c.id)["tcp_open"] == before_stats["tcp_open"] + n
    finally:
        for sock in socks:
            sock.close()
    # Two pairs per thread, 200 round trips each: every thread woke for them, not only for
    # the hand-over (a wake-up per pair).
    grew = {tid: timeslices(core.pid, tid) - before[tid] for tid in tids}
    assert all(g >= 200 for g in grew.values()), grew

    def settled() -> dict | None:
        stats = hook.read_stats(c.id)
        return stats if stats["tcp_open"] == before_stats["tcp_open"] else None

    stats = wait_until(settled, TIMEOUT, "tcp_open back to where it was")
    assert stats["tcp_total"] == before_stats["tcp_total"] + n
    for key in ("bytes_to_container", "bytes_to_client"):
        assert stats[key] - before_stats[key] == moved, (key, stats, before_stats, moved)


def test_new_connections_are_accepted_and_dialled_by_the_threads(echo):
    """The listener is the threads' (thread_accept.py): a new connection wakes one of them,
    which accepts, dials and relays it; the core's Python thread wakes only to pass them
    sockets from the dialer (16 at a time), not once per connection as when it accepted."""
    hook, c, port = echo
    line = "the relay threads accept and dial on"
    wait_until(lambda: line in hook.log_text(c.id), TIMEOUT, lambda: f"{line!r} in {hook.log_text(c.id)}")
    core = forwarding_of(hook, c.id).core
    started_relay_tids(core.pid)
    before_stats = hook.read_stats(c.id)
    n = 200
    before = timeslices(core.pid, core.pid)
    for _ in range(n):  # one at a time: nothing for a loop to batch
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            round_trips([sock], 1, 10)
    woke = timeslices(core.pid, core.pid) - before
    assert woke < n / 2, f"the core's Python thread ran {woke} times for {n} connections"
    stats = wait_until(lambda: (s := hook.read_stats(c.id))["tcp_open"] == before_stats["tcp_open"] and s,
                       TIMEOUT, "tcp_open back to where it was")
    assert stats["tcp_total"] == before_stats["tcp_total"] + n


def test_a_restarted_core_relays_in_threads_again(echo):
    hook, c, port = echo
    fw = forwarding_of(hook, c.id)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        round_trips([sock], 3, 100)
        os.kill(fw.core.pid, signal.SIGKILL)
        # The threads died with the process: its sockets reset, not closed.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.settimeout(TIMEOUT)
            sock.sendall(b"x")
            sock.recv(1) or pytest.fail("a clean EOF after the core was killed")
    new = wait_until(lambda: child_by_comm(fw.supervisor.pid, CORE, (fw.core.pid,)), TIMEOUT, "a restarted core")
    started_relay_tids(new.pid)
    assert all(batch_scheduled(new.pid).values())
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        assert round_trips([sock], 3, 100) == 300


def test_the_test_switch_keeps_the_relay_in_python(runtime, rootfs, hook_command, port_alloc, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"relay-python-{runtime.name}")
    hook, factory, c, port = start(runtime, rootfs, hook_command, port_alloc, work, [f"{PYTHON_RELAY_ENV}=1"])
    try:
        core = forwarding_of(hook, c.id).core
        assert relay_tids(core.pid) == []
        line = f"TCP is relayed by the Python loop: {PYTHON_RELAY_ENV} is set"
        wait_until(lambda: line in hook.log_text(c.id), TIMEOUT, line)
        assert "TCP relayed by" not in hook.log_text(c.id)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            token = uuid.uuid4().bytes
            sock.sendall(token)
            assert read_exactly(sock, len(token)) == token
    finally:
        factory.cleanup()
        reap_leftovers(hook)
