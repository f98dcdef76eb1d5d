"""What the hook leaves behind: nothing. Poststop frees every port and ends the supervisor and
its children; poststop is idempotent; a container that dies without delete is cleaned up by the
supervisor itself; createRuntime works as the start stage."""

import os
import signal
import socket

import pytest
from e2ekit import clients
from e2ekit.hookenv import oci_state
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, descendants, supervisor_comm
from e2ekit.services import Services
from e2ekit.wait import wait_until

WHO, UDP = 81, 53


@pytest.fixture
def running(containers, hook_env, port_alloc):
    """A container publishing TCP on both families and ::1, and UDP; already answering."""
    tcp, tcp6, udp = port_alloc.take(), port_alloc.take(), port_alloc.take()
    services = Services().whoami(WHO).udp_echo(UDP)
    c = containers.new(services.argv(), hook=hook_env,
                       ports=f"{tcp}:{WHO},[::1]:{tcp6}:{WHO},{udp}:{UDP}/udp")
    services.wait_ready(c.start())
    assert clients.whoami("127.0.0.1", tcp)[1] == WHO
    binds = [("0.0.0.0", tcp, "tcp"), ("::", tcp, "tcp"), ("::1", tcp6, "tcp"),
             ("0.0.0.0", udp, "udp"), ("::", udp, "udp")]
    return c, binds


def supervisor_of(hook_env, container) -> Proc:
    pid = int(hook_env.read_state(container.id)["supervisor_pid"])
    proc = Proc.of(pid)
    assert proc is not None and proc.alive(), f"supervisor {pid} from the state file is not running"
    return proc


def assert_all_gone(procs, binds, timeout: float) -> None:
    """Within one deadline: every hook process ended and every host port free."""
    def leftovers() -> list:
        return ([p.pid for p in procs if p.alive()]
                + [b for b in binds if not port_is_free(*b)])

    wait_until(lambda: not leftovers(), timeout, lambda: f"pids/ports {leftovers()} to go")


def test_supervisor_is_named_and_has_the_core_as_child(running, hook_env):
    c, _ = running
    sup = supervisor_of(hook_env, c)
    assert sup.comm() == supervisor_comm(c.id)
    assert descendants(sup.pid), "the supervisor has no child (the forwarding core)"


def test_poststop_frees_ports_and_ends_processes(running, hook_env):
    c, binds = running
    sup = supervisor_of(hook_env, c)
    procs = [sup, *descendants(sup.pid)]
    result = c.stop()
    assert result is not None and result.ok, result
    # delete returns after poststop has run: everything must already be gone, allow only
    # for the kernel's reaping.
    assert_all_gone(procs, binds, timeout=1)
    assert not hook_env.state_file(c.id).exists()


def test_poststop_twice_is_harmless(running, hook_env):
    c, binds = running
    c.stop()
    state = oci_state(c.id, "stopped", c.bundle)
    for _ in range(2):
        r = hook_env.run("poststop", stdin=state, cwd=c.bundle)
        assert r.returncode == 0, r.stderr.decode()
        assert b"Traceback" not in r.stderr
    assert all(port_is_free(*b) for b in binds)


def test_poststop_of_unknown_container_is_harmless(hook_env, tmp_path):
    r = hook_env.run("poststop", stdin=oci_state("never-started-0", "stopped", tmp_path),
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()


def test_container_killed_without_delete_is_cleaned_up(running, hook_env):
    c, binds = running
    sup = supervisor_of(hook_env, c)
    procs = [sup, *descendants(sup.pid)]
    os.kill(c.pid, signal.SIGKILL)
    assert_all_gone(procs, binds, timeout=2)
    # Then the runtime's own delete (with its poststop) still succeeds.
    result = c.stop()
    assert result is not None and result.ok, result
    assert not hook_env.state_file(c.id).exists()


def test_create_runtime_stage(containers, hook_env, port_alloc):
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}",
                       start_stage="createRuntime")
    services.wait_ready(c.start())
    assert clients.whoami("127.0.0.1", port) == ("127.0.0.1", WHO)
    c.stop()
    assert port_is_free("127.0.0.1", port)


def test_ports_take_connections_as_soon_as_the_hook_returned(containers, hook_env, port_alloc):
    """The builtin hook returns once the listeners are bound and held by the supervisor, before
    the core serves (issue 12): a connect right after `run -d` is queued by the kernel, never
    refused, and is served once the core runs. A delete right after that leaves nothing."""
    tcp, udp = port_alloc.take(), port_alloc.take()
    services = Services().whoami(WHO).udp_echo(UDP)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{tcp}:{WHO},127.0.0.1:{udp}:{UDP}/udp")
    pid = c.start()
    with socket.create_connection(("127.0.0.1", tcp), timeout=5):
        pass  # accepted by the kernel: no ConnectionRefusedError
    services.wait_ready(pid)
    assert clients.whoami("127.0.0.1", tcp)[1] == WHO
    assert clients.udp_echo("127.0.0.1", udp, b"x") == b"x"
    sup = supervisor_of(hook_env, c)
    procs = [sup, *descendants(sup.pid)]
    result = c.stop()
    assert result is not None and result.ok, result
    assert_all_gone(procs, [("127.0.0.1", tcp, "tcp"), ("127.0.0.1", udp, "udp")], timeout=1)
    assert not hook_env.state_file(c.id).exists()


def test_delete_right_after_start_leaves_nothing(containers, hook_env, port_alloc):
    """poststop may come while the supervisor is still starting the core (the hook no longer
    waits for it): everything ends all the same."""
    tcp = port_alloc.take()
    c = containers.new(Services().whoami(WHO).argv(), hook=hook_env, ports=f"127.0.0.1:{tcp}:{WHO}")
    c.start()
    sup = supervisor_of(hook_env, c)
    result = c.stop()
    assert result is not None and result.ok, result
    wait_until(lambda: not sup.alive() and not descendants(sup.pid) and port_is_free("127.0.0.1", tcp, "tcp"),
               5, "the supervisor, its children and the port to go")
    assert not hook_env.state_file(c.id).exists()
    assert "ERROR" not in hook_env.log_text(c.id)


def test_nothing_is_left_when_the_delete_returns_right_after_the_start(containers, hook_env, port_alloc):
    """No waiting afterwards: when the delete returns (poststop waited for the supervisor),
    the supervisor and its children are gone, the port is free and the state file removed,
    whether poststop's SIGTERM came before the core was forked (the supervisor then exits at
    once) or after (it stops the core first). Several rounds, to meet both."""
    for _ in range(6):
        tcp = port_alloc.take()
        c = containers.new(Services().whoami(WHO).argv(), hook=hook_env, ports=f"127.0.0.1:{tcp}:{WHO}")
        c.start()
        sup = supervisor_of(hook_env, c)
        result = c.delete()
        assert result.ok, result
        c._created = False  # noqa: SLF001 - deleted
        assert not sup.alive() and not descendants(sup.pid)
        assert port_is_free("127.0.0.1", tcp, "tcp")
        assert not hook_env.state_file(c.id).exists()
        assert "ERROR" not in hook_env.log_text(c.id)
