"""Podman 4.3.1 with the packaged hooks.d file, rootful and rootless: the ports annotation turns
the forwarding on, a container without it runs no hook, and `podman stop` / `podman rm` free the
ports and end the supervisor (podman runs poststop itself, in `podman container cleanup`). The
hooks dir comes from `--hooks-dir` or, as the README tells users, from containers.conf's
`hooks_dir`; several ports go in one `--annotation`, separated by spaces or (CSV-quoted) commas.

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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.forwarding import status_field
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.podman import (
    ANNOTATION,
    HTTPD,
    Podman,
    PodmanContainer,
    PodmanStore,
    annotation_arg,
    build_image_tar,
    containers_conf_text,
    hooks_file,
    remove_private_storage,
)
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, find_by_comm, forwarding_procs, supervisor_comm
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
    return forwarding_procs(sup)


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
    # podman's name (from containers/storage's containers.json: podman 4 puts no name in the
    # annotations), recorded at start and shown by `ps`.
    assert podman.hook.read_state(c.id).get("name") == c.name
    listing = podman.hook.run("ps").stdout.decode()
    assert any(r.startswith(c.id[:12] + " ") and f" {c.name} " in r for r in listing.splitlines()), listing
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


# Two busybox httpd: the first daemonizes once it listens on 81, the second is the container's init.
TWO_HTTPD = ["sh", "-c", "httpd -p 81 -h /www && exec httpd -f -p 80 -h /www"]


@pytest.mark.parametrize("podman_store, layout", [
    pytest.param("rootful", "{} {} {}", id="rootful-spaces"),
    pytest.param("rootless", "{} {} {}", id="rootless-spaces"),
    pytest.param("rootful", "{},{},{}", id="rootful-commas"),
    pytest.param("rootless", "{},{},{}", id="rootless-commas"),
    pytest.param("rootful", "{}, {}\t{}", id="rootful-mixed"),
], indirect=["podman_store"])
def test_several_ports_in_one_annotation(podman, port_alloc, layout):
    # podman splits --annotation values at commas: spaces need no quoting, commas need
    # podman's CSV quoting (annotation_arg), both reach the hook as one value.
    p1, p2, p3 = port_alloc.take(), port_alloc.take(), port_alloc.take()
    specs = [f"{p1}:80", f"{p2}:81", f"127.0.0.1:{p3}:80"]
    value = layout.format(*specs)
    if "," not in value:
        assert annotation_arg(ANNOTATION, value) == f"{ANNOTATION}={value}"
    c = podman.start(value, command=TWO_HTTPD)
    Services().http(80).http(81).wait_ready(c.pid)
    state = podman.hook.read_state(c.id) if podman.hook.state_file(c.id).exists() else {}
    assert sorted(state.get("ports", ())) == sorted(f"{s}/tcp" for s in specs), \
        f"the hook's ports for {value!r}: {state}\n{podman.hook.log_text(c.id)}"
    for host, port in (("127.0.0.1", p1), ("::1", p1), ("127.0.0.1", p2), ("::1", p2),
                       ("127.0.0.1", p3)):
        clients.assert_http_ok(host, port)
    procs = _forwarding_of(podman, c)
    assert podman.rm(c, force=True).ok
    _assert_all_gone(procs, [*_binds(p1), *_binds(p2), ("127.0.0.1", p3, "tcp")],
                     podman.hook.state_file(c.id))


@pytest.mark.parametrize("podman_store", ["rootful"], indirect=True)
def test_podman_refuses_unquoted_commas(podman, port_alloc):
    # What the README says happens to `--annotation io.oci-portfwd.ports=A,B`, and why spaces
    # (or CSV quoting) are the way to write several ports with podman.
    p1, p2 = port_alloc.take(), port_alloc.take()
    name = f"pf-{uuid.uuid4().hex[:10]}"
    r = podman.run("run", "-d", "--name", name, "--network", "none", "--pull", "never",
                   "--annotation", f"{ANNOTATION}={p1}:80,{p2}:80", podman.store.image, *HTTPD)
    podman.run("rm", "-f", "-t", "0", "--ignore", name)
    assert not r.ok and "annotations must be formatted KEY=VALUE" in r.stderr, r


USER_CONF = Path(".config") / "containers" / "containers.conf"


@contextmanager
def _users_containers_conf(user, text: str):
    """~/.config/containers/containers.conf of the test user, removed again with the dirs
    made for it."""
    conf = user.home / USER_CONF
    if conf.exists():
        pytest.skip(f"{conf} exists already: not replacing the user's own file")
    made = [d for d in (conf.parent.parent, conf.parent) if not d.exists()]
    try:
        for d in made:
            user.make_dir(d, 0o755)
        conf.write_text(text)
        user.give(conf)
        yield conf
    finally:
        conf.unlink(missing_ok=True)
        for d in reversed(made):
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("podman_store, where", [
    pytest.param("rootful", "CONTAINERS_CONF", id="rootful-CONTAINERS_CONF"),
    pytest.param("rootless", "CONTAINERS_CONF", id="rootless-CONTAINERS_CONF"),
    pytest.param("rootless", "user", id="rootless-user-containers.conf"),
], indirect=["podman_store"])
def test_hooks_dir_from_containers_conf(podman, port_alloc, where):
    # No --hooks-dir (nor --ulimit): containers.conf's hooks_dir names the test's hooks dir,
    # whose file points at the venv's hook with this test's config (hence its state dir). It
    # comes after a dir standing for the packaged one, whose file of the same name would fail
    # every start: the later dir's file must mask it, as the README says.
    store = podman.store
    packaged = podman.hooks_dir.parent / "packaged-hooks.d"
    packaged.mkdir(mode=0o755)
    doc = json.loads((podman.hooks_dir / PACKAGED_HOOKS_FILE.name).read_text())
    doc["hook"] = {"path": "/bin/false", "args": ["false"]}
    (packaged / PACKAGED_HOOKS_FILE.name).write_text(json.dumps(doc))
    if store.rootless:
        store.user.give(packaged)
    text = containers_conf_text([packaged, podman.hooks_dir], rootful=not store.rootless)
    with ExitStack() as stack:
        if where == "CONTAINERS_CONF":
            # The only containers.conf podman reads then: it carries the ulimits too.
            conf = podman.hooks_dir.parent / "containers.conf"
            conf.write_text(text)
            if store.rootless:
                store.user.give(conf)
            podman.use_containers_conf(conf)
        else:
            stack.enter_context(_users_containers_conf(store.user, text))
            podman.use_containers_conf(None)
        # Containers go before the file that registered their hooks.
        stack.callback(podman.cleanup)
        port = port_alloc.take()
        c = podman.start(f"{port}:80")
        _serving(c)
        procs = _forwarding_of(podman, c)
        for host in ("127.0.0.1", "::1"):
            clients.assert_http_ok(host, port)
        r = podman.rm(c, force=True)
        assert r.ok, r
        _assert_all_gone(procs, _binds(port), podman.hook.state_file(c.id))
@pytest.mark.parametrize("driver", ["builtin", "slirp4netns"])
@pytest.mark.parametrize("podman_store", MODES, indirect=True)
def test_network_host_is_not_forwarded(podman, port_alloc, driver):
    """`podman run --network host` with the annotation: one warning, nothing bound or started,
    and the container's own httpd keeps its port (P:P) and serves."""
    if driver == "slirp4netns":
        _need("slirp4netns")
    own, other = port_alloc.take(), port_alloc.take()
    c = podman.start(f"127.0.0.1:{own}:{own},{other}:80",
                     command=["httpd", "-f", "-p", f"127.0.0.1:{own}", "-h", "/www"],
                     network="host", annotations={"io.oci-portfwd.driver": driver})
    wait_until(lambda: clients.curl("127.0.0.1", own).returncode == 0, 10,
               f"the container's httpd on 127.0.0.1:{own}")
    clients.assert_http_ok("127.0.0.1", own)
    log = podman.hook.log_text(c.id)
    assert log.count("uses the host's network") == 1 and "not published" in log, log
    assert not podman.hook.state_file(c.id).exists()
    assert not find_by_comm(supervisor_comm(c.id))
    assert all(port_is_free(*b) for b in _binds(other))
    r = podman.run("inspect", "-f", "{{.State.Running}}", c.name)
    assert r.stdout.strip() == "true", r
    assert podman.rm(c, force=True).ok
