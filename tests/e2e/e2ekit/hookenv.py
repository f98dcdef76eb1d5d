"""The hook as a test sees it: which executable, its config file and its own state dir.

Every test gets a HookEnv of its own, so state files, logs and supervisors of one test can never
be mistaken for another's, nor for a real installation's (/run/oci-portfwd).
"""

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Bounds a hook that hangs (e.g. a child keeping runc's pipe open): the runtime kills it and
# fails the create instead of the test hanging until pytest-timeout.
HOOK_TIMEOUT = 30


@dataclass
class HookEnv:
    command: Path
    workdir: Path
    settings: dict = field(default_factory=dict)
    # More NAME=VALUE for the hook's environment (e.g. PYTHONPATH for a source-tree hook).
    extra_env: list[str] = field(default_factory=list)
    # Its argv, for a command that is not the hook (the bench's baseline); the hook's by default.
    args: list[str] | None = None

    def __post_init__(self) -> None:
        self.state_dir = self.workdir / "state"
        self.config_path = self.workdir / "oci-portfwd.json"
        self.write_config({"state_dir": str(self.state_dir), "log_level": "debug",
                           **self.settings})

    def write_config(self, settings: dict | str) -> None:
        """Write the config file; a str is written verbatim (for broken configs)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = settings if isinstance(settings, str) else json.dumps(settings, indent=2)
        self.config_path.write_text(text)

    @property
    def env(self) -> list[str]:
        return [f"PATH={HOOK_PATH}", f"OCI_PORTFWD_CONFIG={self.config_path}", *self.extra_env]

    def entry(self, stage: str) -> dict:
        return {"path": str(self.command), "args": self.args or ["oci-portfwd-hook", stage],
                "env": self.env, "timeout": HOOK_TIMEOUT}

    def hooks(self, start_stage: str = "prestart") -> dict[str, list[dict]]:
        return {start_stage: [self.entry(start_stage)], "poststop": [self.entry("poststop")]}

    def state_file(self, container_id: str) -> Path:
        return self.state_dir / f"{container_id}.json"

    def log_file(self, container_id: str) -> Path:
        return self.state_dir / f"{container_id}.log"

    def read_state(self, container_id: str) -> dict:
        return json.loads(self.state_file(container_id).read_text())

    def read_stats(self, container_id: str) -> dict:
        """The forwarding's traffic figures, as `ps` reads them: its page beside the state file."""
        from oci_portfwd.stats import as_dict, read_file  # noqa: PLC0415

        figures = read_file(str(self.state_dir / f"{container_id}.counters"))
        assert figures is not None, f"no counters page for {container_id}"
        return as_dict(figures)

    def log_text(self, container_id: str) -> str:
        try:
            return self.log_file(container_id).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def run(self, *args: str, stdin: bytes | str = b"", cwd: Path | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run the hook directly, as a runtime would (same env), and capture its output."""
        if isinstance(stdin, str):
            stdin = stdin.encode()
        env = dict(line.split("=", 1) for line in self.env)
        return subprocess.run([str(self.command), *args], input=stdin, env=env, cwd=cwd,
                              capture_output=True, timeout=timeout, check=False)


def reap_leftovers(hook: HookEnv) -> list[int]:
    """Kill supervisors that outlived their container (a bug the tests report elsewhere), so one
    failure does not leak ports and processes into the next test. Returns the pids killed."""
    from .procs import Proc, descendants

    killed = []
    for state_file in sorted(hook.state_dir.glob("*.json")):
        try:
            pid = int(json.loads(state_file.read_text())["supervisor_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        proc = Proc.of(pid)
        # Only a process that is really one of ours: a pid alone may have been reused.
        if proc is None or not proc.comm().startswith("portfwd:"):
            continue
        for p in [proc, *descendants(pid)]:
            p.kill()
            killed.append(p.pid)
    return killed


def oci_state(container_id: str, status: str, bundle: Path, *, pid: int | None = None,
              annotations: dict[str, str] | None = None) -> str:
    """An OCI state document like the runtimes send (runc omits pid when there is none)."""
    state: dict = {"ociVersion": "1.0.2-dev", "id": container_id, "status": status,
                   "bundle": str(bundle), "annotations": annotations or {}}
    if pid is not None:
        state["pid"] = pid
    return json.dumps(state)
