"""Least privilege: what each long-lived process keeps once it has started (design.md §7).

    supervisor  keeps the capabilities that starting the core and its dialer again needs
                (SUPERVISOR_CAPS; the external drivers' programs need a few more), and sets
                no_new_privs: nothing it starts can gain privileges by exec
    core        after forking its dialer: no capabilities, the bounding set emptied, rootful
                an unprivileged user (config core_user), no_new_privs; then seccomp
                (seccomp_filter.py). It keeps the descriptors it was handed (listeners, the
                dialer's socket, the log), which is all it needs to serve.
    dialer      after joining the container's namespaces: CAP_NET_ADMIN only (transparent
                sockets and marks; capabilities then count in the container's user namespace
                when it has one), no_new_privs; then seccomp

Rootless, nobody holds a capability in the host's user namespace to begin with; the same calls
drop what there is (the dialer's in the container's user namespace) and skip what needs
CAP_SETPCAP (the bounding set). Every step is a no-op where there is nothing to drop, so a
core restarted by the supervisor (which is still privileged) takes the same path again.
"""

from __future__ import annotations

import os
import sys
from _signal import SIGKILL  # not signal: its enums are off the hook's path (issue 12)

from .errors import StartError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Capability numbers (<linux/capability.h>); python-prctl takes them as they are.
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21

# What the supervisor needs to start a core again (README "Privileges" says why, each):
SUPERVISOR_CAPS = frozenset({
    CAP_SYS_ADMIN,   # the dialer's setns() into the container's user and network namespaces
    CAP_SYS_PTRACE,  # opening /proc/PID/ns/* of a container init with other credentials
    CAP_NET_ADMIN,   # the dialer brings lo up and makes transparent, marked sockets
    CAP_SETUID,      # the core switches to core_user,
    CAP_SETGID,      # and to its group, with no supplementary groups
    CAP_SETPCAP,     # the core and the dialer empty their bounding sets
    CAP_KILL,        # signalling a core that runs as another user
})
# slirp4netns and pasta are run as root by the driver process the supervisor restarts, within
# this bounding set: they also bind the host ports, which may be below 1024.
EXTERNAL_DRIVER_CAPS = SUPERVISOR_CAPS | frozenset({CAP_NET_BIND_SERVICE})
DIALER_CAPS = frozenset({CAP_NET_ADMIN})


# libseccomp's Python bindings, the one the sandbox takes first (seccomp_filter._library).
SECCOMP_BINDINGS = ("seccomp", "pyseccomp")


def check_seccomp_binding() -> None:
    """Before the hook returns: a missing binding would only show once the core serves. Here,
    not in seccomp_filter (which imports socket, select and struct at once): the supervisor
    checks it before "ready"."""
    # The import system's own PathFinder (importlib.machinery's, without importing importlib
    # and warnings, ~1 ms before "ready"): both bindings are modules on sys.path.
    finder: Any = next((f for f in sys.meta_path if getattr(f, "__name__", None) == "PathFinder"), None)
    if finder is None:
        from importlib.machinery import PathFinder  # noqa: PLC0415

        finder = PathFinder
    if not any(finder.find_spec(name) for name in SECCOMP_BINDINGS):
        raise StartError(
            "libseccomp's Python binding is missing (Debian: apt-get install python3-seccomp; "
            "Fedora: dnf install python3-libseccomp; pip: pip install pyseccomp)"
        )


def core_identity(user: str) -> tuple[int, int] | None:
    """(uid, gid) the core switches to, or None when it stays who it is (rootless; also
    rootless podman, whose hooks run as uid 0 of the user's own namespace). Raises
    StartError for a user this host does not have."""
    from .config import host_uid  # noqa: PLC0415 - only the supervisor needs it

    if host_uid(os.geteuid()) != 0:
        return None
    import pwd  # noqa: PLC0415

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartError(f"core_user {user!r} (config) is no user on this host") from None
    if entry.pw_uid == 0:
        raise StartError(f"core_user {user!r} (config) is root; name an unprivileged user")
    return entry.pw_uid, entry.pw_gid


