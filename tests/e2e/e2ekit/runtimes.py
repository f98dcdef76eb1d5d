"""How to invoke runc and crun on this host, as root or rootless (as the test user).

Each test session gives the runtimes their own state root (--root), so the tests never see or
touch containers that are not theirs.
"""

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .users import TestUser

HYBRID_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")

# crun refuses to create any container on a hybrid cgroup host whose v2 hierarchy has a
# controller ("cgroups in hybrid mode not supported"). Masking the file in a private mount
# namespace hides the controller from crun without touching the host's mounts.
CRUN_WRAPPER = """#!/bin/sh
exec unshare -m --propagation slave sh -c \\
  'mount --bind /dev/null {controllers} && exec crun "$@"' crun "$@"
"""

# Rootless crun has the same problem, and a user cannot mount: the mount namespace is made
# as root, and the user is dropped to inside it, right before crun.
ROOTLESS_CRUN_WRAPPER = """#!/bin/sh
exec unshare -m --propagation slave sh -c \\
  'mount --bind /dev/null {controllers} && exec "$@"' crun {as_user} crun "$@"
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
    # Rootless: the user the runtime runs as; its argv then starts with user.prefix().
    user: TestUser | None = None
    # The create wrapper already drops to the user itself (rootless crun on a hybrid host).
    create_drops_privileges: bool = False

    @property
    def rootless(self) -> bool:
        return self.user is not None

    @property
    def label(self) -> str:
        return f"rootless-{self.name}" if self.rootless else self.name

    def _as(self) -> list[str]:
        return self.user.prefix() if self.user is not None else []

    def argv(self, *args: str) -> list[str]:
        return [*self._as(), self.binary, "--root", str(self.root), *args]

    def create_argv(self, *args: str) -> list[str]:
        prefix = [] if self.create_drops_privileges else self._as()
        return [*prefix, self.create_binary, "--root", str(self.root), *args]


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


def make_rootless_runtime(name: str, workdir: Path, user_workdir: Path, user: TestUser) -> Runtime:
    """The runtime run as `user`. Its --root goes under user_workdir (the user's); a wrapper that
    root runs goes under workdir (root's: the user must not be able to replace it)."""
    binary = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if binary is None:
        raise RuntimeUnavailable(f"{name} is not installed (make deps installs it)")
    root = user.make_dir(user_workdir / f"{name}-root")
    if name == "crun" and _hybrid_cgroup_controllers():
        if shutil.which("unshare") is None:
            raise RuntimeUnavailable("crun needs the unshare wrapper on this hybrid cgroup host")
        wrapper = workdir / "crun-rootless-wrapper"
        wrapper.write_text(ROOTLESS_CRUN_WRAPPER.format(
            controllers=HYBRID_CONTROLLERS, as_user=shlex.join(user.prefix())))
        wrapper.chmod(0o755)
        return Runtime(name=name, binary=binary, create_binary=str(wrapper), root=root,
                       user=user, create_drops_privileges=True)
    return Runtime(name=name, binary=binary, create_binary=binary, root=root, user=user)


def _hybrid_cgroup_controllers() -> bool:
    try:
        return HYBRID_CONTROLLERS.read_text().strip() != ""
    except OSError:
        return False
