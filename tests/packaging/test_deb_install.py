"""Install the .deb on this machine with dpkg, run a podman container with only the ports
annotation (no --hooks-dir: the packaged hooks.d file must be found in podman's default
directory), upgrade with a changed config, remove and purge.

Careful with the machine: skipped (saying why) when oci-portfwd-hook is known to dpkg already or
any of its files exist; purged at the end whatever happens; podman uses a private storage under
the test's tmp dir; /run/oci-portfwd is removed afterwards if this test created it. The tests
run in file order and share one installation (module fixture).
"""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from pkgkit import PACKAGE, REPO, need_apt_packages

pytestmark = [pytest.mark.root, pytest.mark.e2e]

CONFIG = Path("/etc/containers/oci-portfwd.json")
HOOK = Path("/usr/libexec/oci/hooks.d/oci-portfwd-hook")
HOOKS_D_FILE = Path("/usr/share/containers/oci/hooks.d/oci-portfwd-hook.json")
CLI = Path("/usr/bin/oci-portfwd-hook")
WRAPPER = Path("/usr/bin/oci-portfwd-runtime")
PY_PACKAGE = Path("/usr/lib/python3/dist-packages/oci_portfwd")
NATIVE_DIALER = Path("/usr/libexec/oci-portfwd-hook/portfwd-dialer")
KEEPER = Path("/usr/libexec/oci-portfwd-hook/portfwd-keeper")
RELAY = Path("/usr/libexec/oci-portfwd-hook/portfwd_relay.abi3.so")
STATE_DIR = Path("/run/oci-portfwd")
# Whatever dpkg may leave next to a conffile.
CONFFILE_LEFTOVERS = [Path(f"{CONFIG}{suffix}") for suffix in
                      (".dpkg-dist", ".dpkg-old", ".dpkg-new", ".dpkg-tmp", ".dpkg-bak")]
IMAGE = "localhost/oci-portfwd-pkgtest"
PAGE = "hello from the packaged hook\n"
DPKG_TIMEOUT = 60


def dpkg_status() -> str:
    """dpkg's two-letter status of the package ('ii', 'rc', …); '' when dpkg does not know it."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def dpkg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """dpkg with no stdin (a conffile prompt would fail, not hang), retried while another
    apt/dpkg holds the lock."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + DPKG_TIMEOUT
    while True:
        r = subprocess.run(["dpkg", *args], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, env=env, timeout=DPKG_TIMEOUT)
        locked = r.returncode != 0 and "lock" in r.stderr and "dpkg" in r.stderr
        if not locked or time.monotonic() > deadline:
            break
        time.sleep(1)
    if check and r.returncode != 0:
        pytest.fail(f"dpkg {' '.join(args)} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def run(argv, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} failed (exit {r.returncode}):\n"
                    f"{r.stdout}{r.stderr}")
    return r


def deb_paths(deb: Path) -> list[Path]:
    out = run(["dpkg-deb", "-c", str(deb)]).stdout
    return [Path(line.split()[5].removeprefix(".").rstrip("/") or "/")
            for line in out.splitlines()]


