"""netserver.py (the reliability tests' in-container servers) as a container's command, and the
knobs those tests turn on a container and on the test process: descriptor limits.

netserver.py goes to `python3 -c` whole: the session's rootfs stays as it is.
"""

import resource
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import ports
from .bundle import write_bundle
from .container import Container
from .wait import WaitTimeout, wait_until

NETSERVER = Path(__file__).resolve().parents[1] / "netserver.py"


@dataclass
class NetServices:
    _specs: list[str] = field(default_factory=list)
    _expect: set[int] = field(default_factory=set)

    def echo(self, port: int) -> "NetServices":
        return self._add("echo", port)

    def events(self, port: int) -> "NetServices":
        return self._add("events", port)

    def _add(self, kind: str, port: int) -> "NetServices":
        self._specs.append(f"{kind}:{port}")
        self._expect.add(port)
        return self

    def argv(self) -> list[str]:
        return ["/usr/bin/python3", "-c", NETSERVER.read_text(), *self._specs]

    def wait_ready(self, pid: int, timeout: float = 15) -> None:
        """Every port listens on both families in the container's netns."""
        def missing() -> set[tuple[str, int]]:
            have = ports.listeners("tcp", netns_pid=pid)
            return {(a, p) for p in self._expect for a in ("0.0.0.0", "::")} - have

        try:
            wait_until(lambda: not missing(), timeout, f"netserver in container pid {pid}")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; not listening: {sorted(missing())} "
                              f"(argv: {shlex.join(self._specs)})") from None


def set_container_nofile(container: Container, limit: int) -> None:
    """RLIMIT_NOFILE (soft = hard) of the container's process; before create()."""
    rlimits = [r for r in container.config["process"].get("rlimits", [])
               if r["type"] != "RLIMIT_NOFILE"]
    rlimits.append({"type": "RLIMIT_NOFILE", "hard": limit, "soft": limit})
    container.config["process"]["rlimits"] = rlimits
    write_bundle(container.bundle, container.config)


def raise_own_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (at most the hard limit);
    returns the old (soft, hard) for restore_own_nofile. Children (runtimes, hooks) inherit it."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(wanted, old[1]) if old[1] != resource.RLIM_INFINITY else wanted
    if soft > old[0]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    return old


def restore_own_nofile(old: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, old)
