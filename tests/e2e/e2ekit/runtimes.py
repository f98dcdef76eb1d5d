"""How to invoke runc and crun on this host.

Each test session gives the runtimes their own state root (--root), so the tests never see or
touch containers that are not theirs.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

HYBRID_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")

# crun refuses to create any container on a hybrid cgroup host whose v2 hierarchy has a
# controller ("cgroups in hybrid mode not supported"). Masking the file in a private mount
# namespace hides the controller from crun without touching the host's mounts.
CRUN_WRAPPER = """#!/bin/sh
exec unshare -m --propagation slave sh -c \\
  'mount --bind /dev/null {controllers} && exec crun "$@"' crun "$@"
"""


class RuntimeUnavailable(Exception):
    """The runtime cannot be used here; the message is the skip reason."""


@dataclass(frozen=True)
class Runtime:
    name: str
    binary: str
    # Used for `run`/`create` only: crun's kill/delete/state need no wrapper.
    create_binary: str
    root: Path

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def create_argv(self, *args: str) -> list[str]:
        return [self.create_binary, "--root", str(self.root), *args]


def make_runtime(name: str, workdir: Path) -> Runtime:
    binary = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None:
        raise RuntimeUnavailable(f"{name} is not installed (make deps installs it)")
    root = workdir / f"{name}-root"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_binary = binary
    if name == "crun" and _hybrid_cgroup_controllers():
        if shutil.which("unshare") is None:
            raise RuntimeUnavailable("crun needs the unshare wrapper on this hybrid cgroup host")
        wrapper = workdir / "crun-wrapper"
        wrapper.write_text(CRUN_WRAPPER.format(controllers=HYBRID_CONTROLLERS))
        wrapper.chmod(0o755)
        create_binary = str(wrapper)
    return Runtime(name=name, binary=binary, create_binary=create_binary, root=root)


def _hybrid_cgroup_controllers() -> bool:
    try:
        return HYBRID_CONTROLLERS.read_text().strip() != ""
    except OSError:
        return False
