"""One test container: bundle, run -d, pid, kill + delete, always cleaned up.

The runtime's stdout/stderr go to files, never to pipes: the container (and a misbehaving hook
child) inherits them, and a pipe would keep the test waiting for an EOF that never comes.
"""

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .bundle import make_config, make_rootless, write_bundle
from .hookenv import HookEnv
from .netns import Netns
from .runtimes import Runtime
from .services import Services

PORTS_ANNOTATION = "io.oci-portfwd.ports"
RUNTIME_TIMEOUT = 60


@dataclass(frozen=True)
class RunResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        return (f"{' '.join(self.argv[-12:])} -> {self.returncode}\n"
                f"stdout: {self.stdout.strip()}\nstderr: {self.stderr.strip()}")


class ContainerStartError(AssertionError):
    pass


class Container:
    def __init__(self, runtime: Runtime, rootfs: Path, workdir: Path, args: list[str], *,
                 hook: HookEnv | None = None, ports: str | None = None,
                 annotations: dict[str, str] | None = None, start_stage: str = "prestart",
                 netns: Netns | None = None, host_network: bool | str = False) -> None:
        """host_network: True drops the network namespace from the spec (the container shares
        the runtime's); a path makes the container join that netns."""
        # Random first: the supervisor is named after the first 7 characters of the id.
        self.id = f"{uuid.uuid4().hex[:10]}-{runtime.name}"
        self.runtime = runtime
        self.hook = hook
        self.netns = netns
        self.bundle = workdir / self.id
        self.pid: int | None = None
        self._created = False
        annotations = dict(annotations or {})
        if ports is not None:
            annotations[PORTS_ANNOTATION] = ports
        self.config = make_config(rootfs=rootfs, args=args, annotations=annotations,
                                  hooks=hook.hooks(start_stage) if hook else None)
        user = runtime.user
        if user is not None:
            self.config = make_rootless(self.config, user.uid, user.gid)
        if host_network:
            namespaces = [ns for ns in self.config["linux"]["namespaces"] if ns["type"] != "network"]
            if isinstance(host_network, str):
                namespaces.append({"type": "network", "path": host_network})
            self.config["linux"]["namespaces"] = namespaces
        write_bundle(self.bundle, self.config)
        if user is not None:
            # The runtime runs as the user: it reads the bundle and writes the pid file there.
            user.give(self.bundle)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, argv: list[str], name: str, in_netns: bool = False) -> RunResult:
        # Only `run` needs the test netns (the prestart hook binds there); kill/delete must work
        # even after the netns is gone.
        if in_netns and self.netns:
            argv = [*self.netns.prefix(), *argv]
        out, err = self.bundle / f"{name}.stdout", self.bundle / f"{name}.stderr"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                  timeout=RUNTIME_TIMEOUT, check=False)
        return RunResult(argv, proc.returncode, out.read_text(errors="replace"),
                         err.read_text(errors="replace"))

    def create(self) -> RunResult:
        """`run -d`; the result tells success or the runtime's error (hook errors included)."""
        pid_file = self.bundle / "container.pid"
        self._created = True
        result = self._run(self.runtime.create_argv(
            "run", "-d", "--bundle", str(self.bundle), "--pid-file", str(pid_file), self.id),
            "run", in_netns=True)
        if result.ok:
            self.pid = int(pid_file.read_text())
        return result

    def start(self) -> int:
        result = self.create()
        if not result.ok:
            hook_log = self.hook.log_text(self.id) if self.hook else ""
            raise ContainerStartError(
                f"{self.runtime.name} run {self.id} failed ({result.returncode}):\n"
                f"{result.stderr}\nhook log:\n{hook_log}")
        assert self.pid is not None
        return self.pid

    def status(self) -> str | None:
        """The runtime's status ("running", "stopped", …), None when it knows no such container."""
        result = self._run(self.runtime.argv("state", self.id), "state")
        return json.loads(result.stdout)["status"] if result.ok else None

    def kill(self, signal: str = "KILL") -> RunResult:
        return self._run(self.runtime.argv("kill", self.id, signal), "kill")

    def delete(self) -> RunResult:
        """`delete -f`: this is where the runtime runs the poststop hooks."""
        return self._run(self.runtime.argv("delete", "-f", self.id), "delete")

    def stop(self) -> RunResult | None:
        """kill + delete; safe to call on a container that failed, died or is already gone."""
        if not self._created:
            return None
        self.kill()
        result = self.delete()
        self._created = False
        return result

    def exec(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """`exec` a process in the running container (as the runtime's user); output captured."""
        return subprocess.run(self.runtime.argv("exec", self.id, *argv), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def exec_in_netns(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("check", False)
        return subprocess.run(["nsenter", f"--net={self.netns_path}", *argv], **kwargs)


@dataclass
class Published:
    """A running container whose ports a module's tests share (name → host port)."""

    container: Container
    hook: HookEnv
    port: dict[str, int]


class ContainerFactory:
    """Makes containers for one runtime and guarantees their cleanup (and their hooks' leftovers)
    at the end of its scope, whatever happened in between."""

    def __init__(self, runtime: Runtime, rootfs: Path, workdir: Path) -> None:
        self.runtime, self.rootfs, self.workdir = runtime, rootfs, workdir
        self._made: list[Container] = []

    def new(self, args: list[str], **kwargs) -> Container:
        container = Container(self.runtime, self.rootfs, self.workdir, args, **kwargs)
        self._made.append(container)
        return container

    def cleanup(self) -> list[str]:
        """Stop everything; return a note per leftover process that had to be killed."""
        from .hookenv import reap_leftovers

        notes = []
        for container in reversed(self._made):
            container.stop()
        for container in self._made:
            if container.hook is not None:
                killed = reap_leftovers(container.hook)
                if killed:
                    notes.append(f"{container.id}: killed leftover hook processes {killed}")
        self._made.clear()
        return notes


@contextmanager
def published(factory: ContainerFactory, services: Services, hook: HookEnv, spec: str,
              port: dict[str, int]) -> Iterator[Published]:
    """A container publishing `spec`, its services answering; removed, with anything the hook
    left, whatever happens."""
    from .hookenv import reap_leftovers

    try:
        container = factory.new(services.argv(), hook=hook, ports=spec)
        services.wait_ready(container.start())
        yield Published(container, hook, port)
    finally:
        factory.cleanup()
        reap_leftovers(hook)