def port_is_free(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
                s.listen(1)
            except OSError:
                return False
    return True


def free_port() -> int:
    # Below the ephemeral range (32768+), like the e2e tests' ports.
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port_is_free(port):
            return port
    raise RuntimeError("no free port in 20000-32000")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return value


class Installation:
    def __init__(self, deb: Path, version: str) -> None:
        self.deb = deb
        self.version = version
        self.paths = deb_paths(deb)
        # Paths of the package that were there before (/usr, /etc, …): they must stay.
        self.existed_before = {p for p in self.paths if p.exists()}
        self.state_dir_existed = STATE_DIR.exists()


@pytest.fixture(scope="module")
def installed(built_deb):
    if os.geteuid() != 0:
        pytest.skip("installing the .deb needs root")
    status = dpkg_status()
    if status not in ("", "un"):
        pytest.skip(f"NOT TOUCHING THIS MACHINE: {PACKAGE} is already known to dpkg (status "
                    f"{status!r}), installed from elsewhere; `dpkg --purge {PACKAGE}` to run this")
    present = [str(p) for p in (CONFIG, HOOK, HOOKS_D_FILE, CLI, WRAPPER, PY_PACKAGE, *CONFFILE_LEFTOVERS)
               if p.exists() or p.is_symlink()]
    if present:
        pytest.skip(f"NOT TOUCHING THIS MACHINE: files of {PACKAGE} exist without the package "
                    f"(a manual install?): {', '.join(present)}")
    need_apt_packages("python3-pyroute2", "python3-jsonschema", "python3-prctl")
    inst = Installation(built_deb.path, built_deb.version)
    try:
        dpkg("-i", str(inst.deb))
        assert dpkg_status() == "ii"
        yield inst
    finally:
        dpkg("--purge", PACKAGE, check=False)
        if dpkg_status() not in ("", "un"):
            warnings.warn(f"{PACKAGE} is still known to dpkg after --purge: {dpkg_status()!r}",
                          stacklevel=1)
        if not inst.state_dir_existed and STATE_DIR.is_dir():
            leftovers = sorted(os.listdir(STATE_DIR))
            if leftovers:
                warnings.warn(f"{STATE_DIR} was made by this test and still holds {leftovers}; "
                              "left in place", stacklevel=1)
            else:
                STATE_DIR.rmdir()


def test_installed_hook_runs_on_debian_python(installed):
    assert dpkg_status() == "ii"
    for path in (HOOK, CLI):
        r = run([str(path), "--version"])
        assert r.stdout.strip() == f"oci-portfwd-hook {installed.version}"
    # The package comes from dist-packages, the dependencies from Debian's packages.
    probe = run(["/usr/bin/python3", "-I", "-c",
                 "import oci_portfwd, pyroute2, jsonschema, prctl; "
                 "print(oci_portfwd.__file__, pyroute2.__file__, jsonschema.__file__, "
                 "prctl.__file__)"]).stdout.split()
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in probe), probe
    # check-config validates the packaged config against the packaged schema.
    r = run([str(CLI), "check-config"], env={"PATH": "/usr/bin:/bin"})
    assert str(CONFIG) in r.stdout and str(STATE_DIR) in r.stdout, r.stdout
    assert json.loads(HOOKS_D_FILE.read_text())["hook"]["path"] == str(HOOK)


def test_installed_wrapper_adds_the_packaged_hook(installed, tmp_path):
    """/usr/bin/oci-portfwd-runtime puts /usr/libexec's hook in the spec, then execs the runtime
    of the config (here a script that records its arguments)."""
    fake = tmp_path / "fake-runc"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n")
    fake.chmod(0o755)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"runtime": str(fake)}))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"ociVersion": "1.0.2", "process": {"env": ["OCI_PORTFWD_PORTS=8080:80"]}}))
    run([str(WRAPPER), "create", "--bundle", str(bundle), "cid"],
        env={"PATH": "/usr/bin:/bin", "OCI_PORTFWD_CONFIG": str(config)})
    assert (tmp_path / "args").read_text().split() == ["create", "--bundle", str(bundle), "cid"]
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["annotations"] == {"io.oci-portfwd.ports": "8080:80"}
    assert spec["hooks"]["prestart"] == [{"path": str(HOOK), "args": ["oci-portfwd-hook", "prestart"]}]
    assert spec["hooks"]["poststop"] == [{"path": str(HOOK), "args": ["oci-portfwd-hook", "poststop"]}]


