"""A private dockerd (Debian's docker.io 20.10) and containerd's ctr, as the engine tests drive
them: its own --data-root, --exec-root, socket and pidfile, no firewall rules, no bridge, and
oci-portfwd-runtime registered as the runtime `portfwd`.

dockerd 20.10 starts its own containerd (socket under the exec root); `ctr` talks to that one in
a namespace of the tests' own. The daemon can be killed and started again (what a crash and a
restart do to running containers); stop() ends it by pid, ends whatever it left (its containerd,
shims) by pid, unmounts what is left under its directories and removes them.
"""

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .container import RunResult
from .procs import Proc
from .wait import wait_until

DOCKERD = "/usr/sbin/dockerd"
# Debian's CLI: a newer one first on PATH (/usr/local/bin/docker, 28) speaks an API this
# daemon (1.41) may refuse.
DOCKER = "/usr/bin/docker"
CTR = "/usr/bin/ctr"
CTR_NAMESPACE = "portfwd-test"
RUNTIME_NAME = "portfwd"
START_TIMEOUT = 60
STOP_TIMEOUT = 60
CLI_TIMEOUT = 90


class DockerError(AssertionError):
    pass


class DockerDaemon:
    def __init__(self, wrapper: Path, env: dict[str, str]) -> None:
        # Short, not under pytest's tmp dir: unix socket paths are limited to 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="pfdk-", dir="/tmp"))
        self.data = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.socket = self.workdir / "docker.sock"
        self.pidfile = self.workdir / "docker.pid"
        self.log = self.workdir / "dockerd.log"
        self.wrapper = wrapper
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.containerd: Proc | None = None

    # --- the daemon ---------------------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    def bundle(self, container_id: str, namespace: str = "moby") -> Path:
        return self.exec_root / "containerd" / "daemon" / "io.containerd.runtime.v2.task" / namespace / container_id

    def start(self) -> None:
        argv = [DOCKERD, "--data-root", str(self.data), "--exec-root", str(self.exec_root),
                "-H", f"unix://{self.socket}", "--pidfile", str(self.pidfile),
                "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false",
                "--add-runtime", f"{RUNTIME_NAME}={self.wrapper}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise DockerError(f"dockerd exited ({self.proc.returncode}):\n{self.log_tail()}")
            return self.socket.exists() and self.docker("version").ok

        wait_until(up, START_TIMEOUT, "dockerd to answer", interval=0.2)
        self.containerd = self._containerd()

    def _containerd(self) -> Proc | None:
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            return Proc.of(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL dockerd, the way a crash ends it; its containerd goes with it (or is ended
        here, by pid: no engine must be left to clean up what the test then checks)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None
        if self.containerd is not None:
            containerd = self.containerd
            try:
                wait_until(lambda: not containerd.alive(), 10, "dockerd's containerd to end")
            except AssertionError:
                containerd.kill()
            # Reaped too, not only dead: a new dockerd takes a zombie named by containerd.pid for
            # a running containerd and waits for it in vain ("containerd is still running").
            wait_until(lambda: not Path(f"/proc/{containerd.pid}").exists(), 30,
                       f"containerd {containerd.pid} to be reaped by init")
        self.containerd = None

    def stop(self) -> list[str]:
        """End the daemon and everything it left; returns notes about leftovers it had to end."""
        notes = []
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq").stdout.split()
            if ids:
                self.docker("rm", "-f", *ids)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                notes.append("dockerd did not stop on SIGTERM: killed")
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None
        if self.containerd is not None and self.containerd.alive():
            notes.append(f"containerd {self.containerd.pid} outlived dockerd: killed")
            self.containerd.kill()
        for proc in self.shims():
            notes.append(f"shim {proc.pid} outlived dockerd: killed")
            proc.kill()
        notes += self.remove_dirs()
        return notes

    def shims(self) -> list[Proc]:
        """containerd-shim-runc-v2 processes of this daemon's containerd (found by its socket)."""
        found = []
        marker = str(self.containerd_socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and marker in cmdline:
                proc = Proc.of(int(entry.name))
                if proc is not None and proc.alive():
                    found.append(proc)
        return found

    def remove_dirs(self) -> list[str]:
        notes = []
        for point in reversed(mounts_under(self.workdir)):
            r = subprocess.run(["umount", "-l", point], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                notes.append(f"cannot unmount {point}: {r.stderr.strip()}")
        if mounts_under(self.workdir):
            notes.append(f"not removing {self.workdir}: still mounted: {mounts_under(self.workdir)}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return notes

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- clients ------------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = CLI_TIMEOUT) -> RunResult:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_HOST": f"unix://{self.socket}",
               "HOME": str(self.workdir)}
        return _run([DOCKER, *args], env, timeout)

    def must(self, *args: str, timeout: float = CLI_TIMEOUT) -> RunResult:
        r = self.docker(*args, timeout=timeout)
        if not r.ok:
            raise DockerError(f"docker failed: {r}\n--- dockerd log ---\n{self.log_tail()}")
        return r

    def ctr(self, *args: str, timeout: float = CLI_TIMEOUT) -> RunResult:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir)}
        return _run([CTR, "--address", str(self.containerd_socket), "--namespace", CTR_NAMESPACE,
                     *args], env, timeout)

    def pid_of(self, name: str) -> int:
        return int(self.must("inspect", "-f", "{{.State.Pid}}", name).stdout.strip() or 0)

    def status_of(self, name: str) -> str:
        return self.must("inspect", "-f", "{{.State.Status}}", name).stdout.strip()


def _run(argv: list[str], env: dict[str, str], timeout: float) -> RunResult:
    # Files, not pipes: a shim or a supervisor that inherited a pipe by mistake would hang the
    # test instead of failing it.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                              timeout=timeout, check=False, cwd="/")
        out.seek(0)
        err.seek(0)
        return RunResult(argv, proc.returncode, out.read().decode(errors="replace"),
                         err.read().decode(errors="replace"))


def mounts_under(path: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(f"{path}/"):
            points.append(point)
    return points


def import_rootfs(daemon: DockerDaemon, rootfs: Path, image: str) -> None:
    """`docker import` of a rootfs directory (no registry)."""
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        r = subprocess.run([DOCKER, "import", "-", image], stdin=tar.stdout, capture_output=True,
                           text=True, timeout=CLI_TIMEOUT, check=False,
                           env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{daemon.socket}",
                                "HOME": str(daemon.workdir)})
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=CLI_TIMEOUT)
    if r.returncode != 0:
        raise DockerError(f"docker import failed: {r.stderr.strip()}")


def wait_gone(procs: list[Proc], timeout: float = 10) -> None:
    wait_until(lambda: not [p for p in procs if p.alive()], timeout,
               lambda: f"pids {[p.pid for p in procs if p.alive()]} to end")