def limit_supervisor(driver: str) -> None:
    """Keep only what starting the core (and the driver's program) again needs."""
    from . import procctl  # noqa: PLC0415

    keep = SUPERVISOR_CAPS if driver == "builtin" else EXTERNAL_DRIVER_CAPS
    _limit_bounding_set(keep)
    _limit_capabilities(keep)
    procctl.set_no_new_privs()


def drop_core(identity: tuple[int, int] | None) -> None:
    """Everything: no capabilities, no way back to them, rootful another user."""
    from . import procctl  # noqa: PLC0415

    if _has_setpcap():
        # uid 0 (rootless podman's) gets no capabilities back from exec or a setuid(0).
        procctl.set_securebits(procctl.get_securebits() | SECBITS_NOROOT_LOCKED)
    _limit_bounding_set(frozenset())
    if identity is not None:
        uid, gid = identity
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # clears the permitted and effective sets (no keep-caps)
        # A change of credentials clears the parent-death signal: set it again, and go if
        # the supervisor died meanwhile (fork_child's reasoning).
        procctl.set_pdeathsig(SIGKILL)
        if os.getppid() == 1:
            os._exit(1)
    _limit_capabilities(frozenset())
    procctl.set_no_new_privs()


def drop_dialer() -> None:
    """Inside the container's namespaces: keep CAP_NET_ADMIN only."""
    from . import procctl  # noqa: PLC0415

    _limit_bounding_set(DIALER_CAPS)
    _limit_capabilities(DIALER_CAPS)
    procctl.set_no_new_privs()


# <linux/prctl.h>: python-prctl 1.8.1 has no ambient capabilities.
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2


def keep_net_admin_across_exec() -> None:
    """CAP_NET_ADMIN into the inheritable and ambient sets, so that it survives the exec of
    the native dialer also where this process is not uid 0 of its user namespace (a rootful
    container with a user namespace does not map host root: exec would drop every
    capability). The native dialer clears both again at once (hook/native/portfwd-dialer.c)."""
    import ctypes  # noqa: PLC0415 - only in the dialer, right before its exec

    from . import procctl  # noqa: PLC0415

    if not procctl.has_cap(CAP_NET_ADMIN, procctl.PERMITTED):
        return
    procctl.set_caps((procctl.INHERITABLE, [CAP_NET_ADMIN], True))
    # CDLL(None): libc is loaded already; the arguments are unsigned long in prctl(2).
    libc = ctypes.CDLL(None, use_errno=True)
    arg = ctypes.c_ulong
    if libc.prctl(PR_CAP_AMBIENT, arg(PR_CAP_AMBIENT_RAISE), arg(CAP_NET_ADMIN), arg(0), arg(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"raising CAP_NET_ADMIN into the ambient set: {os.strerror(err)}")


# SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | its lock | KEEP_CAPS_LOCKED
SECBITS_NOROOT_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one in Linux 6.x


def _has_setpcap() -> bool:
    from . import procctl  # noqa: PLC0415

    return procctl.has_cap(CAP_SETPCAP, procctl.EFFECTIVE)


def _limit_bounding_set(keep: frozenset[int]) -> None:
    """Drop every other capability from the bounding set; needs CAP_SETPCAP (rootless in
    the host's user namespace there is none: the set stays, and grants nothing)."""
    from . import procctl  # noqa: PLC0415

    if not _has_setpcap():
        return
    for cap in range(_last_cap() + 1):
        if cap not in keep and procctl.in_bounding_set(cap):
            procctl.drop_from_bounding_set(cap)


def _limit_capabilities(keep: frozenset[int]) -> None:
    """Permitted and effective to `keep` (what we have of it), inheritable and with it the
    ambient set to nothing."""
    from . import procctl  # noqa: PLC0415

    every = procctl.ALL_CAPS  # the ones python-prctl knows (it refuses others)
    held = {cap for cap in keep if procctl.has_cap(cap, procctl.PERMITTED)}
    dropped = [cap for cap in every if cap not in held]
    procctl.set_caps(
        (procctl.PERMITTED, dropped, False),
        (procctl.EFFECTIVE, dropped, False),
        (procctl.INHERITABLE, every, False),
    )
    if held:
        procctl.set_caps((procctl.EFFECTIVE, sorted(held), True))
