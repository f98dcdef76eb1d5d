"""Least privilege (README "Privileges"): what each long-lived process holds, seen in
/proc/PID/status, and the core's seccomp filter exercised from inside the core.

- supervisor, core and dialer have exactly the capabilities, bounding set, no_new_privs,
  seccomp mode and uid the README lists, rootful and rootless, crun and runc;
- the core holds no file but the log and /dev/null;
- the core cannot open a file, exec, ptrace or make a socket: the hook's test switch
  (OCI_PORTFWD_TEST_SANDBOX_PROBE) makes the sandboxed core attempt one such call on a signal;
  each ends the core with one log line naming the syscall, and the restarted core (a fresh
  fork of the supervisor, sandboxed again) serves TCP and UDP as before;
- the dialer cannot open a file or exec: its filter kills it, the supervisor logs that, and a
  new core with a new dialer serves.
"""

import json
import os
import pwd
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.container import Container, ContainerFactory
from e2ekit.forwarding import (
    CORE,
    DIALER,
    Forwarding,
    capabilities,
    child_by_comm,
    forwarding_of,
    status_field,
)
from e2ekit.hookenv import HookEnv, oci_state, reap_leftovers
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, find_by_comm, supervisor_comm
from e2ekit.runtimes import RuntimeUnavailable, make_rootless_runtime, make_runtime
from e2ekit.services import Services
from e2ekit.tools import need_tools
from e2ekit.wait import wait_until
from oci_portfwd.dialer import NATIVE_DIALER, PYTHON_DIALER_ENV

WHO, UDP = 81, 53
RUNTIMES = ["crun", "runc"]
# +python-dialer: the dialer's loop in Python (dialer.PYTHON_DIALER_ENV), as without the
# native portfwd-dialer; the others run the native one.
PYTHON_DIALER = "+python-dialer"
SETUPS = [*RUNTIMES, *(f"rootless-{r}" for r in RUNTIMES), f"runc{PYTHON_DIALER}",
          f"rootless-crun{PYTHON_DIALER}"]
PROBE_ENV = "OCI_PORTFWD_TEST_SANDBOX_PROBE"
# The order of seccomp_filter.PROBES: SIGRTMIN+N attempts probe N; the syscall each one is.
PROBES = {"open": "openat", "exec": "execve", "ptrace": "ptrace", "socket": "socket"}

CAP = {"kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "net_bind_service": 10, "net_admin": 12,
       "sys_ptrace": 19, "sys_admin": 21}
# The README's table, as numbers.
SUPERVISOR_CAPS = sum(1 << CAP[c] for c in ("sys_admin", "sys_ptrace", "net_admin", "setuid",
                                            "setgid", "setpcap", "kill"))
NET_ADMIN = 1 << CAP["net_admin"]


@dataclass
class Setup:
    name: str
    container: Container
    hook: HookEnv
    ports: dict[str, int]
    uid: int                  # who the hook ran as
    python_dialer: bool       # the dialer's loop in Python, not the native program

    @property
    def rootless(self) -> bool:
        return self.uid != 0

    def forwarding(self) -> Forwarding:
        return forwarding_of(self.hook, self.container.id)

    def serves(self) -> None:
        assert clients.whoami("127.0.0.1", self.ports["tcp"])[1] == WHO
        assert clients.whoami("::1", self.ports["tcp"])[1] == WHO
        assert clients.udp_echo("127.0.0.1", self.ports["udp"], b"x") == b"x"


@pytest.fixture(scope="module")
def setup(request, e2e_tmp, hook_command, port_alloc, tmp_path_factory):
    name = request.param
    python_dialer = name.endswith(PYTHON_DIALER)
    runtime_name = name.removesuffix(PYTHON_DIALER)
    if name.startswith("rootless-"):
        user = request.getfixturevalue("test_user")
        area = request.getfixturevalue("user_area")
        try:
            runtime = make_rootless_runtime(runtime_name.removeprefix("rootless-"), e2e_tmp, area, user)
        except RuntimeUnavailable as exc:
            pytest.skip(str(exc))
        rootfs = request.getfixturevalue("user_rootfs")
        command = request.getfixturevalue("rootless_hook_command")
        work = user.make_dir(area / f"privileges-{name}-{uuid.uuid4().hex[:6]}")
        hook_dir, bundles = user.make_dir(work / "hook"), user.make_dir(work / "bundles")
        uid = pwd.getpwnam(user.name).pw_uid
    else:
        try:
            runtime = make_runtime(runtime_name, e2e_tmp)
        except RuntimeUnavailable as exc:
            pytest.skip(str(exc))
        rootfs, command = request.getfixturevalue("rootfs"), hook_command
        work = tmp_path_factory.mktemp(f"privileges-{name}")
        hook_dir, bundles, uid = work / "hook", work / "bundles", 0
    env = [f"{PROBE_ENV}=1", *([f"{PYTHON_DIALER_ENV}=1"] if python_dialer else [])]
    hook = HookEnv(command, hook_dir, extra_env=env)
    ports = {"tcp": port_alloc.take(), "udp": port_alloc.take()}
    services = Services().whoami(WHO).udp_echo(UDP)
    factory = ContainerFactory(runtime, rootfs, bundles)
    try:
        c = factory.new(services.argv(), hook=hook,
                        ports=f"{ports['tcp']}:{WHO},{ports['udp']}:{UDP}/udp")
        services.wait_ready(c.start())
        s = Setup(name, c, hook, ports, uid, python_dialer)
        # One round trip: with rootless crun the dialer joins only after the hook returned.
        s.serves()
        yield s
    finally:
        factory.cleanup()
        reap_leftovers(hook)


