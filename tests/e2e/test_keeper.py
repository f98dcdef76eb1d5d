"""The supervisor's quiet life in portfwd-keeper (hook/native/portfwd-keeper.c, issue 12).

Once its core serves, the supervisor execs the keeper (same pid: poststop and `ps` find it as
before); the keeper tears down by itself and execs the Python supervisor again
(supervisor.resume) when its core dies, which restarts the core and hands over again. The
core runs in an interpreter of its own (core_process.py). Without the keeper, or with
OCI_PORTFWD_PYTHON_SUPERVISOR set, the supervisor stays in Python and does all of it itself.
"""

import os
import signal
import subprocess
import time

import pytest
from e2ekit.clients import whoami
from e2ekit.forwarding import CORE, child_by_comm, forwarding_of
from e2ekit.hookenv import HookEnv, oci_state
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, descendants
from e2ekit.services import Services
from e2ekit.wait import wait_until
from oci_portfwd.supervisor import PYTHON_SUPERVISOR_ENV, native_keeper

WHO = 81
TIMEOUT = 10


@pytest.fixture(scope="module")
def keeper(e2e_host) -> str:
    path = native_keeper()
    if path is None:
        pytest.fail("portfwd-keeper is missing from the venv: run `make venv`")
    return path


def exe(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def start(containers, hook_env, port_alloc):
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    assert whoami("127.0.0.1", port)[1] == WHO
    return c, port


def state_files(hook_env: HookEnv, container_id: str) -> list[str]:
    return sorted(p.name for p in hook_env.state_dir.glob(f"{container_id}*") if not p.name.endswith(".log"))


def test_the_supervisor_waits_in_the_keeper_and_tears_down_there(containers, hook_env, port_alloc, keeper):
    c, port = start(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    sup = fw.supervisor.pid
    wait_until(lambda: exe(sup) == keeper, TIMEOUT, "the supervisor to exec the keeper")
    assert fw.supervisor.comm() == f"portfwd:{c.id[:7]}"
    # A core of its own interpreter, not a fork of the supervisor's.
    assert "oci_portfwd.core_process" in open(f"/proc/{fw.core.pid}/cmdline").read()
    assert state_files(hook_env, c.id) == [f"{c.id}.counters", f"{c.id}.json"]
    ps = hook_env.run("ps").stdout.decode()
    assert " 0/1 " in ps, ps  # the page the keeper does not publish: ps reads it
    # What poststop sends (it then removes the log of an uneventful forwarding: read it first).
    os.kill(sup, signal.SIGTERM)
    wait_until(lambda: not fw.supervisor.alive(), TIMEOUT, "the keeper to tear down")
    assert state_files(hook_env, c.id) == []
    assert port_is_free("127.0.0.1", port)
    assert not fw.core.alive() and not fw.dialer.alive()
    log = hook_env.log_text(c.id)
    assert "tearing down: SIGTERM received (poststop)" in log, log
    assert f"core pid {fw.core.pid} stopped (killed by SIGTERM)" in log, log
    r = hook_env.run("poststop", stdin=oci_state(c.id, "stopped", c.bundle), cwd=c.bundle)
    assert r.returncode == 0 and not r.stderr, r.stderr.decode()


def test_a_dead_core_brings_the_python_supervisor_back_which_restarts_it(containers, hook_env,
                                                                         port_alloc, keeper):
    c, port = start(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    sup = fw.supervisor.pid
    core = fw.core.pid
    for _ in range(2):
        wait_until(lambda: exe(sup) == keeper, TIMEOUT, "the supervisor to exec the keeper")
        os.kill(core, signal.SIGKILL)
        old = core
        core = wait_until(lambda old=old: child_by_comm(sup, CORE, (old,)), TIMEOUT, "a restarted core").pid
        assert whoami("127.0.0.1", port)[1] == WHO
    wait_until(lambda: exe(sup) == keeper, TIMEOUT, "the supervisor to exec the keeper again")
    log = hook_env.log_text(c.id)
    assert log.count("the supervisor is back in Python") == 2, log
    assert log.count("died (killed by SIGKILL)") == 2, log
    c.stop()
    assert port_is_free("127.0.0.1", port) and state_files(hook_env, c.id) == []


def test_the_container_s_exit_ends_the_forwarding_from_the_keeper(containers, hook_env, port_alloc, keeper):
    c, port = start(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    wait_until(lambda: exe(fw.supervisor.pid) == keeper, TIMEOUT, "the supervisor to exec the keeper")
    c.kill()  # no delete: the supervisor sees the container's process end by itself
    wait_until(lambda: not fw.supervisor.alive(), TIMEOUT, "the supervisor to end with the container")
    assert port_is_free("127.0.0.1", port) and state_files(hook_env, c.id) == []
    assert f"tearing down: container process {c.pid} exited" in hook_env.log_text(c.id)


@pytest.mark.parametrize("delay_ms", [0, 15, 30, 45, 60, 80, 110, 150])
def test_a_stop_at_any_moment_around_the_handover_tears_everything_down(containers, hook_env, port_alloc,
                                                                         keeper, delay_ms):
    """poststop's SIGTERM while the supervisor may be anywhere between the hook's return, the
    core's start, the exec of the keeper (signals blocked across it) and the keeper's wait."""
    port = port_alloc.take()
    c = containers.new(Services().whoami(WHO).argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    c.start()
    sup = Proc.of(int(hook_env.read_state(c.id)["supervisor_pid"]))
    assert sup is not None
    tree = {sup.pid: sup}
    deadline = time.monotonic() + delay_ms / 1000
    while True:  # who is there meanwhile: the core, its dialer
        tree.update((p.pid, p) for p in descendants(sup.pid) if p.pid not in tree)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.002)
    os.kill(sup.pid, signal.SIGTERM)
    wait_until(lambda: not [p for p in tree.values() if p.alive()], TIMEOUT,
               lambda: f"the forwarding's processes to end: {[p.pid for p in tree.values() if p.alive()]}")
    assert port_is_free("127.0.0.1", port)
    assert state_files(hook_env, c.id) == []
    assert "SIGTERM received (poststop)" in hook_env.log_text(c.id), hook_env.log_text(c.id)


def test_without_the_keeper_the_supervisor_stays_in_python(containers, hook_command, tmp_path, port_alloc):
    hook_env = HookEnv(hook_command, tmp_path / "hook", extra_env=[f"{PYTHON_SUPERVISOR_ENV}=1"])
    c, port = start(containers, hook_env, port_alloc)
    fw = forwarding_of(hook_env, c.id)
    os.kill(fw.core.pid, signal.SIGKILL)
    wait_until(lambda: child_by_comm(fw.supervisor.pid, CORE, (fw.core.pid,)), TIMEOUT, "a restarted core")
    assert whoami("127.0.0.1", port)[1] == WHO
    assert "python" in os.path.basename(exe(fw.supervisor.pid)), exe(fw.supervisor.pid)
    log = hook_env.log_text(c.id)
    assert "portfwd-keeper" not in log and "restarting it" in log, log
    c.stop()
    assert port_is_free("127.0.0.1", port) and state_files(hook_env, c.id) == []


def test_the_keeper_is_no_command(keeper):
    r = subprocess.run([keeper], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "exec'd by the supervisor only" in r.stderr, r.stderr