@pytest.fixture
def podman(tmp_path):
    """Rootful podman on a private storage, default hooks directories."""
    need_apt_packages("podman", "runc", "busybox-static", "curl")
    # podman refuses a runroot longer than 50 characters: not under pytest's tmp_path.
    store = Path(tempfile.mkdtemp(prefix="ocipf-pkg-", dir="/tmp"))
    base = ["podman", "--root", str(store / "root"), "--runroot", str(store / "runroot"),
            "--tmpdir", str(store / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    try:
        rootfs = tmp_path / "rootfs"
        for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "www"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
        run(["chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin"])
        (rootfs / "www" / "index.html").write_text(PAGE)
        tarball = tmp_path / "busybox.tar"
        run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
        run([*base, "import", "--change", 'CMD ["/bin/sh"]', str(tarball), IMAGE], timeout=60)
        yield base
    finally:
        run([*base, "rm", "-af", "-t", "0"], timeout=60, check=False)
        run([*base, "rmi", "-af"], timeout=60, check=False)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(store))]
        for mount in reversed(mounts):
            run(["umount", "-l", mount], check=False)
        shutil.rmtree(store, ignore_errors=True)


def state_logs(container_id: str = "*") -> str:
    """The hook's logs of the container (of every container, newest last, when unknown)."""
    if not STATE_DIR.is_dir():
        return f"({STATE_DIR} does not exist)"
    logs = sorted(STATE_DIR.glob(f"{container_id}.log"), key=lambda p: p.stat().st_mtime)
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs[-3:])


