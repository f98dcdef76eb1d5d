"""Is this process in the host's network namespace, where the ports must be published?

Rootless Docker (dockerd-rootless.sh) and rootless nerdctl run the engine inside rootlesskit:
a user namespace of the user's, and a network namespace made inside it that reaches the host
through slirp4netns, vpnkit or pasta. runc runs hooks there too, as uid 0 of that user
namespace: a port the hook bound would live in rootlesskit's namespace, where no client on
the host reaches it (the engine's own -p goes through rootlesskit's port driver for that).
Rootless podman is different and fine: it runs hooks in its user namespace but in the host's
network namespace.

The test: in a user namespace other than the initial one, ask the kernel who owns our network
namespace (ioctl NS_GET_USERNS). It answers only when the owner is our user namespace or one
below it, and refuses (EPERM) an ancestor's, such as the host's: an answer means the network
namespace was made inside our user namespace, so it is not the host's.
"""

from __future__ import annotations

import os

from .errors import NamespaceError

NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h
INITIAL_UID_MAP = ["0", "0", "4294967295"]


def in_initial_user_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    try:
        with open(uid_map) as f:
            return f.read().split() == INITIAL_UID_MAP
    except OSError:
        return True  # no user namespaces at all


def netns_made_in_our_user_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    if in_initial_user_namespace(uid_map):
        return False
    import fcntl  # noqa: PLC0415 - only in a user namespace

    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        return False  # EPERM: owned by an ancestor (the host's); ENOTTY: a kernel without it
    finally:
        os.close(fd)
    os.close(owner)
    return True


def refuse_unless_host_netns(uid_map: str = "/proc/self/uid_map") -> None:
    if netns_made_in_our_user_namespace(uid_map):
        raise NamespaceError(
            "this runs in a network namespace made inside its own user namespace (rootless Docker "
            "or nerdctl: rootlesskit's), not in the host's; ports bound here would not be "
            "reachable from the host, so none are published: use the engine's own -p there, or "
            "rootless podman/runc/crun with this hook"
        )
