"""Security of the hook's own files and processes.

- State dir 0700, state file and log 0600, even under umask 0; a looser existing dir is
  tightened, a dir owned by someone else is refused.
- A pre-existing symlink at the state path (the state dir, `<id>.json`, `<id>.log`) is refused,
  not followed: the file it points to is untouched.
- An unprivileged user cannot stop or read another's forwarding: root's (rootful) nor another
  user's (rootless): not with the hook's poststop (on the other's state dir, or with a forged
  state file of its own naming the other's supervisor), not with kill, not through /proc.
- Not dumpable: not even the rootless owner reads its supervisor's /proc/PID/environ
  (test_isolation.py checks the core and the dialer so). Rootful, this kernel gives no way to
  observe it: root without CAP_SYS_PTRACE reads a non-dumpable root process's environ all the same
  (checked by hand with prctl.set_dumpable(False)), so no rootful test here.
- Rootless, the hook needs no capability at all: supervisor and core have none (CapPrm/CapEff 0
  in the host user namespace), and the whole chain runs under no_new_privs (no setuid or file
  capability helper can be involved).

test_isolation.py covers the container's side (pid/mount/net namespaces, core and dialer not
readable by the rootless user); test_rootless.py the rootless state dir's modes.
"""

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.forwarding import capabilities, forwarding_of, status_field
from e2ekit.hookenv import HookEnv, oci_state, reap_leftovers
from e2ekit.measure import note
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, find_by_comm, supervisor_comm
from e2ekit.services import Services
from e2ekit.users import (
    fresh_test_user,
    process_uid,
)

