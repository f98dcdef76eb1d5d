"""20 containers started and stopped in parallel, each with its own ports, all sharing one hook
config and state dir (created by whichever hook comes first): every port reaches its own
container, and afterwards no port, process or state file is left (ss -ltnup, the state dir; the log of a
normal stop goes too).

Each container serves on container ports of its own (whoami on 1000+i), so an answer names the
container that gave it: a mix-up shows as a wrong port, not only as a failure.

Run under both runtimes: the parallel part costs ~10 s each on 2 cores.
"""

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2ekit import clients
from e2ekit.forwarding import forwarding_of
from e2ekit.measure import note
from e2ekit.procs import Proc, find_by_comm, supervisor_comm
from e2ekit.services import Services
from e2ekit.wait import wait_until

COUNT = 20
FIRST_CONTAINER_PORT = 1000


def ss_listeners() -> list[str]:
    out = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return out.splitlines()


def ss_port(line: str) -> int:
    return int(line.split()[4].rsplit(":", 1)[1])


def ss_pids(line: str) -> set[int]:
    return {int(p) for p in re.findall(r"pid=(\d+)", line)}


@pytest.mark.timeout(180)
def test_20_containers_in_parallel(containers, hook_env, port_alloc):
    tcp = [port_alloc.take() for _ in range(COUNT)]
    udp = [port_alloc.take() for _ in range(COUNT)]
    inner = [FIRST_CONTAINER_PORT + i for i in range(COUNT)]
    services = [Services().whoami(inner[i]).udp_echo(inner[i]) for i in range(COUNT)]
    made = [containers.new(services[i].argv(), hook=hook_env,
                           ports=f"{tcp[i]}:{inner[i]},127.0.0.1:{udp[i]}:{inner[i]}/udp")
            for i in range(COUNT)]
    assert not hook_env.state_dir.exists(), "the state dir must be made by the hooks themselves"

    def start(i: int) -> int:
        pid = made[i].start()
        services[i].wait_ready(pid)
        return pid

    with ThreadPoolExecutor(COUNT) as pool:
        pids = list(pool.map(start, range(COUNT)))
    assert len(set(pids)) == COUNT

    # Every port reaches its own container, from both families, TCP and UDP.
    for i in range(COUNT):
        for host in ("127.0.0.1", "::1"):
            assert clients.whoami(host, tcp[i])[1] == inner[i], f"container {i} via {host}:{tcp[i]}"
        assert clients.udp_echo("127.0.0.1", udp[i], b"c%d" % i) == b"c%d" % i, f"udp of {i}"

    # Each state file names its own container and ports; each host port is held by that
    # container's supervisor or core only.
    forwardings = [forwarding_of(hook_env, c.id) for c in made]
    lines = ss_listeners()
    for i, c in enumerate(made):
        record = hook_env.read_state(c.id)
        assert record["container_pid"] == pids[i], (i, record)
        assert sorted(record["ports"]) == sorted([f"{tcp[i]}:{inner[i]}/tcp",
                                                  f"127.0.0.1:{udp[i]}:{inner[i]}/udp"]), record
        own = {forwardings[i].supervisor.pid, forwardings[i].core.pid}
        holders = set().union(*[ss_pids(ln) for ln in lines if ss_port(ln) in (tcp[i], udp[i])])
        assert holders and holders <= own, f"container {i}: ports held by {holders}, not {own}"
    assert len({f.supervisor.pid for f in forwardings}) == COUNT

    all_procs = [p for f in forwardings for p in f.procs.values()]
    with ThreadPoolExecutor(COUNT) as pool:
        results = list(pool.map(lambda c: c.stop(), made))
    failed = [(c.id, r) for c, r in zip(made, results, strict=True) if r is None or not r.ok]
    assert not failed, failed

    # Nothing left: ports (ss -ltnup), processes, state files (and the logs of a normal stop).
    ours = set(tcp) | set(udp)
    wait_until(lambda: not [p for p in all_procs if p.alive()], 2,
               lambda: f"forwarding pids {[p.pid for p in all_procs if p.alive()]} to end")
    left = [ln for ln in ss_listeners() if ss_port(ln) in ours]
    assert not left, "ports still bound:\n" + "\n".join(left)
    for c in made:
        assert not find_by_comm(supervisor_comm(c.id)), f"a supervisor of {c.id} runs"
    for i in range(COUNT):
        gone = Proc.of(pids[i])
        assert gone is None or not gone.alive(), f"container {i}'s init still runs"
    leftovers = sorted(os.listdir(hook_env.state_dir))
    note("parallel-20", runtime=made[0].runtime.name, state_dir_after=leftovers)
    # Nothing at all: no state file, no temporary file, no log (a normal stop removes it).
    assert leftovers == [], f"left in the state dir: {leftovers}"
