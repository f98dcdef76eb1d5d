"""Podman 4.3.1 with the packaged hooks.d file, rootful and rootless: the ports annotation turns
the forwarding on, a container without it runs no hook, and `podman stop` / `podman rm` free the
ports and end the supervisor (podman runs poststop itself, in `podman container cleanup`).

A busybox image made by `podman import` (no registry), `--runtime runc` (crun hits the hybrid
cgroup problem), `--network none` (/dev/net/tun is 0600 here, so rootless podman's default
network cannot start).
"""

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.forwarding import status_field
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.podman import (
    Podman,
    PodmanContainer,
    PodmanStore,
    build_image_tar,
    hooks_file,
    remove_private_storage,
)
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, descendants, find_by_comm, supervisor_comm
from e2ekit.services import Services
from e2ekit.users import has_subids, process_uid
from e2ekit.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
PACKAGED_HOOKS_FILE = REPO / "packaging" / "hooks.d" / "oci-portfwd-hook.json"
MODES = ["rootful", "rootless"]
# podman runs poststop from `podman container cleanup`, which conmon starts when the container
# exits: give it a moment after `podman stop`/`rm` return.
GONE_TIMEOUT = 5


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (make deps installs them)")


@pytest.fixture(scope="module")
def podman_store(request, e2e_host, tmp_path_factory):
    """One podman per mode for the module, with the busybox image imported; removed after."""
    _need("podman", "tar", "chroot")
    if not PACKAGED_HOOKS_FILE.exists():
        pytest.fail(f"{PACKAGED_HOOKS_FILE} is missing")
    if request.param == "rootless":
        _need("newuidmap", "newgidmap")
        user = request.getfixturevalue("test_user")
        if not has_subids(user):
            pytest.skip(f"{user.name} has no range in /etc/subuid and /etc/subgid "
                        "(rootless podman needs them)")
        request.getfixturevalue("rootless_hook_command")
        workdir = user.make_dir(request.getfixturevalue("user_area") / "podman")
        store = PodmanStore(user, workdir)
    else:
        # Not under pytest's tmp dir: podman refuses a runroot longer than 50 characters.
        store = PodmanStore(None, Path(tempfile.mkdtemp(prefix="pfpm-", dir="/tmp")))
    try:
        tar = build_image_tar(tmp_path_factory.mktemp(f"podman-image-{request.param}"))
        if store.rootless:
            tar = Path(shutil.copy(tar, store.workdir / "busybox.tar"))
            store.user.give(tar)
        store.import_image(tar)
        yield store
    finally:
        store.remove_image()
        if store.rootless:
            # Rootless podman leaves its user namespace's holder running: end it, by pid, once
            # the cleanups that conmon started are done (they need it).
            pause = store.user.pause_processes()
            store.user.wait_quiet(10, keep=pause)
            for proc in pause:
                proc.kill()
        else:
            # Not `podman system reset`: it would also remove the host's networks
            # (/etc/containers/networks is not part of --root).
            remove_private_storage(store.workdir)


@pytest.fixture
def podman(podman_store, hook_command, tmp_path):
    """This test's hooks dir (the packaged file, pointed at the venv's hook, with an env naming
    this test's config and state dir) and the containers it runs, all removed after."""
    if podman_store.rootless:
        work = podman_store.user.make_dir(podman_store.workdir / f"t-{uuid.uuid4().hex[:8]}")
        hook = HookEnv(hook_command, podman_store.user.make_dir(work / "hook"))
    else:
        work = tmp_path
        hook = HookEnv(hook_command, work / "hook")
    hooks_dir = work / "hooks.d"
    hooks_dir.mkdir(mode=0o755)
    doc = hooks_file(PACKAGED_HOOKS_FILE, hook_command, hook.env)
    (hooks_dir / PACKAGED_HOOKS_FILE.name).write_text(json.dumps(doc, indent=2))
    runner = Podman(podman_store, hooks_dir, hook)
    yield runner
    runner.cleanup()
    reap_leftovers(hook)


def _serving(c: PodmanContainer) -> None:
    Services().http(80).wait_ready(c.pid)