def _status(pid: int) -> dict[str, object]:
    caps = capabilities(pid)
    return {**caps, "NoNewPrivs": int(status_field(pid, "NoNewPrivs")),
            "Seccomp": int(status_field(pid, "Seccomp")),
            "Uid": {int(u) for u in status_field(pid, "Uid").split()}}


def _expected(s: Setup, proc: Proc) -> dict[str, dict[str, object]]:
    full_bset = capabilities(1)["CapBnd"]  # what an untouched process has
    nobody = pwd.getpwnam("nobody").pw_uid
    if not s.rootless:
        sup = dict(CapInh=0, CapPrm=SUPERVISOR_CAPS, CapEff=SUPERVISOR_CAPS, CapBnd=SUPERVISOR_CAPS,
                   CapAmb=0, NoNewPrivs=1, Seccomp=0, Uid={0})
        core = dict(CapInh=0, CapPrm=0, CapEff=0, CapBnd=0, CapAmb=0, NoNewPrivs=1, Seccomp=2,
                    Uid={nobody})
        dialer = dict(CapInh=0, CapPrm=NET_ADMIN, CapEff=NET_ADMIN, CapBnd=NET_ADMIN, CapAmb=0,
                      NoNewPrivs=1, Seccomp=2, Uid={0})
    else:
        # No capability in the host's user namespace to begin with; the bounding set cannot
        # be emptied there (that needs CAP_SETPCAP) and grants nothing. The dialer's
        # CAP_NET_ADMIN counts in the container's user namespace.
        sup = dict(CapInh=0, CapPrm=0, CapEff=0, CapBnd=full_bset, CapAmb=0, NoNewPrivs=1,
                   Seccomp=0, Uid={s.uid})
        core = dict(sup, Seccomp=2)
        dialer = dict(CapInh=0, CapPrm=NET_ADMIN, CapEff=NET_ADMIN, CapBnd=NET_ADMIN, CapAmb=0,
                      NoNewPrivs=1, Seccomp=2, Uid={s.uid})
    return {"supervisor": sup, "core": core, "dialer": dialer}


@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_each_process_holds_what_the_readme_says(setup):
    fwd = setup.forwarding()
    expected = _expected(setup, fwd.core)
    found = {name: _status(proc.pid) for name, proc in fwd.procs.items()}
    assert {name: {k: (hex(v) if isinstance(v, int) else v) for k, v in d.items()}
            for name, d in found.items()} == \
        {name: {k: (hex(v) if isinstance(v, int) else v) for k, v in d.items()}
         for name, d in expected.items()}


