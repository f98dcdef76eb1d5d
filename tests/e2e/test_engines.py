"""oci-portfwd-runtime under real engines: Debian's dockerd 20.10 (`--add-runtime portfwd=…`,
`docker run --runtime portfwd -e OCI_PORTFWD_PORTS=…`, Docker 20.10 passes no annotations) and
containerd 1.6 (`ctr run --runc-binary … --annotation io.oci-portfwd.ports=…`, through the
containerd that dockerd started).

One dockerd for the module (its own data/exec root, socket, no iptables, no bridge), with
OCI_PORTFWD_CONFIG in its environment naming this module's hook config: containerd, the shim,
the wrapper and the hook all inherit it. The image is `docker import` of the e2e rootfs; the
containers get the host's /usr read-only (busybox, python3 and servers.py's services) and
`--network none`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
from e2ekit import clients
from e2ekit.docker import CTR, DOCKER, DOCKERD, DockerDaemon, DockerError, import_rootfs, wait_gone
from e2ekit.hookenv import HookEnv, reap_leftovers
from e2ekit.ports import port_is_free
from e2ekit.procs import Proc, descendants, find_by_comm, forwarding_procs, supervisor_comm
from e2ekit.services import Services
from e2ekit.tools import need_tools
from e2ekit.users import USER_PATH, has_subids
from e2ekit.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / ".venv" / "bin" / "oci-portfwd-runtime"
IMAGE = "oci-portfwd-e2e:1"
USR = ["-v", "/usr:/usr:ro"]
# servers.py, the containers' init, ignores SIGTERM (pid 1): stop quickly.
STOP = ["--stop-timeout", "1"]
GONE_TIMEOUT = 10


@pytest.fixture(scope="module")
def engine_hook(hook_command, tmp_path_factory) -> HookEnv:
    return HookEnv(hook_command, tmp_path_factory.mktemp("engine-hook"))


@pytest.fixture(scope="module")
def dockerd(e2e_host, engine_hook, rootfs):
    missing = [p for p in (DOCKERD, DOCKER, CTR) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"Debian's docker.io (dockerd 20.10, containerd 1.6) is not installed: "
                    f"missing {', '.join(missing)} (make deps installs it)")
    need_tools("tar", "curl")
    if not os.access(WRAPPER, os.X_OK):
        pytest.fail(f"{WRAPPER} is missing: run `make venv`")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OCI_PORTFWD_CONFIG": str(engine_hook.config_path)}
    daemon = DockerDaemon(WRAPPER, env)
    try:
        daemon.start()
        import_rootfs(daemon, rootfs, IMAGE)
        yield daemon
    finally:
        notes = daemon.stop()
        killed = reap_leftovers(engine_hook)
        for note in notes + ([f"supervisors left behind: {killed}"] if killed else []):
            warnings.warn(note, stacklevel=1)


class Docker:
    """The containers of one test (all removed after it) and what the hook made for them."""

    def __init__(self, daemon: DockerDaemon, hook: HookEnv) -> None:
        self.daemon = daemon
        self.hook = hook
        self.names: list[str] = []

    def run(self, name: str, ports: str | None, services: Services, *extra: str):
        self.names.append(name)
        env = ["-e", f"OCI_PORTFWD_PORTS={ports}"] if ports is not None else []
        return self.daemon.docker("run", "-d", "--name", name, "--runtime", "portfwd",
                                  "--network", "none", *USR, *STOP, *env, *extra, IMAGE,
                                  *services.argv())

    def start(self, name: str, ports: str | None, services: Services, *extra: str) -> str:
        r = self.run(name, ports, services, *extra)
        if not r.ok:
            raise DockerError(f"docker run failed: {r}\n{self.daemon.log_tail()}")
        cid = r.stdout.strip().splitlines()[-1]
        services.wait_ready(self.daemon.pid_of(name))
        return cid

    def forwarding(self, cid: str) -> list[Proc]:
        """The container's supervisor (from the hook's state file) and its descendants."""
        state = self.hook.state_file(cid)
        assert state.exists(), f"no state file {state}: the hook did not run\n{self.hook.log_text(cid)}"
        sup = Proc.of(int(self.hook.read_state(cid)["supervisor_pid"]))
        assert sup is not None and sup.alive(), "the supervisor of the state file is not running"
        assert sup.comm() == supervisor_comm(cid)
        return forwarding_procs(sup)

    def cleanup(self) -> None:
        if self.names and self.daemon.proc is not None:
            self.daemon.docker("rm", "-f", *self.names)


@pytest.fixture
def docker(dockerd, engine_hook):
    d = Docker(dockerd, engine_hook)
    yield d
    d.cleanup()


def assert_all_gone(procs: list[Proc], binds: list[tuple], state: Path) -> None:
    def leftovers() -> list:
        return ([p.pid for p in procs if p.alive()] + [b for b in binds if not port_is_free(*b)]
                + ([str(state)] if state.exists() else []))

    wait_until(lambda: not leftovers(), GONE_TIMEOUT, lambda: f"pids/ports/files {leftovers()} to go")


def seed_case(port_alloc):
    """The seeds' cases in one container: 127.0.0.2, [::1] to an IPv4-only service, UDP."""
    base = port_alloc.take(3)
    http, v4only, udp = base, base + 1, base + 2
    services = Services().http(80).http(8080, ipv4_only=True).udp_echo(5353)
    ports = f"127.0.0.2:{http}:80,[::1]:{v4only}:8080,{udp}:5353/udp"
    binds = [("127.0.0.2", http, "tcp"), ("::1", v4only, "tcp"), ("0.0.0.0", udp, "udp"), ("::", udp, "udp")]

    def check() -> None:
        clients.assert_http_ok("127.0.0.2", http)
        clients.assert_http_ok("::1", v4only)  # the service listens on IPv4 only
        for host in ("127.0.0.1", "::1"):
            assert clients.udp_echo(host, udp, b"ping " + host.encode()) == b"ping " + host.encode()

    return services, ports, binds, check