WHO = 81
# Reads each path given, prints "PATH READ" or "PATH <exception> <errno>".
PROBE = ("import os, sys\n"
         "for p in sys.argv[1:]:\n"
         "    try:\n"
         "        (os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1)); print(p, 'READ')\n"
         "    except OSError as e:\n"
         "        print(p, e.__class__.__name__, e.errno)\n")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def probe(argv_prefix: list[str], paths: list[str]) -> dict[str, str]:
    r = subprocess.run([*argv_prefix, "/usr/bin/python3", "-c", PROBE, *paths],
                       capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert r.returncode == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


# --- modes ---------------------------------------------------------------------------------------

def test_state_dir_0700_files_0600_under_umask_0(containers, hook_env, port_alloc):
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    old = os.umask(0)       # the runtime, and so the hook, inherit it
    try:
        services.wait_ready(c.start())
    finally:
        os.umask(old)
    assert clients.whoami("127.0.0.1", port)[1] == WHO
    expected = {hook_env.state_dir: 0o700, hook_env.state_file(c.id): 0o600,
                hook_env.log_file(c.id): 0o600}
    found = {p: (_mode(p), os.lstat(p).st_uid) for p in expected}
    assert found == {p: (m, 0) for p, m in expected.items()}, found
    others = {p.name: oct(_mode(p)) for p in hook_env.state_dir.iterdir() if _mode(p) & 0o077}
    assert not others, f"files open to group/others in the state dir: {others}"



@pytest.fixture
def prestart(hook_env, tmp_path, netns_pid):
    """prestart with a real netns pid; poststop and a reap afterwards whatever happened."""
    ids = []

    def run(cid: str, ports: str) -> subprocess.CompletedProcess:
        ids.append(cid)
        raw = json.dumps({"ociVersion": "1.0.2-dev", "id": cid, "status": "creating",
                          "pid": netns_pid, "bundle": str(tmp_path),
                          "annotations": {"io.oci-portfwd.ports": ports}})
        return hook_env.run("prestart", stdin=raw, cwd=tmp_path)

    yield run
    for cid in ids:
        hook_env.run("poststop", stdin=oci_state(cid, "stopped", tmp_path), cwd=tmp_path)
    if reap_leftovers(hook_env):
        warnings.warn("killed leftover hook processes", stacklevel=2)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, f"exit {r.returncode} (2 is an internal error): {err[:600]}"
    assert "Traceback" not in err and len(err.rstrip("\n").split("\n")) == 1, err[:600]
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


def test_loose_existing_state_dir_is_tightened(prestart, hook_env, port_alloc):
    hook_env.state_dir.mkdir(mode=0o755)
    hook_env.state_dir.chmod(0o755)
    port = port_alloc.take()
    r = prestart("loose0", f"127.0.0.1:{port}:80")
    assert r.returncode == 0, r.stderr.decode()
    assert _mode(hook_env.state_dir) == 0o700, oct(_mode(hook_env.state_dir))


def test_state_dir_of_another_owner_is_refused(prestart, hook_env, port_alloc):
    hook_env.state_dir.mkdir(mode=0o700)
    os.chown(hook_env.state_dir, 65534, 65534)
    port = port_alloc.take()
    assert_refused(prestart("owner0", f"127.0.0.1:{port}:80"), str(hook_env.state_dir))
    assert port_is_free("127.0.0.1", port)
    assert os.listdir(hook_env.state_dir) == []


# --- symlinks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-dir", "dangling"])
def test_symlink_at_state_dir_is_refused(prestart, hook_env, tmp_path, port_alloc, dangling):
    target = tmp_path / "elsewhere"
    if not dangling:
        target.mkdir(mode=0o755)
    hook_env.state_dir.symlink_to(target)
    port = port_alloc.take()
    assert_refused(prestart("symdir0", f"127.0.0.1:{port}:80"), "symlink")
    assert port_is_free("127.0.0.1", port)
    assert hook_env.state_dir.is_symlink()
    if dangling:
        assert not target.exists(), "the hook created the symlink's target"
    else:
        assert os.listdir(target) == [] and _mode(target) == 0o755, "the hook wrote through the symlink"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file a symlink in the state dir points at: must stay exactly as it is."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    path.chmod(0o644)
    return path


def _intact(victim: Path) -> None:
    assert victim.read_text() == "precious\n" and _mode(victim) == 0o644, "the victim was touched"


@pytest.mark.parametrize("which", ["json", "log"])
def test_symlink_at_state_or_log_file_is_refused(prestart, hook_env, tmp_path, victim, port_alloc,
                                                 which):
    cid = f"symfile-{which}"
    hook_env.state_dir.mkdir(mode=0o700)
    link = hook_env.state_dir / f"{cid}.{which}"
    link.symlink_to(victim)
    port = port_alloc.take()
    r = prestart(cid, f"127.0.0.1:{port}:80")
    note("symlink-in-state-dir", which=which, exit=r.returncode, stderr=r.stderr.decode()[:300])
    assert_refused(r, "symlink")
    _intact(victim)
    assert link.is_symlink(), "the symlink was replaced"
    assert port_is_free("127.0.0.1", port)
    assert not find_by_comm(supervisor_comm(cid))


def test_poststop_does_not_follow_a_symlinked_state_file(hook_env, tmp_path, victim):
    hook_env.state_dir.mkdir(mode=0o700)
    link = hook_env.state_file("symstop0")
    link.symlink_to(victim)
    r = hook_env.run("poststop", stdin=oci_state("symstop0", "stopped", tmp_path), cwd=tmp_path)
    assert r.returncode != 2 and b"Traceback" not in r.stderr, r
    _intact(victim)


# --- another user's forwarding ---------------------------------------------------------------

@pytest.fixture(scope="module")
def other_user(test_user):
    """A second unprivileged user (a random name), made for this module and removed after it."""
    with fresh_test_user() as user:
        yield user


def attempt_as(user, hook: Path, workdir: Path, owner_hook: HookEnv, cid: str,
               procs: dict[str, Proc]) -> dict[str, object]:
    """Everything `user` can try against a forwarding that is not its own. `workdir` is a dir
    of `user`'s own. Returns what each attempt gave (the caller asserts)."""
    got: dict[str, object] = {}
    state_in = workdir / "state.json"
    state_in.write_text(oci_state(cid, "stopped", workdir))
    os.chown(state_in, user.uid, user.gid)

    def hook_as_user(config: dict, *args: str) -> subprocess.CompletedProcess:
        cfg = workdir / f"config-{uuid.uuid4().hex[:6]}.json"
        cfg.write_text(json.dumps(config))
        os.chown(cfg, user.uid, user.gid)
        with open(state_in, "rb") as stdin:
            return user.run(["env", f"OCI_PORTFWD_CONFIG={cfg}", str(hook), *args], stdin=stdin)

    # 1. poststop on the owner's state dir
    got["poststop-owner-dir"] = hook_as_user({"state_dir": str(owner_hook.state_dir)}, "poststop")
    got["ps-owner-dir"] = hook_as_user({"state_dir": str(owner_hook.state_dir)}, "ps")
    # 2. poststop on a forged state file of its own naming the owner's supervisor
    own_state = workdir / "state"
    own_state.mkdir(mode=0o700)
    os.chown(own_state, user.uid, user.gid)
    forged = own_state / f"{cid}.json"
    forged.write_text(owner_hook.state_file(cid).read_text())
    os.chown(forged, user.uid, user.gid)
    forged.chmod(0o600)
    got["poststop-forged"] = hook_as_user({"state_dir": str(own_state)}, "poststop")
    # 3. plain signals
    got["kill"] = {f"{sig} {name}": user.run(["kill", f"-{sig}", str(p.pid)])
                   for sig in ("TERM", "KILL") for name, p in procs.items()}
    # 4. /proc and the owner's files
    paths = [f"/proc/{p.pid}/{what}" for p in procs.values() for what in ("environ", "fd")]
    paths += [str(owner_hook.state_dir), str(owner_hook.state_file(cid)), str(owner_hook.log_file(cid))]
    got["reads"] = probe(user.prefix(), paths)
    return got


ASPECTS = ["untouched", "one-line-refusals"]


def check(aspect: str, got: dict, cid: str, procs: dict[str, Proc], owner_hook: HookEnv,
          port: int) -> None:
    """untouched: nothing stopped, nothing read. one-line-refusals: the hook refuses in one line,
    it does not crash (exit 2 is an internal error). Two test results, so that each says one
    thing."""
    if aspect == "one-line-refusals":
        for name in ("poststop-owner-dir", "poststop-forged", "ps-owner-dir"):
            r = got[name]
            err = r.stderr.decode(errors="replace")
            assert r.returncode != 2 and "Traceback" not in err, \
                f"{name}: exit {r.returncode}: {err[:500]}"
        return
    for sig, r in got["kill"].items():
        assert r.returncode != 0, f"kill -{sig} by another user succeeded"
    readable = {p: v for p, v in got["reads"].items() if v == "READ"}
    assert not readable, f"another user read {sorted(readable)}"
    for name, proc in procs.items():
        assert proc.alive(), f"the {name} (pid {proc.pid}) is gone"
    assert owner_hook.state_file(cid).exists(), "the owner's state file is gone"
    assert clients.whoami("127.0.0.1", port)[1] == WHO, "the forwarding stopped working"
    assert cid.encode() not in got["ps-owner-dir"].stdout, got["ps-owner-dir"]


@pytest.fixture
def open_parent():
    """A dir under /tmp that everyone may traverse (0755), for the owner's state dir: the only
    thing between another user and the owner's state and logs is then the hook's own 0700/0600
    (pytest's tmp dirs are not traversable by the users at all). Removed at the end."""
    made: list[Path] = []

    def make(owner_uid: int = 0, owner_gid: int = 0) -> Path:
        path = Path(tempfile.mkdtemp(prefix="oci-portfwd-sec-", dir="/tmp"))
        os.chown(path, owner_uid, owner_gid)
        path.chmod(0o755)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _use_state_dir(hook: HookEnv, state_dir: Path) -> None:
    hook.write_config({"state_dir": str(state_dir), "log_level": "debug"})
    hook.state_dir = state_dir


@pytest.mark.parametrize("aspect", ASPECTS)
def test_other_user_cannot_touch_a_root_forwarding(containers, hook_env, port_alloc, test_user,
                                                   hook_command, open_parent, aspect):
    _use_state_dir(hook_env, open_parent() / "state")
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    try:
        services.wait_ready(c.start())
        fw = forwarding_of(hook_env, c.id)
        got = attempt_as(test_user, hook_command, open_parent(test_user.uid, test_user.gid),
                         hook_env, c.id, fw.procs)
        note("other-user-vs-root", **{k: (v.returncode, v.stderr.decode()[:200])
                                      for k, v in got.items()
                                      if isinstance(v, subprocess.CompletedProcess)})
        note("rootful-capabilities", runtime=c.runtime.name,
             **{name: hex(capabilities(p.pid)["CapEff"]) for name, p in fw.procs.items()})
        check(aspect, got, c.id, fw.procs, hook_env, port)
    finally:
        c.stop()    # before open_parent removes the state dir


@pytest.mark.parametrize("aspect", ASPECTS)
def test_other_user_cannot_touch_a_rootless_forwarding(rootless_containers, rootless_hook_env,
                                                       port_alloc, test_user, other_user,
                                                       rootless_hook_command, open_parent, aspect):
    hook = rootless_hook_env
    _use_state_dir(hook, open_parent(test_user.uid, test_user.gid) / "state")
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = rootless_containers.new(services.argv(), hook=hook, ports=f"127.0.0.1:{port}:{WHO}")
    try:
        services.wait_ready(c.start())
        assert clients.whoami("127.0.0.1", port)[1] == WHO
        fw = forwarding_of(hook, c.id)
        assert process_uid(fw.supervisor.pid) == test_user.uid
        got = attempt_as(other_user, rootless_hook_command,
                         open_parent(other_user.uid, other_user.gid), hook, c.id, fw.procs)
        note("other-user-vs-rootless", runtime=c.runtime.name,
             **{k: (v.returncode, v.stderr.decode()[:200]) for k, v in got.items()
                if isinstance(v, subprocess.CompletedProcess)})
        # Not even the owner reads its supervisor's /proc: not dumpable (test_isolation checks
        # the core and the dialer so).
        reads = probe(test_user.prefix(), [f"/proc/{fw.supervisor.pid}/environ"])
        assert reads[f"/proc/{fw.supervisor.pid}/environ"] == "PermissionError 13", reads
        check(aspect, got, c.id, fw.procs, hook, port)
    finally:
        c.stop()


# --- capabilities --------------------------------------------------------------------------------

def _nnp_runtime(runtime, workdir: Path):
    """The same rootless runtime, run under setpriv --no-new-privs (runc only: the crun wrapper
    of this host needs root for its mount namespace)."""
    wrapper = workdir / "runc-nnp"
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --no-new-privs {runtime.binary} "$@"\n')
    wrapper.chmod(0o755)
    return dataclasses.replace(runtime, binary=str(wrapper), create_binary=str(wrapper))


def test_rootless_forwarding_needs_no_capabilities(rootless_containers, rootless_hook_env,
                                                   port_alloc, test_user, user_tmp):
    hook = rootless_hook_env
    if rootless_containers.runtime.name == "runc":
        rootless_containers.runtime = _nnp_runtime(rootless_containers.runtime, user_tmp)
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = rootless_containers.new(services.argv(), hook=hook, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    assert clients.whoami("127.0.0.1", port)[1] == WHO
    fw = forwarding_of(hook, c.id)
    caps = {name: capabilities(p.pid) for name, p in fw.procs.items()}
    nnp = status_field(fw.supervisor.pid, "NoNewPrivs")
    note("rootless-capabilities", runtime=c.runtime.name, no_new_privs=nnp,
         **{name: {k: hex(v) for k, v in cs.items()} for name, cs in caps.items()})
    for name in ("supervisor", "core"):
        assert process_uid(fw.procs[name].pid) == test_user.uid
        assert caps[name]["CapPrm"] == 0 and caps[name]["CapEff"] == 0, (name, caps[name])
        assert caps[name]["CapAmb"] == 0 and caps[name]["CapInh"] == 0, (name, caps[name])
    # The dialer has capabilities only inside the container's user namespace.
    assert os.readlink(f"/proc/{fw.dialer.pid}/ns/user") == os.readlink(f"/proc/{c.pid}/ns/user")
    assert os.readlink(f"/proc/{fw.dialer.pid}/ns/user") != os.readlink("/proc/self/ns/user")
    if c.runtime.name == "runc":
        assert nnp == "1", "the runc run was not under no_new_privs"
    stopped = c.stop()
    assert stopped is not None and stopped.ok, stopped
    assert port_is_free("127.0.0.1", port)
    assert not fw.supervisor.alive()
