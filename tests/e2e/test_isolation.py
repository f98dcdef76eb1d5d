"""A container's processes cannot reach the forwarding: the supervisor, core and dialer are not
in the container's pid namespace, core and dialer are not dumpable (the user cannot read their
/proc files even for its own rootless forwarding), and the host's listening sockets are never in
the container's network namespace, nor held by the dialer, the one process that is.

rootful and rootless, crun and runc; one forwarded container per setup.
"""

import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.container import Container, ContainerFactory
from e2ekit.forwarding import socket_inodes
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.ports import listeners
from e2ekit.procs import Proc, children
from e2ekit.runtimes import RuntimeUnavailable, make_rootless_runtime, make_runtime
from e2ekit.services import Services
from e2ekit.users import process_uid
from e2ekit.wait import wait_until

WHO, UDP = 81, 53
RUNTIMES = ["crun", "runc"]
ROOTLESS = [f"rootless-{r}" for r in RUNTIMES]
SETUPS = [*RUNTIMES, *ROOTLESS]


@dataclass
class Forwarded:
    container: Container
    hook: HookEnv
    host_ports: dict[str, int]    # proto -> host port
    supervisor: Proc
    core: Proc
    dialer: Proc


def _child(parent: int, comm: str) -> Proc | None:
    return next((p for p in children(parent) if p.alive() and p.comm() == comm), None)


@pytest.fixture(scope="module")
def fwd(request, e2e_tmp, hook_command, port_alloc, tmp_path_factory):
    setup = request.param
    if setup.startswith("rootless-"):
        user = request.getfixturevalue("test_user")
        area = request.getfixturevalue("user_area")
        try:
            runtime = make_rootless_runtime(setup.removeprefix("rootless-"), e2e_tmp, area, user)
        except RuntimeUnavailable as exc:
            pytest.skip(str(exc))
        rootfs = request.getfixturevalue("user_rootfs")
        command = request.getfixturevalue("rootless_hook_command")
        work = user.make_dir(area / f"isolation-{setup}-{uuid.uuid4().hex[:6]}")
        hook_dir, bundles = user.make_dir(work / "hook"), user.make_dir(work / "bundles")
    else:
        try:
            runtime = make_runtime(setup, e2e_tmp)
        except RuntimeUnavailable as exc:
            pytest.skip(str(exc))
        rootfs = request.getfixturevalue("rootfs")
        command = hook_command
        work = tmp_path_factory.mktemp(f"isolation-{setup}")
        hook_dir, bundles = work / "hook", work / "bundles"
    hook = HookEnv(command, hook_dir)
    ports = {"tcp": port_alloc.take(), "udp": port_alloc.take()}
    services = Services().whoami(WHO).udp_echo(UDP)
    factory = ContainerFactory(runtime, rootfs, bundles)
    try:
        c = factory.new(services.argv(), hook=hook,
                        ports=f"{ports['tcp']}:{WHO},{ports['udp']}:{UDP}/udp")
        services.wait_ready(c.start())
        # One round trip each: with rootless crun the dialer joins the container only after
        # the hook returned; from here on it is surely inside.
        assert clients.whoami("127.0.0.1", ports["tcp"])[1] == WHO
        assert clients.udp_echo("127.0.0.1", ports["udp"], b"x") == b"x"
        sup = Proc.of(int(hook.read_state(c.id)["supervisor_pid"]))
        assert sup is not None
        core = wait_until(lambda: _child(sup.pid, "portfwd-core"), 5, "the core process")
        dialer = wait_until(lambda: _child(core.pid, "portfwd-dialer"), 5, "the dialer process")
        yield Forwarded(c, hook, ports, sup, core, dialer)
    finally:
        factory.cleanup()
        reap_leftovers(hook)


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _forwarding(f: Forwarded) -> dict[str, Proc]:
    procs = {"supervisor": f.supervisor, "core": f.core, "dialer": f.dialer}
    for name, proc in procs.items():
        assert proc.alive(), f"the {name} (pid {proc.pid}) is gone"
    return procs