# --- dockerd -----------------------------------------------------------------------------------

def test_docker_seed_cases_stop_start_restart_rm(docker, port_alloc):
    services, ports, binds, check = seed_case(port_alloc)
    cid = docker.start("seeds", ports, services)
    check()
    procs = docker.forwarding(cid)
    r = docker.daemon.docker("exec", "seeds", "/bin/sh", "-c", "exit 3")  # runc exec, passed through
    assert r.returncode == 3, r
    state = docker.hook.state_file(cid)

    assert docker.daemon.docker("stop", "seeds").ok
    assert_all_gone(procs, binds, state)

    assert docker.daemon.docker("start", "seeds").ok
    services.wait_ready(docker.daemon.pid_of("seeds"))
    check()
    procs = docker.forwarding(cid)

    assert docker.daemon.docker("restart", "seeds").ok
    services.wait_ready(docker.daemon.pid_of("seeds"))
    check()
    wait_gone(procs)  # the forwarding of the first run ended with it
    procs = docker.forwarding(cid)
    container = Proc.of(docker.daemon.pid_of("seeds"))
    assert container is not None

    assert docker.daemon.docker("rm", "-f", "seeds").ok
    assert_all_gone([*procs, container], binds, state)
    assert not find_by_comm(supervisor_comm(cid))


def test_docker_container_without_ports_is_untouched(docker):
    services = Services().http(80)
    cid = docker.start("noports", None, services)
    spec = (docker.daemon.bundle(cid) / "config.json").read_text()
    assert "oci-portfwd" not in spec, "the wrapper rewrote the spec of a container without ports"
    hooks = json.loads(spec).get("hooks", {})
    assert [h["args"][0] for h in hooks.get("prestart", [])] == ["libnetwork-setkey"]
    assert "annotations" not in json.loads(spec)  # Docker 20.10 writes none
    assert not docker.hook.state_file(cid).exists()
    assert docker.daemon.docker("rm", "-f", "noports").ok


def test_docker_bad_spec_fails_the_run_and_says_why(docker):
    r = docker.run("badspec", "99999:80", Services().http(80))
    assert not r.ok
    line = "oci-portfwd-runtime: port spec '99999:80': host port 99999 is outside 1-65535"
    assert line in r.stderr, r.stderr
    assert docker.daemon.status_of("badspec") == "created"
    cid = docker.daemon.must("inspect", "-f", "{{.Id}}", "badspec").stdout.strip()
    assert not docker.hook.state_file(cid).exists()