def test_podman_finds_the_installed_hook_in_default_hooks_dir(installed, podman):
    port = free_port()
    name = f"oci-portfwd-pkgtest-{os.getpid()}"
    r = run([*podman, "run", "-d", "--name", name, "--runtime", "runc", "--network", "none",
             "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
             "--annotation", f"io.oci-portfwd.ports={port}:80",
             IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"], timeout=60, check=False)
    assert r.returncode == 0, f"podman run failed:\n{r.stdout}{r.stderr}\n{state_logs()}"
    container_id = r.stdout.strip().splitlines()[-1]
    try:
        check_forwarding(podman, name, container_id, port)
    finally:
        # rm -f kills the container before poststop: the hook keeps that log for a day.
        # Ours is not left behind in the shared default state dir.
        (STATE_DIR / f"{container_id}.log").unlink(missing_ok=True)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def supervisor_exe(container_id: str) -> str | None:
    """What the container's supervisor runs once its core serves."""
    try:
        supervisor = json.loads((STATE_DIR / f"{container_id}.json").read_text())["supervisor_pid"]
        exe = os.readlink(f"/proc/{supervisor}/exe")
    except (OSError, ValueError, KeyError):
        return None
    return exe if exe == str(KEEPER) else None


def dialer_exe(container_id: str) -> str | None:
    """What the container's dialer runs (supervisor → core → dialer)."""
    try:
        supervisor = json.loads((STATE_DIR / f"{container_id}.json").read_text())["supervisor_pid"]
    except (OSError, ValueError, KeyError):
        return None
    for core in children(int(supervisor)):
        for pid in children(core):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "portfwd-dialer":
                    return os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
    return None


def relay_threads(container_id: str) -> int | None:
    """How many threads of the container's core run the packaged relay extension (the core's
    threads but its Python one), None while the core has not loaded it."""
    try:
        supervisor = json.loads((STATE_DIR / f"{container_id}.json").read_text())["supervisor_pid"]
    except (OSError, ValueError, KeyError):
        return None
    for core in children(int(supervisor)):
        try:
            if Path(f"/proc/{core}/comm").read_text().strip() != "portfwd-core":
                continue
            if str(RELAY) not in Path(f"/proc/{core}/maps").read_text():
                return None
            return len(os.listdir(f"/proc/{core}/task")) - 1
        except OSError:
            continue
    return None


def check_forwarding(podman: list[str], name: str, container_id: str, port: int) -> None:
    def fetch():
        c = subprocess.run(["curl", "-sS", "--max-time", "3", f"http://127.0.0.1:{port}/"],
                           capture_output=True, text=True, timeout=10)
        return c.stdout if c.returncode == 0 and c.stdout == PAGE else None

    deadline = time.monotonic() + 10
    while (body := fetch()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert body == PAGE, f"no page through 127.0.0.1:{port}\n{state_logs(container_id)}"
    ps = run([str(CLI), "ps"]).stdout
    assert container_id[:12] in ps and f"{port}" in ps, ps
    # The packaged native dialer serves (dialer.py execs it from /usr/libexec), on Debian's
    # python3-seccomp, which exported its filter.
    assert wait_for(lambda: dialer_exe(container_id), 10, "the dialer") == str(NATIVE_DIALER)
    # And the supervisor waits in the packaged keeper (supervisor.py execs it from there).
    assert wait_for(lambda: supervisor_exe(container_id), 10, "the keeper") == str(KEEPER)
    # The page came through the relay threads of the packaged extension, on Debian's python3.
    assert wait_for(lambda: relay_threads(container_id), 10, "the relay threads") == min(4, len(os.sched_getaffinity(0)))

    run([*podman, "rm", "-f", "-t", "0", name], timeout=60)
    wait_for(lambda: port_is_free(port), 10, f"port {port} to be freed after podman rm")
    wait_for(lambda: container_id[:12] not in run([str(CLI), "ps"]).stdout, 10,
             "the container to leave `oci-portfwd-hook ps`")


def repacked(deb: Path, tmp_path: Path, version: str, config: dict) -> Path:
    """The same package as another version with another shipped config."""
    tree = tmp_path / "repack"
    run(["dpkg-deb", "-R", str(deb), str(tree)])
    control = tree / "DEBIAN" / "control"
    control.write_text("".join(f"Version: {version}\n" if line.startswith("Version:") else line
                               for line in control.read_text().splitlines(keepends=True)))
    (tree / "etc/containers/oci-portfwd.json").write_text(json.dumps(config, indent=2) + "\n")
    md5 = tree / "DEBIAN" / "md5sums"
    md5.write_text(run(["sh", "-c", "find etc usr -type f | sort | xargs md5sum"],
                       cwd=tree).stdout)
    out = tmp_path / f"{PACKAGE}_{version}_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)])
    return out


def test_upgrade_keeps_a_changed_config(installed, tmp_path):
    shipped = json.loads((REPO / "packaging" / "oci-portfwd.json").read_text())
    mine = {**shipped, "max_ports": 64, "log_level": "debug"}
    CONFIG.write_text(json.dumps(mine, indent=2) + "\n")

    # Same version again, stdin /dev/null, no --force-conf*: dpkg keeps the file, no prompt.
    dpkg("-i", str(installed.deb))
    assert json.loads(CONFIG.read_text()) == mine
    assert not [p for p in CONFFILE_LEFTOVERS if p.exists()]

    # A newer version whose shipped default changed too: with --force-confold (what
    # non-interactive upgrades use) the admin's file stays, the new default goes to .dpkg-dist.
    newer = {**shipped, "udp_idle_timeout": 30}
    bumped = repacked(installed.deb, tmp_path, f"{installed.version}+upgradetest1", newer)
    dpkg("--force-confdef", "--force-confold", "-i", str(bumped))
    assert json.loads(CONFIG.read_text()) == mine
    assert json.loads(Path(f"{CONFIG}.dpkg-dist").read_text()) == newer
    # The hook reads the kept file.
    assert re.search(r"max_ports\W+64\b", run([str(CLI), "check-config"]).stdout)


def test_remove_then_purge_leaves_nothing(installed):
    def left() -> list[str]:
        return sorted(str(p) for p in installed.paths
                      if p not in installed.existed_before and (p.exists() or p.is_symlink()))

    dpkg("-r", PACKAGE)
    assert dpkg_status() == "rc"
    # dpkg -r keeps conffiles (Debian policy); everything else is gone.
    assert left() == [str(CONFIG)]
    dpkg("--purge", PACKAGE)
    assert dpkg_status() in ("", "un")
    assert left() == []
    assert not [str(p) for p in CONFFILE_LEFTOVERS if p.exists()]
