"""Which logs stay after the container is gone: only those that explain a failure (a failed
start, a core that died, a supervisor that died before poststop), and not too many of them."""

import os
import signal
import socket
import time
from pathlib import Path

from e2ekit import clients
from e2ekit.forwarding import CORE, child_by_comm, forwarding_of, wait_dead
from e2ekit.hookenv import oci_state
from e2ekit.services import Services
from e2ekit.wait import wait_until

WHO = 81


def test_uneventful_log_is_removed_even_when_the_container_exited_first(containers, hook_env, port_alloc):
    # kill then delete: the supervisor sees the container exit and tears down before
    # poststop runs (podman always works this way).
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    assert hook_env.log_file(c.id).exists()
    c.stop()
    assert not hook_env.log_file(c.id).exists(), hook_env.log_text(c.id)


def test_log_of_a_failed_start_is_kept(containers, hook_env, port_alloc):
    port = port_alloc.take()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        c = containers.new(Services().whoami(WHO).argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
        assert not c.create().ok
    c.stop()  # runc runs poststop after a failed create; crun does not
    assert "already in use" in hook_env.log_text(c.id)


def test_poststop_keeps_the_log_of_a_forwarding_that_died(containers, hook_env, port_alloc):
    """The supervisor killed: the container runs on without its ports; the later poststop keeps
    the log, writes why into it and says so in one line."""
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    fw = forwarding_of(hook_env, c.id)
    os.kill(fw.supervisor.pid, signal.SIGKILL)
    wait_dead(list(fw.procs.values()), 5)
    # Until the dead supervisor is reaped its start time still matches: poststop would signal it.
    wait_until(lambda: not Path(f"/proc/{fw.supervisor.pid}").exists(), 10, "the supervisor to be reaped")

    r = hook_env.run("poststop", stdin=oci_state(c.id, "stopped", c.bundle), cwd=c.bundle)
    assert r.returncode == 0, r
    said = r.stderr.decode().splitlines()
    log = hook_env.log_file(c.id)
    assert len(said) == 1 and "died before poststop" in said[0] and str(log) in said[0], said
    assert f"supervisor pid {fw.supervisor.pid} is gone" in said[0], said
    assert "ERROR poststop: the forwarding died before poststop" in hook_env.log_text(c.id)
    assert not hook_env.state_file(c.id).exists()

    result = c.stop()  # the runtime's own poststop: nothing left to stop, the log stays
    assert result is not None and result.ok, result
    assert log.exists(), "the evidence was removed by a later poststop"


def test_log_of_a_core_that_died_is_kept(containers, hook_env, port_alloc):
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    fw = forwarding_of(hook_env, c.id)
    os.kill(fw.core.pid, signal.SIGKILL)
    wait_until(lambda: child_by_comm(fw.supervisor.pid, CORE, (fw.core.pid,)), 10, "a restarted core")
    assert clients.whoami("127.0.0.1", port)[1] == WHO  # forwarding on, with the new core
    # poststop as the runtime runs it (whose stderr neither runtime shows after a good delete)
    r = hook_env.run("poststop", stdin=oci_state(c.id, "stopped", c.bundle), cwd=c.bundle)
    assert r.returncode == 0, r
    said = r.stderr.decode().splitlines()
    assert len(said) == 1 and "logged an error" in said[0] and str(hook_env.log_file(c.id)) in said[0], said
    assert f"core pid {fw.core.pid} died (killed by SIGKILL)" in said[0], said
    result = c.stop()
    assert result is not None and result.ok, result
    text = hook_env.log_text(c.id)
    assert f"ERROR forwarding core pid {fw.core.pid} died (killed by SIGKILL)" in text, text


def test_kept_logs_are_bounded_by_age_and_count(containers, hook_env, port_alloc):
    """Kept logs of containers long gone: none older than a day, at most the newest 100."""
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    now = time.time()
    old = [hook_env.state_dir / f"gone-old-{i}.log" for i in range(3)]
    recent = [hook_env.state_dir / f"gone-{i:03d}.log" for i in range(110)]
    for i, path in enumerate(old):
        path.write_text("x ERROR y\n")
        os.utime(path, (now - 2 * 86400 - i, now - 2 * 86400 - i))
    for i, path in enumerate(recent):
        path.write_text("x ERROR y\n")
        os.utime(path, (now - 3600 + i, now - 3600 + i))
    result = c.stop()
    assert result is not None and result.ok, result
    left = sorted(p.name for p in hook_env.state_dir.glob("*.log"))
    assert left == sorted(p.name for p in recent[-100:]), left


def _bind_dev_log() -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("/dev/log")
    server.settimeout(5)
    return server


def _received(server: socket.socket) -> list[bytes]:
    lines = []
    server.setblocking(False)
    try:
        while True:
            lines.append(server.recv(65536))
    except BlockingIOError:
        pass
    server.settimeout(5)
    return lines


def _reset_by_the_forwarding(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(1) == b"", "data from a port without a service"
    except ConnectionResetError:
        pass


def _fill(path: str) -> None:
    """Fill a syslog's queue as a syslog that stopped reading has it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.setblocking(False)
        try:
            while True:
                sock.send(b"<14>filler: a syslog that does not read")
        except BlockingIOError:
            pass


def test_syslog_never_stalls_nor_ends_the_forwarding(containers, hook_env, port_alloc):
    """A syslog that does not read does not hold up the start or the core (its lines are
    dropped from syslog, the file has them); one that restarts does not end the sandboxed core
    (no socket() there): its lines go on into the file."""
    if os.path.lexists("/dev/log"):
        import pytest

        pytest.skip("/dev/log exists here: the test needs a syslog of its own to stop and restart")
    served, unserved = port_alloc.take(), port_alloc.take()
    services = Services().whoami(WHO)
    syslog = _bind_dev_log()
    try:
        _fill("/dev/log")
        c = containers.new(services.argv(), hook=hook_env,
                           ports=f"127.0.0.1:{served}:{WHO},127.0.0.1:{unserved}:{WHO + 1}")
        services.wait_ready(c.start())
        assert clients.whoami("127.0.0.1", served)[1] == WHO
        fw = forwarding_of(hook_env, c.id)
        # The syslog reads again: the core's lines reach it.
        _received(syslog)
        # No service on the second port: the core logs (debug) that it resets the client.
        _reset_by_the_forwarding(unserved)
        got = wait_until(lambda: [x for x in _received(syslog) if b"no container service answers" in x], 5,
                         "the core's line in syslog")
        assert got[0].startswith(b"<15>oci-portfwd-hook["), got
        # The syslog restarts: the core's connected socket now gets ECONNREFUSED.
        syslog.close()
        os.unlink("/dev/log")
        syslog = _bind_dev_log()
        for _ in range(2):
            _reset_by_the_forwarding(unserved)
        assert clients.whoami("127.0.0.1", served)[1] == WHO
        assert fw.core.alive(), hook_env.log_text(c.id)
        log = hook_env.log_text(c.id)
        assert "forbidden" not in log and "restarting" not in log, log
        assert log.count("no container service answers") == 3, log
    finally:
        syslog.close()
        os.unlink("/dev/log")
