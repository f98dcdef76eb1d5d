"""Podman (4.3.1) as the tests drive it: a busybox image made by `podman import` (no registry),
the packaged hooks.d file pointed at the venv's hook, `--runtime runc --network none`. The hooks
dir goes on the command line (`--hooks-dir`), or, as a user would set it up for good, into a
containers.conf's `hooks_dir` (`Podman.use_containers_conf`).

Rootful podman gets a storage of its own per session (--root/--runroot/--tmpdir), so the tests
never see other containers; rootless podman uses the test user's default storage. Either way
the tests remove every container and image they made.
"""

import json
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .container import RunResult
from .hookenv import HookEnv
from .rootfs import INDEX_HTML
from .users import TestUser

ANNOTATION = "io.oci-portfwd.ports"
PODMAN_TIMEOUT = 90
# root here lacks CAP_SYS_RESOURCE and its hard nofile limit is 20000: podman's defaults
# (nofile 1048576) would fail the container's start.
ROOTFUL_ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
# The container command: busybox httpd on port 80, both families, in the foreground.
HTTPD = ["httpd", "-f", "-p", "80", "-h", "/www"]


class PodmanError(AssertionError):
    pass


def annotation_arg(key: str, value: str) -> str:
    """podman's --annotation is a CSV list: `--annotation k=8080:80,9090:90` is two annotations
    (and fails: "annotations must be formatted KEY=VALUE"). A CSV-quoted field keeps the commas."""
    text = f"{key}={value}"
    return '"' + text.replace('"', '""') + '"' if "," in text or '"' in text else text


def build_image_tar(workdir: Path) -> Path:
    """A busybox rootfs as a tarball: /bin/busybox and a symlink per applet, /www/index.html."""
    rootfs = workdir / "image-rootfs"
    for name in ("bin", "proc", "sys", "dev", "tmp", "etc", "www"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "/bin/busybox", str(rootfs / "bin" / "busybox")], check=True, timeout=30)
    subprocess.run(["chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin"],
                   check=True, timeout=30)
    (rootfs / "www" / "index.html").write_bytes(INDEX_HTML)
    tar = workdir / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True, timeout=60)
    return tar


def containers_conf_text(hooks_dirs: list[Path], rootful: bool) -> str:
    """A containers.conf whose `hooks_dir` lists `hooks_dirs` (a later one masks a file of the
    same name in an earlier one). It is the only containers.conf podman reads when
    CONTAINERS_CONF names it, so it carries what the tests otherwise pass as flags."""
    lines = ["# oci-portfwd-hook e2e test: the hooks dir without --hooks-dir"]
    if rootful:
        ulimits = [ROOTFUL_ULIMITS[i + 1] for i in range(0, len(ROOTFUL_ULIMITS), 2)]
        lines += ["[containers]", f"default_ulimits = {json.dumps(ulimits)}"]
    # TOML basic strings and JSON strings agree for paths like these.
    lines += ["[engine]", f"hooks_dir = {json.dumps([str(d) for d in hooks_dirs])}", ""]
    return "\n".join(lines)


def hooks_file(packaged: Path, hook_path: Path, env: list[str]) -> dict:
    """The packaged hooks.d file, pointed at `hook_path`, with an `env` of the test's own."""
    doc = json.loads(packaged.read_text())
    doc["hook"]["path"] = str(hook_path)
    doc["hook"]["env"] = list(env)
    return doc


@dataclass
class PodmanStore:
    """One podman installation as the tests see it: who runs it, where it stores, the image."""
    user: TestUser | None
    workdir: Path
    image: str = field(default_factory=lambda: f"localhost/oci-portfwd-test-busybox:{uuid.uuid4().hex[:8]}")

    @property
    def rootless(self) -> bool:
        return self.user is not None

    @property
    def label(self) -> str:
        return "rootless" if self.rootless else "rootful"

    def global_args(self) -> list[str]:
        # Rootful: workdir must be short, podman refuses a runroot longer than 50 characters.
        args = ["--runtime", "runc"]
        if not self.rootless:
            args += ["--root", str(self.workdir / "storage"), "--runroot",
                     str(self.workdir / "runroot"), "--tmpdir", str(self.workdir / "tmp")]
        return args

    def argv(self, *args: str, hooks_dir: Path | None = None, env: Sequence[str] = ()) -> list[str]:
        prefix = self.user.prefix() if self.user is not None else []
        hooks = ["--hooks-dir", str(hooks_dir)] if hooks_dir is not None else []
        setenv = ["env", *env] if env else []
        return [*prefix, *setenv, "podman", *self.global_args(), *hooks, *args]

    def run(self, *args: str, hooks_dir: Path | None = None, env: Sequence[str] = (),
            timeout: float = PODMAN_TIMEOUT) -> RunResult:
        # Files, not pipes: conmon and the hook's supervisor outlive the command, and a pipe
        # they inherited by mistake would hang the test instead of failing it.
        argv = self.argv(*args, hooks_dir=hooks_dir, env=env)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  timeout=timeout, check=False, cwd="/")
            out.seek(0)
            err.seek(0)
            return RunResult(argv, proc.returncode, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))

    def must(self, *args: str, **kwargs) -> RunResult:
        result = self.run(*args, **kwargs)
        if not result.ok:
            raise PodmanError(f"podman {self.label} failed: {result}")
        return result

    def import_image(self, tar: Path) -> None:
        self.must("import", "--change", 'CMD ["/bin/sh"]', str(tar), self.image)

    def remove_image(self) -> RunResult:
        return self.run("rmi", "-f", self.image)