def test_docker_shows_the_hooks_own_error(docker, port_alloc):
    """What only the hook can find (the host port is taken) reaches docker through runc."""
    port = port_alloc.take()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        r = docker.run("taken", f"127.0.0.1:{port}:80,[::1]:{port}:80", Services().http(80))
    assert not r.ok
    assert f"oci-portfwd-hook: prestart: cannot bind 127.0.0.1:{port}/tcp" in r.stderr, r.stderr
    cid = docker.daemon.must("inspect", "-f", "{{.Id}}", "taken").stdout.strip()
    assert_all_gone([], [("127.0.0.1", port, "tcp"), ("::1", port, "tcp")], docker.hook.state_file(cid))
    assert not find_by_comm(supervisor_comm(cid))


def test_dockerd_killed_and_restarted(docker, port_alloc):
    """dockerd dies (SIGKILL, its containerd with it) while two forwarded containers run; the
    shims keep them and the supervisors keep forwarding. Started again without live-restore,
    dockerd stops every container it finds running: the plain one stays exited with its ports
    freed and its forwarding gone; the one with --restart always comes back, forwarded again."""
    plain_port, always_port = port_alloc.take(), port_alloc.take()
    services = Services().http(80)
    plain = docker.start("plain", f"{plain_port}:80", services)
    always = docker.start("always", f"{always_port}:80", services, "--restart", "always")
    plain_procs, always_procs = docker.forwarding(plain), docker.forwarding(always)
    containers = [Proc.of(docker.daemon.pid_of(n)) for n in ("plain", "always")]

    docker.daemon.kill()
    for port in (plain_port, always_port):
        for host in ("127.0.0.1", "::1"):
            clients.assert_http_ok(host, port)  # served with no dockerd and no containerd
    assert all(p.alive() for p in [*plain_procs, *always_procs])

    docker.daemon.start()
    assert_all_gone([*plain_procs, containers[0]], [("0.0.0.0", plain_port, "tcp"), ("::", plain_port, "tcp")],
                    docker.hook.state_file(plain))
    assert docker.daemon.status_of("plain") == "exited"
    wait_gone([*always_procs, containers[1]], GONE_TIMEOUT)
    wait_until(lambda: docker.daemon.status_of("always") == "running", GONE_TIMEOUT, "'always' to run again")
    services.wait_ready(docker.daemon.pid_of("always"))
    for host in ("127.0.0.1", "::1"):
        clients.assert_http_ok(host, always_port)
    new_procs = docker.forwarding(always)

    assert docker.daemon.docker("rm", "-f", "plain", "always").ok
    assert_all_gone(new_procs, [("0.0.0.0", always_port, "tcp"), ("::", always_port, "tcp")],
                    docker.hook.state_file(always))
    assert not docker.daemon.docker("ps", "-aq").stdout.split()


# --- containerd (ctr) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctr_image(dockerd, tmp_path_factory):
    tar = tmp_path_factory.mktemp("ctr-image") / "image.tar"
    dockerd.must("save", "-o", str(tar), IMAGE)
    r = dockerd.ctr("images", "import", str(tar))
    if not r.ok:
        raise DockerError(f"ctr images import failed: {r}")
    names = dockerd.ctr("images", "ls", "-q").stdout.split()
    name = next((n for n in names if n.endswith(IMAGE)), None)
    assert name, f"ctr imported {names}, none is {IMAGE}"
    return name


class Ctr:
    def __init__(self, daemon: DockerDaemon, image: str) -> None:
        self.daemon = daemon
        self.image = image
        self.ids: list[str] = []

    def run(self, cid: str, services: Services, *extra: str):
        self.ids.append(cid)
        return self.daemon.ctr("run", "-d", "--runc-binary", str(WRAPPER),
                               "--mount", "type=bind,src=/usr,dst=/usr,options=rbind:ro",
                               *extra, self.image, cid, *services.argv())

    def pid(self, cid: str) -> int:
        for line in self.daemon.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid and fields[2] == "RUNNING":
                return int(fields[1])
        raise DockerError(f"no running task {cid}: {self.daemon.ctr('tasks', 'ls')}")

    def stop(self, cid: str) -> None:
        self.daemon.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        wait_until(lambda: "STOPPED" in self.daemon.ctr("tasks", "ls").stdout, GONE_TIMEOUT, f"task {cid} to stop")
        r = self.daemon.ctr("tasks", "delete", cid)
        assert r.ok, r

    def cleanup(self) -> None:
        for cid in self.ids:
            self.daemon.ctr("tasks", "kill", "-s", "SIGKILL", cid)
            self.daemon.ctr("tasks", "delete", "-f", cid)
            self.daemon.ctr("containers", "rm", cid)


