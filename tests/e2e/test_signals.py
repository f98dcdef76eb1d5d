"""Signals reach the hook's processes. crun runs hooks with nearly every signal blocked, and a
blocked mask survives fork and exec: the supervisor ignored poststop's SIGTERM (stopped by
SIGKILL 5 s later), every stop waited for a grace period, and slirp4netns/pasta never saw
their death signal."""

import pytest
from e2ekit.clients import whoami
from e2ekit.hookenv import oci_state
from e2ekit.procs import descendants
from e2ekit.services import Services
from e2ekit.tools import need_tools

WHO = 81
SIGTERM_BIT = 1 << (15 - 1)


def blocked_mask(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


@pytest.mark.parametrize("driver", ["builtin", "pasta"])
def test_no_signal_blocked_in_the_hooks_processes(containers, hook_env, port_alloc, driver):
    if driver == "pasta":
        need_tools("pasta")
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}",
                       annotations={"io.oci-portfwd.driver": driver})
    services.wait_ready(c.start())
    # The hook returns before the core and its dialer have started (issue 12): one answered
    # request through the port proves they are all there.
    whoami("127.0.0.1", port)
    supervisor = int(hook_env.read_state(c.id)["supervisor_pid"])
    procs = [supervisor, *(p.pid for p in descendants(supervisor))]
    assert len(procs) >= 3, procs  # supervisor, core, and the dialer or the program
    masks = {}
    for pid in procs:
        try:
            masks[pid] = blocked_mask(pid)
        except FileNotFoundError:
            # The dialer's short-lived routing child (source_address client) may end meanwhile:
            # the hook returns before the core and its dialer have started (issue 12).
            continue
    assert len(masks) >= 3, masks
    assert all(mask == 0 for mask in masks.values()), {p: hex(m) for p, m in masks.items()}


def test_poststop_of_a_running_container_stops_the_supervisor_with_sigterm(containers, hook_env,
                                                                            port_alloc):
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    r = hook_env.run("poststop", stdin=oci_state(c.id, "stopped", c.bundle), cwd=c.bundle)
    assert r.returncode == 0, r.stderr.decode()
    # SIGKILL only follows a SIGTERM that was not obeyed; the warning says so.
    assert b"did not stop" not in r.stderr, r.stderr.decode()
    assert not hook_env.state_file(c.id).exists()