def _pidns_members(init_pid: int) -> dict[int, int]:
    """{pid inside the container: host pid} of every process in the container's pid ns."""
    target = _ns(init_pid, "pid")
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != target:
                continue
            nspid = next(line for line in (entry / "status").read_text().splitlines()
                         if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        members[int(nspid.split()[-1])] = int(entry.name)
    return members


@pytest.mark.parametrize("fwd", SETUPS, indirect=True)
def test_forwarding_processes_not_in_container_pid_or_mount_ns(fwd):
    init = fwd.container.pid
    for name, proc in _forwarding(fwd).items():
        for kind in ("pid", "mnt"):
            assert _ns(proc.pid, kind) != _ns(init, kind), f"the {name} is in the container's {kind} ns"


@pytest.mark.parametrize("fwd", SETUPS, indirect=True)
def test_container_sees_only_its_own_processes(fwd):
    procs = _forwarding(fwd)
    # `exec` replaces the shell: the pid printed is that of the ls listing /proc.
    r = fwd.container.exec(["/bin/sh", "-c", "echo self $$; exec ls /proc"])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    lines = r.stdout.decode().split()
    self_pid = int(lines[1])
    seen = {int(n) for n in lines[2:] if n.isdigit()} - {self_pid}
    members = _pidns_members(fwd.container.pid)
    assert seen, "ls /proc inside the container shows no process at all"
    assert seen <= set(members), (
        f"pids visible in the container {sorted(seen)} that are not the container's own "
        f"{sorted(members)}")
    assert not {p.pid for p in procs.values()} & set(members.values())

    r = fwd.container.exec(["ps", "-o", "pid,comm"])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out = r.stdout.decode()
    assert "portfwd" not in out, f"a forwarding process is visible in the container:\n{out}"


@pytest.mark.parametrize("fwd", ROOTLESS, indirect=True)
def test_core_and_dialer_not_readable_by_the_user(fwd, test_user):
    procs = _forwarding(fwd)
    probe = ("import sys\n"
             "for p in sys.argv[1:]:\n"
             "    try:\n"
             "        open(p, 'rb').read(1); print(p, 'READ')\n"
             "    except OSError as e:\n"
             "        print(p, e.__class__.__name__, e.errno)\n")
    # A control: a process of the user's own that is dumpable is readable, so a refusal below
    # is the processes' non-dumpability, not something about this host's /proc.
    control = subprocess.Popen(["sleep", "60"], user=test_user.uid, group=test_user.gid,
                               extra_groups=[], stdin=subprocess.DEVNULL, cwd="/")
    try:
        paths = [f"/proc/{procs['core'].pid}/environ", f"/proc/{procs['dialer'].pid}/environ",
                 f"/proc/{control.pid}/environ"]
        r = test_user.run(["/usr/bin/python3", "-c", probe, *paths])
    finally:
        control.kill()
        control.wait(timeout=10)
    out = r.stdout.decode()
    results = dict(line.split(" ", 1) for line in out.splitlines())
    assert results.get(paths[2]) == "READ", f"control: the user cannot read its own process:\n{out}"
    for name, path in (("core", paths[0]), ("dialer", paths[1])):
        assert process_uid(procs[name].pid) == test_user.uid, f"the {name} is not the user's"
        assert results.get(path) == "PermissionError 13", \
            f"the user read the {name}'s {path} (dumpable?): {results.get(path)}\n{out}"
        assert os.stat(path).st_uid == 0, f"{path} is not root-owned: the {name} is dumpable"


def _ss(netns_pid: int | None) -> list[str]:
    argv = ["ss", "-H", "-l", "-n", "-t", "-u", "-p"]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()


def _pids_in(line: str) -> set[int]:
    return {int(p) for p in re.findall(r"pid=(\d+)", line)}


@pytest.mark.parametrize("fwd", SETUPS, indirect=True)
def test_host_listeners_never_in_container_netns(fwd):
    init = fwd.container.pid
    inside = {port for proto in ("tcp", "udp") for _, port in listeners(proto, netns_pid=init)}
    published = set(fwd.host_ports.values())
    assert not inside & published, f"published host ports {sorted(inside & published)} inside"
    assert _ns(fwd.dialer.pid, "net") == _ns(init, "net"), "the dialer is not in the container's netns"
    for name in ("supervisor", "core"):
        proc = getattr(fwd, name)
        assert _ns(proc.pid, "net") == _ns(os.getpid(), "net"), f"the {name} left the host's netns"


def _host_bound_inodes(ports: set[int]) -> set[int]:
    """Inodes of the host netns' sockets bound to `ports` (/proc/net/{tcp,udp}{,6}, as root
    in the host netns: our own /proc/net)."""
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(int(fields[9]))
    return inodes


@pytest.mark.parametrize("fwd", SETUPS, indirect=True)
def test_dialer_holds_no_listening_socket(fwd):
    procs = _forwarding(fwd)
    dialer = procs["dialer"].pid
    for where, lines in (("host", _ss(None)), ("container", _ss(fwd.container.pid))):
        holders = [line for line in lines if dialer in _pids_in(line)]
        assert not holders, f"the dialer holds listening sockets in the {where} netns: {holders}"
    published = _host_bound_inodes(set(fwd.host_ports.values()))
    assert published, "no host socket on the published ports"
    assert not socket_inodes(dialer) & published, "the dialer holds a published host socket"
    # And the host listeners are held by the supervisor and the core only.
    owners = set()
    for line in _ss(None):
        port = int(line.split()[4].rsplit(":", 1)[1])
        if port in fwd.host_ports.values():
            owners |= _pids_in(line)
    assert owners and owners <= {procs["supervisor"].pid, procs["core"].pid}, owners