@pytest.fixture
def ctr(dockerd, ctr_image):
    c = Ctr(dockerd, ctr_image)
    yield c
    c.cleanup()


def test_ctr_annotation_seed_cases_and_task_lifecycle(ctr, engine_hook, port_alloc):
    services, ports, binds, check = seed_case(port_alloc)
    r = ctr.run("ctr-seeds", services, "--annotation", f"io.oci-portfwd.ports={ports}")
    assert r.ok, r
    services.wait_ready(ctr.pid("ctr-seeds"))
    check()
    procs = Docker(ctr.daemon, engine_hook).forwarding("ctr-seeds")
    container = Proc.of(ctr.pid("ctr-seeds"))
    ctr.stop("ctr-seeds")  # kill, then delete: runc's poststop
    assert_all_gone([*procs, container], binds, engine_hook.state_file("ctr-seeds"))

    r = ctr.daemon.ctr("tasks", "start", "-d", "ctr-seeds")  # a new task of the same container
    assert r.ok, r
    services.wait_ready(ctr.pid("ctr-seeds"))
    check()
    procs = Docker(ctr.daemon, engine_hook).forwarding("ctr-seeds")
    ctr.stop("ctr-seeds")
    assert_all_gone(procs, binds, engine_hook.state_file("ctr-seeds"))
    assert ctr.daemon.ctr("containers", "rm", "ctr-seeds").ok


def test_ctr_env_request_and_bad_spec(ctr, engine_hook, port_alloc):
    port = port_alloc.take()
    services = Services().http(80)
    r = ctr.run("ctr-env", services, "--env", f"OCI_PORTFWD_PORTS=127.0.0.1:{port}:80")
    assert r.ok, r
    services.wait_ready(ctr.pid("ctr-env"))
    clients.assert_http_ok("127.0.0.1", port)
    procs = Docker(ctr.daemon, engine_hook).forwarding("ctr-env")
    ctr.stop("ctr-env")
    assert_all_gone(procs, [("127.0.0.1", port, "tcp")], engine_hook.state_file("ctr-env"))

    r = ctr.run("ctr-bad", services, "--annotation", "io.oci-portfwd.ports=8080:80/sctp")
    assert not r.ok
    assert "oci-portfwd-runtime: port spec '8080:80/sctp': unknown protocol 'sctp'" in r.stderr, r.stderr
    assert not engine_hook.state_file("ctr-bad").exists()


def test_nothing_left_behind(dockerd, engine_hook):
    """After every container of the module is gone: no shim, no supervisor, no state file."""
    for cid in dockerd.docker("ps", "-aq", "--no-trunc").stdout.split():
        dockerd.docker("rm", "-f", cid)
    wait_until(lambda: not dockerd.shims(), GONE_TIMEOUT, "the shims to end")
    wait_until(lambda: not list(engine_hook.state_dir.glob("*.json")), GONE_TIMEOUT, "the state files to go")
    assert not reap_leftovers(engine_hook)


# --- rootless Docker (dockerd-rootless.sh: rootlesskit) ------------------------------------------

ROOTLESS_SCRIPT = Path("/usr/share/docker.io/contrib/dockerd-rootless.sh")
TUN = Path("/dev/net/tun")