def _forwarding_of(podman: Podman, c: PodmanContainer) -> list[Proc]:
    state = podman.hook.state_file(c.id)
    assert state.exists(), f"no state file {state}: the hook did not run\n{podman.hook.log_text(c.id)}"
    sup = Proc.of(int(podman.hook.read_state(c.id)["supervisor_pid"]))
    assert sup is not None and sup.alive(), "the supervisor from the state file is not running"
    assert sup.comm() == supervisor_comm(c.id)
    return [sup, *descendants(sup.pid)]


def _assert_all_gone(procs: list[Proc], binds: list[tuple], state: Path) -> None:
    def leftovers() -> list:
        return ([p.pid for p in procs if p.alive()] + [b for b in binds if not port_is_free(*b)]
                + ([str(state)] if state.exists() else []))

    wait_until(lambda: not leftovers(), GONE_TIMEOUT, lambda: f"pids/ports/files {leftovers()} to go")


def _binds(port: int) -> list[tuple]:
    return [("0.0.0.0", port, "tcp"), ("::", port, "tcp")]


@pytest.mark.parametrize("podman_store", MODES, indirect=True)
def test_annotation_publishes_and_rm_frees(podman, port_alloc):
    port = port_alloc.take()
    c = podman.start(f"{port}:80")
    _serving(c)
    for host in ("127.0.0.1", "::1"):
        clients.assert_http_ok(host, port)
    procs = _forwarding_of(podman, c)
    if podman.store.rootless:
        owners = {p.pid: process_uid(p.pid) for p in procs}
        assert set(owners.values()) == {podman.store.user.uid}, owners
    # Least privilege under podman too (test_privileges.py has the whole table): rootless, the
    # hook is uid 0 of podman's user namespace, and the core still ends with nothing.
    core = next(p for p in procs if p.comm() == "portfwd-core")
    sandboxed = {k: status_field(core.pid, k) for k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp")}
    assert sandboxed == {"CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1", "Seccomp": "2"}
    r = podman.exec(c, "ps", "-o", "pid,comm")
    assert r.ok and "portfwd" not in r.stdout, f"forwarding visible in the container: {r}"

    r = podman.rm(c, force=True)
    assert r.ok, r
    _assert_all_gone(procs, _binds(port), podman.hook.state_file(c.id))


@pytest.mark.parametrize("podman_store", MODES, indirect=True)
def test_stop_frees_ports_then_rm(podman, port_alloc):
    port = port_alloc.take()
    c = podman.start(f"127.0.0.1:{port}:80,[::1]:{port}:80")
    _serving(c)
    clients.assert_http_ok("::1", port)
    procs = _forwarding_of(podman, c)
    binds = [("127.0.0.1", port, "tcp"), ("::1", port, "tcp")]

    r = podman.stop(c)
    assert r.ok, r
    _assert_all_gone(procs, binds, podman.hook.state_file(c.id))
    r = podman.rm(c)
    assert r.ok, r
    assert all(port_is_free(*b) for b in binds)
    assert not find_by_comm(supervisor_comm(c.id))


@pytest.mark.parametrize("podman_store", MODES, indirect=True)
def test_no_annotation_runs_no_hook(podman):
    c = podman.start(None)
    _serving(c)
    state_dir = podman.hook.state_dir
    files = sorted(p.name for p in state_dir.iterdir()) if state_dir.exists() else []
    assert not files, f"the hook ran for a container without the annotation: {files}"
    assert not find_by_comm(supervisor_comm(c.id))
    assert podman.rm(c, force=True).ok


@pytest.mark.parametrize("podman_store", ["rootless"], indirect=True)
def test_rootless_state_goes_to_the_users_runtime_dir(podman, port_alloc):
    # No state_dir in the config and no XDG_RUNTIME_DIR in the hook's env: the hook, uid 0 in
    # podman's user namespace, must still find the real user's /run/user/UID.
    user = podman.store.user
    podman.hook.write_config({"log_level": "debug"})
    podman.hook.state_dir = user.runtime_dir / "oci-portfwd"
    port = port_alloc.take()
    c = podman.start(f"127.0.0.1:{port}:80")
    _serving(c)
    clients.assert_http_ok("127.0.0.1", port)
    procs = _forwarding_of(podman, c)
    state = podman.hook.state_file(c.id)
    for path, mode in ((state.parent, 0o700), (state, 0o600)):
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, mode), \
            f"{path}: uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):o}"
    assert podman.rm(c, force=True).ok
    _assert_all_gone(procs, [("127.0.0.1", port, "tcp")], state)