def _task_status(pid: int, tid: int) -> dict[str, object]:
    fields = {}
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {**{k: int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            "NoNewPrivs": int(fields["NoNewPrivs"]), "Seccomp": int(fields["Seccomp"]),
            "Seccomp_filters": int(fields["Seccomp_filters"]),
            "Uid": {int(u) for u in fields["Uid"].split()}}


@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_relay_threads_hold_what_the_core_holds_under_a_filter_of_their_own(setup):
    """The core's C relay threads (native_relay.py): started after the core dropped its
    privileges, so the same credentials and capabilities; each under its own filter (one,
    not the core's on top: seccomp filters are per thread and they loaded theirs first)."""
    fwd = setup.forwarding()
    core = fwd.core
    setup.serves()  # the core serves: it has started its threads
    tids = sorted(int(t) for t in os.listdir(f"/proc/{core.pid}/task"))
    relay_tids = [t for t in tids if t != core.pid]
    assert len(relay_tids) == min(4, len(os.sched_getaffinity(0))), tids
    expected = {**_expected(setup, core)["core"], "Seccomp_filters": 1}
    for tid in [core.pid, *relay_tids]:
        found = _task_status(core.pid, tid)
        assert {k: (hex(v) if isinstance(v, int) else v) for k, v in found.items()} == \
            {k: (hex(v) if isinstance(v, int) else v) for k, v in expected.items()}, f"thread {tid}"
    assert "TCP is relayed by the Python loop" not in setup.hook.log_text(setup.container.id)
    setup.serves()  # through them


@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_the_dialer_runs_the_native_program_unless_told_not_to(setup):
    """The native portfwd-dialer (~0.2 MB) from the venv's libexec, holding its socketpair
    and stdio only; with the test switch the Python loop, which the core logs."""
    dialer = setup.forwarding().dialer
    exe = os.readlink(f"/proc/{dialer.pid}/exe")
    log = setup.hook.log_text(setup.container.id)
    if setup.python_dialer:
        assert exe != NATIVE_DIALER and "python" in Path(exe).name, exe
        assert f"the dialer's loop runs in Python (~6 MB more per container): {PYTHON_DIALER_ENV} is set" in log
        return
    assert exe == NATIVE_DIALER
    assert "the dialer's loop runs in Python" not in log, log
    # /dev/null, the log twice, the socketpair: no filter pipe, nothing of the core's.
    fds = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{dialer.pid}/fd").iterdir()}
    log_file = str(setup.hook.log_file(setup.container.id).resolve())
    assert [fds.pop(0), fds.pop(1), fds.pop(2)] == ["/dev/null", log_file, log_file]
    assert len(fds) == 1 and next(iter(fds.values())).startswith("socket:"), fds
    assert int(status_field(dialer.pid, "VmRSS").split()[0]) < 2048


@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_core_holds_no_file_but_its_log_and_counters(setup):
    core = setup.forwarding().core
    log = setup.hook.log_file(setup.container.id).resolve()
    # Its traffic page (stats.counters_file): mapped, and held by that mapping (mmap's dup).
    counters = setup.hook.state_dir.resolve() / f"{setup.container.id}.counters"
    files = set()
    for fd in Path(f"/proc/{core.pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("/"):
            files.add(target)
    assert files <= {str(log), str(counters), "/dev/null"}, files


@pytest.mark.parametrize("probe", list(PROBES))
@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_forbidden_call_ends_the_core_which_is_restarted(setup, probe):
    fwd = setup.forwarding()
    old = fwd.core
    assert int(status_field(old.pid, "Seccomp")) == 2
    log_before = setup.hook.log_text(setup.container.id)
    os.kill(old.pid, signal.SIGRTMIN + list(PROBES).index(probe))
    wait_until(lambda: not old.alive(), 10, f"the core (pid {old.pid}) to end")
    line = f"forwarding core pid {old.pid} died (ended by its seccomp filter: forbidden system call {PROBES[probe]})"

    def logged() -> str | None:
        new = setup.hook.log_text(setup.container.id)[len(log_before):]
        return next((x for x in new.splitlines() if line in x), None)

    wait_until(logged, 10, f"the log line {line!r}")
    text = setup.hook.log_text(setup.container.id)[len(log_before):]
    assert "the call was allowed" not in text, text
    assert "Traceback" not in text, text
    new = wait_until(lambda: child_by_comm(fwd.supervisor.pid, CORE, exclude=(old.pid,)), 10,
                     "the restarted core")
    wait_until(lambda: child_by_comm(new.pid, DIALER), 10, "the restarted core's dialer")
    setup.serves()
    assert int(status_field(new.pid, "Seccomp")) == 2


@pytest.mark.parametrize("setup", ["runc", "rootless-crun"], indirect=True)
def test_a_bug_in_the_sandboxed_core_still_logs_its_traceback(setup):
    """A traceback reads source files, which the filter forbids: the sandbox turns that off,
    so a bug is logged as a bug (exit code 1), not as a seccomp violation."""
    fwd = setup.forwarding()
    log_before = setup.hook.log_text(setup.container.id)
    os.kill(fwd.core.pid, signal.SIGRTMIN + 4)  # PROBES[4]: raise
    wait_until(lambda: not fwd.core.alive(), 10, "the core to end")
    line = f"forwarding core pid {fwd.core.pid} died (exit code 1)"
    wait_until(lambda: line in setup.hook.log_text(setup.container.id)[len(log_before):], 10,
               f"the log line {line!r}")
    text = setup.hook.log_text(setup.container.id)[len(log_before):]
    assert "Traceback" in text and "RuntimeError: sandbox probe: a bug" in text, text
    assert "forbidden system call" not in text, text
    wait_until(lambda: child_by_comm(fwd.supervisor.pid, CORE, exclude=(fwd.core.pid,)), 10,
               "the restarted core")
    setup.serves()


@pytest.mark.parametrize("probe", ["open", "exec"])
@pytest.mark.parametrize("setup", SETUPS, indirect=True)
def test_forbidden_call_kills_the_dialer_and_a_new_one_serves(setup, probe):
    fwd = setup.forwarding()
    log_before = setup.hook.log_text(setup.container.id)
    os.kill(fwd.dialer.pid, signal.SIGRTMIN + list(PROBES).index(probe))
    wait_until(lambda: not fwd.dialer.alive() and not fwd.core.alive(), 10,
               "the dialer and its core to end")
    line = f"the core's dialer pid {fwd.dialer.pid} was killed by its seccomp filter"
    wait_until(lambda: line in setup.hook.log_text(setup.container.id)[len(log_before):], 10,
               f"the log line {line!r}")
    new = wait_until(lambda: child_by_comm(fwd.supervisor.pid, CORE, exclude=(fwd.core.pid,)), 10,
                     "the restarted core")
    dialer = wait_until(lambda: child_by_comm(new.pid, DIALER), 10, "the new dialer")
    setup.serves()
    assert int(status_field(dialer.pid, "Seccomp")) == 2
    assert "the call was allowed" not in setup.hook.log_text(setup.container.id)[len(log_before):]


@pytest.mark.parametrize("driver", ["slirp4netns", "pasta"])
def test_external_driver_binds_a_privileged_port(containers, hook_env, driver):
    """The external drivers' programs run within the supervisor's bounding set, which keeps
    net_bind_service for them (README "Privileges")."""
    need_tools(driver)
    port = next((p for p in range(1000, 1024) if port_is_free("127.0.0.1", p)), None)
    if port is None:
        pytest.skip("no free port in 1000-1023")
    hook_env.write_config({"state_dir": str(hook_env.state_dir), "log_level": "debug", "driver": driver})
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    assert clients.whoami("127.0.0.1", port)[1] == WHO
    sup = int(hook_env.read_state(c.id)["supervisor_pid"])
    assert capabilities(sup)["CapBnd"] == SUPERVISOR_CAPS | 1 << CAP["net_bind_service"]
    c.stop()
    assert port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("user, words", [("no-such-user-lp", "is no user on this host"),
                                         ("root", "is root; name an unprivileged user")])
def test_bad_core_user_fails_the_start_with_one_line(hook_env, tmp_path, netns_pid, port_alloc,
                                                     user, words):
    port = port_alloc.take()
    cid = f"coreuser-{user}"[:20]
    hook_env.write_config({"state_dir": str(hook_env.state_dir), "core_user": user})
    state = json.dumps({"ociVersion": "1.0.2-dev", "id": cid, "status": "creating",
                        "pid": netns_pid, "bundle": str(tmp_path),
                        "annotations": {"io.oci-portfwd.ports": f"127.0.0.1:{port}:80"}})
    try:
        r = hook_env.run("prestart", stdin=state, cwd=tmp_path)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 1 and "Traceback" not in err, err
        assert err.count("\n") == 1 and f"core_user {user!r}" in err and words in err, err
        assert port_is_free("127.0.0.1", port)
        assert not hook_env.state_file(cid).exists()
        assert not find_by_comm(supervisor_comm(cid))
    finally:
        hook_env.run("poststop", stdin=oci_state(cid, "stopped", tmp_path), cwd=tmp_path)
        reap_leftovers(hook_env)


def test_check_config_names_a_core_user_the_host_lacks(hook_env, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"core_user": "no-such-user-lp"}))
    r = hook_env.run("check-config", str(config))
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and err.count("\n") == 1 and "core_user 'no-such-user-lp'" in err, err
    config.write_text(json.dumps({"core_user": "nobody"}))
    r = hook_env.run("check-config", str(config))
    assert r.returncode == 0 and "core_user: nobody" in r.stdout.decode(), r


@pytest.mark.parametrize("setup", [s for s in SETUPS if s.startswith("rootless-")], indirect=True)
def test_the_containers_user_namespace_cannot_read_the_dialer(setup, test_user):
    """Dialer and core are not dumpable (design §4): a process that joined the container's
    user namespace, with every capability there and in the host's pid namespace (where the
    dialer's pid is visible), can neither read the dialer's memory (/proc/PID/environ needs
    ptrace read access) nor attach to it."""
    dialer = setup.forwarding().dialer
    probe = (f"import ctypes, sys\n"
             f"try:\n    open('/proc/{dialer.pid}/environ', 'rb').read()\n"
             f"except PermissionError:\n    pass\nelse:\n    sys.exit('read the environment')\n"
             f"libc = ctypes.CDLL(None, use_errno=True)\n"
             f"if libc.ptrace(16, {dialer.pid}, None, None) == 0:\n    sys.exit('attached')\n"
             f"print('errno', ctypes.get_errno())\n")
    r = test_user.run(["nsenter", "--user", "--preserve-credentials", "--target", str(setup.container.pid),
                       "/usr/bin/python3",
                       "-c", probe])
    assert r.returncode == 0 and r.stdout.decode().split() == ["errno", "1"], r
    assert dialer.alive()
