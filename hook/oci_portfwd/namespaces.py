"""Joining a container's namespaces (user when it differs from ours, then net).

Python 3.11 has no os.setns, so libc's is called through ctypes. pyroute2's netns.setns
joins only network namespaces, and a rootless container needs its user namespace first.
"""

from __future__ import annotations

import errno
import os
import time

from .errors import ContainerGone, NamespaceError
from .forking import fork_child

# typing costs ~5 ms to import on the container's start path; annotations need it only
# for the type checker, which treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000


def setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    import ctypes  # noqa: PLC0415 - the fallback for Python < 3.12 only

    # CDLL(None): the symbols already loaded in this process, libc's among them.
    # ctypes.util.find_library("c") would run ldconfig -p on every container start.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def shares_our_netns(pid: int, bundle_namespaces: Callable[[], list[Any] | None]) -> bool:
    """Whether the container's process lives in our network namespace (the runtime's, since
    hooks run in it: the host's, rootless too). Forwarding there would forward into itself.

    Rootless crun makes /proc/PID/ns/* unreadable until the container exec'd (EACCES at
    prestart): then the bundle's linux.namespaces says the same: no network namespace, or
    a path to ours, means ours.
    """
    ours = os.stat("/proc/self/ns/net")
    try:
        return same_file(os.stat(f"/proc/{pid}/ns/net"), ours)
    except FileNotFoundError:
        return False  # the container is gone: its start fails further on, with that reason
    except PermissionError:
        pass
    namespaces = bundle_namespaces()
    if namespaces is None:
        return False  # nothing to tell by; the dialer refuses our own netns anyway
    network = [ns for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "network"]
    if not network:
        return True
    path = network[0].get("path")
    if not isinstance(path, str) or not path:
        return False
    try:
        return same_file(os.stat(path), ours)
    except OSError:
        return False


def open_namespaces(
    pid: int, deadline: float, on_wait: Callable[[], None] | None = None
) -> tuple[int | None, int]:
    """Open /proc/PID/ns/{user,net}; the user one is None when it is already ours.

    Rootless crun makes the files readable only once the container has exec'd, which is
    after the prestart hook has exited (EACCES before): retry until `deadline`, telling
    `on_wait` once so that the hook need not wait for it.
    """
    while True:
        try:
            return _open_namespaces(pid)
        except PermissionError:
            if on_wait is not None:
                on_wait()
                on_wait = None
            if time.monotonic() >= deadline:
                raise NamespaceError(
                    f"cannot open the namespaces of container pid {pid}: permission denied"
                ) from None
            time.sleep(0.01)
        except FileNotFoundError:
            raise ContainerGone(f"container process {pid} is gone") from None


def _open_namespaces(pid: int) -> tuple[int | None, int]:
    net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        theirs = os.stat(f"/proc/{pid}/ns/user")
        ours = os.stat("/proc/self/ns/user")
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            return None, net_fd
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC), net_fd
    except BaseException:
        os.close(net_fd)
        raise


def join_container(pid: int, deadline: float, on_wait: Callable[[], None] | None = None) -> None:
    """Enter the container's network namespace (after its user namespace if rootless).

    Must run in a single-threaded process: the kernel refuses setns(CLONE_NEWUSER) otherwise.
    """
    user_fd, net_fd = open_namespaces(pid, deadline, on_wait)
    try:
        enter(user_fd, net_fd, f"container pid {pid}")
    finally:
        for fd in (user_fd, net_fd):
            if fd is not None:
                os.close(fd)


def enter(user_fd: int | None, net_fd: int, whose: str) -> None:
    if user_fd is not None:
        try:
            setns(user_fd, CLONE_NEWUSER)
        except OSError as e:
            raise NamespaceError(f"cannot join the user namespace of {whose}: {e.strerror}") from None
    try:
        setns(net_fd, CLONE_NEWNET)
    except OSError as e:
        hint = " (rootless: the user namespace must be joined first)" if e.errno == errno.EPERM else ""
        raise NamespaceError(f"cannot join the network namespace of {whose}: {e.strerror}{hint}") from None


def run_inside(user_fd: int | None, net_fd: int, whose: str, action: Callable[[], None]) -> None:
    """Run `action` in a forked child that joined the namespaces; raise if it failed.
    The caller stays where it is (a process holding host sockets never joins)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)

    def child() -> int:
        os.close(read_fd)
        try:
            enter(user_fd, net_fd, whose)
            action()
        except Exception as e:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, str(e).encode()[:4000])
            return 1
        return 0

    pid = fork_child(child)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NamespaceError(message or f"a helper in the namespaces of {whose} failed")