@pytest.fixture
def rootless_dockerd(e2e_host, test_user, user_tmp, user_rootfs, rootless_hook_command):
    """Debian's dockerd-rootless.sh as the test user: dockerd and its containerd in
    rootlesskit's user and network namespaces (slirp4netns, which needs /dev/net/tun: opened
    to the user for this test only, its mode restored after)."""
    if not ROOTLESS_SCRIPT.exists():
        pytest.skip(f"{ROOTLESS_SCRIPT} is missing (package docker.io)")
    need_tools("rootlesskit", "slirp4netns", "newuidmap", "newgidmap", "tar")
    if not has_subids(test_user):
        pytest.skip(f"{test_user.name} has no range in /etc/subuid and /etc/subgid")
    hook = HookEnv(rootless_hook_command, test_user.make_dir(user_tmp / "hook"))
    # Short: containerd's socket under the exec root must fit a unix socket path (108 bytes).
    work = test_user.make_dir(Path(tempfile.mkdtemp(prefix="pfrl-", dir="/tmp")))
    sock = work / "docker.sock"
    env = [*test_user.env(), f"PATH=/usr/share/docker.io/contrib:{USER_PATH}",
           f"OCI_PORTFWD_CONFIG={hook.config_path}"]
    argv = ["runuser", "-u", test_user.name, "--", "env", "-i", *env, str(ROOTLESS_SCRIPT),
            "--data-root", str(work / "data"), "--exec-root", str(work / "exec"),
            "-H", f"unix://{sock}", "--pidfile", str(work / "docker.pid"),
            "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false",
            "--add-runtime", f"portfwd={WRAPPER}"]
    tun_mode = TUN.stat().st_mode & 0o7777
    log = open(user_tmp / "dockerd.log", "wb")
    proc = None
    try:
        TUN.chmod(0o666)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)

        def docker(*args: str, stdin=None) -> subprocess.CompletedProcess:
            return test_user.run([DOCKER, "-H", f"unix://{sock}", *args], timeout=90,
                                 **({"stdin": stdin} if stdin is not None else {}))

        def up() -> bool:
            if proc.poll() is not None:
                raise DockerError(f"dockerd-rootless.sh exited ({proc.returncode}): "
                                  f"{(user_tmp / 'dockerd.log').read_text(errors='replace')[-3000:]}")
            return sock.exists() and docker("version").returncode == 0

        wait_until(up, 60, "rootless dockerd to answer", interval=0.2)
        tar = test_user.give(Path(shutil.make_archive(str(user_tmp / "image"), "tar", user_rootfs)))
        with open(tar, "rb") as f:
            r = docker("import", "-", IMAGE, stdin=f)
        assert r.returncode == 0, r.stderr
        yield docker, hook
    finally:
        if proc is not None:
            # rootlesskit (the script exec'd it) ends dockerd, containerd and slirp4netns with it.
            kit = [p for p in descendants(proc.pid) if p.comm() == "rootlesskit"]
            for p in kit:
                os.kill(p.pid, signal.SIGTERM)
            try:
                wait_gone(kit, 30)
            finally:
                for p in descendants(proc.pid):
                    p.kill()
                proc.kill()
                proc.wait(timeout=30)
            busy = test_user.wait_quiet(10)
            if busy:
                warnings.warn(f"{test_user.name} still runs {[(p.pid, p.comm()) for p in busy]}",
                              stacklevel=1)
        TUN.chmod(tun_mode)
        log.close()
        reap_leftovers(hook)
        shutil.rmtree(work, ignore_errors=True)


def test_rootless_docker_refuses_with_a_clear_line(rootless_dockerd, port_alloc):
    """Under rootlesskit the hook would bind in rootlesskit's network namespace, out of the
    host's reach (checked by hand: the container started, the host got "connection refused",
    the port answered only inside rootlesskit's namespace). So the wrapper refuses, naming why,
    and a container without ports still runs through it."""
    docker, hook = rootless_dockerd
    port = port_alloc.take()
    r = docker("run", "-d", "--name", "refused", "--runtime", "portfwd", "--network", "none", *USR,
               "-e", f"OCI_PORTFWD_PORTS=127.0.0.1:{port}:80", IMAGE, "/bin/true")
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0
    assert ("oci-portfwd-runtime: this runs in a network namespace made inside its own user "
            "namespace (rootless Docker or nerdctl: rootlesskit's)") in err, err
    assert port_is_free("127.0.0.1", port)
    assert not (hook.state_dir.exists() and list(hook.state_dir.glob("*.json")))

    r = docker("run", "--name", "plain", "--runtime", "portfwd", "--network", "none", *USR, IMAGE,
               "/bin/sh", "-c", "echo ran")
    assert r.returncode == 0 and r.stdout.decode().strip() == "ran", r.stderr