@dataclass
class PodmanContainer:
    store: PodmanStore
    name: str
    id: str
    pid: int


class Podman:
    """Containers of one test, run with the test's hooks dir (whose hook uses `hook`'s config
    and state dir), all removed at the end."""

    def __init__(self, store: PodmanStore, hooks_dir: Path, hook: HookEnv) -> None:
        if not hooks_dir.is_dir():
            # podman silently runs no hook at all for a --hooks-dir that does not exist.
            raise PodmanError(f"hooks dir {hooks_dir} does not exist")
        self.store = store
        self.hooks_dir = hooks_dir
        self.hook = hook
        self._names: list[str] = []
        self._hooks_dir_flag = True
        self._ulimit_flags = not store.rootless
        self._env: list[str] = []

    def use_containers_conf(self, conf: Path | None) -> None:
        """From now on no --hooks-dir (and no --ulimit): podman must find the hooks dir in a
        containers.conf (`containers_conf_text`), the file `conf` names through CONTAINERS_CONF,
        or with None the files podman reads by itself (e.g. ~/.config/containers/)."""
        self._hooks_dir_flag = False
        self._ulimit_flags = False
        self._env = [f"CONTAINERS_CONF={conf}"] if conf is not None else []

    def run(self, *args: str, **kwargs) -> RunResult:
        hooks_dir = self.hooks_dir if self._hooks_dir_flag else None
        return self.store.run(*args, hooks_dir=hooks_dir, env=self._env, **kwargs)

    def start(self, ports: str | None, command: list[str] = HTTPD, network: str = "none",
              annotations: dict[str, str] | None = None) -> PodmanContainer:
        name = f"pf-{uuid.uuid4().hex[:10]}"
        self._names.append(name)
        annotation = ["--annotation", annotation_arg(ANNOTATION, ports)] if ports is not None else []
        for key, value in (annotations or {}).items():
            annotation += ["--annotation", annotation_arg(key, value)]
        ulimits = ROOTFUL_ULIMITS if self._ulimit_flags else []
        result = self.run("run", "-d", "--name", name, "--network", network, "--pull", "never",
                          *ulimits, *annotation, self.store.image, *command)
        if not result.ok:
            raise PodmanError(f"podman {self.store.label} run failed: {result}")
        cid = result.stdout.strip().splitlines()[-1]
        pid = int(self.run("inspect", "-f", "{{.State.Pid}}", name).stdout.strip() or 0)
        if pid <= 0:
            raise PodmanError(f"podman {self.store.label}: container {name} has no pid")
        return PodmanContainer(self.store, name, cid, pid)

    def stop(self, c: PodmanContainer) -> RunResult:
        return self.run("stop", "-t", "0", c.name)

    def rm(self, c: PodmanContainer, force: bool = False) -> RunResult:
        return self.run("rm", *(["-f", "-t", "0"] if force else []), c.name)

    def exec(self, c: PodmanContainer, *argv: str) -> RunResult:
        return self.run("exec", c.name, *argv)

    def cleanup(self) -> None:
        for name in self._names:
            self.run("rm", "-f", "-t", "0", "--ignore", name)
        self._names.clear()


def remove_private_storage(workdir: Path) -> None:
    """Delete a rootful store made for the tests, unless something is still mounted in it
    (then rm -r would reach into the mount: leave it and say so)."""
    mounted = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(workdir) or point.startswith(f"{workdir}/"):
            mounted.append(point)
    if mounted:
        warnings.warn(f"not removing {workdir}: still mounted there: {mounted}", stacklevel=2)
        return
    shutil.rmtree(workdir, ignore_errors=True)
