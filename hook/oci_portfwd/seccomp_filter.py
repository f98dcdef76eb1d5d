"""Seccomp allow-lists for the core and the dialer (libseccomp), and how a violation is named.

    supervisor ── CoreSandbox (a socketpair per core) ──▶ core
    core: drop privileges (privileges.py), load the allow-list with "notify" as the default
          action, send the filter's listener fd up the socketpair, close its own copy, serve
    a forbidden call: the kernel stops the core in it and queues (pid, syscall number) on the
          listener; the supervisor reads it, logs the syscall's name with the core's death,
          kills the core and restarts it, as after any crash

Why not SECCOMP_RET_TRAP and a SIGSYS handler: a Python handler runs later, between bytecodes,
after the C-level handler has returned into the trapped call, which then "returns" its own
syscall number (the kernel rolls the registers back) to code that takes it for a result; and
Python's handlers never see siginfo's si_syscall. KILL_PROCESS names nothing to anyone (the
kernel's audit log has it, for root). A user-notification listener is read by another
process, which sees the number and decides. The core must not keep the listener: whoever holds
it can let a call through.

The dialer's filter kills it (KILL_PROCESS): the core sees its dialer gone, exits, and the
supervisor restarts both.

Library: libseccomp's binding, Debian's python3-seccomp (module `seccomp`) or, from PyPI,
pyseccomp (ctypes, the same API). Everything the core uses later must be imported before the
filter is loaded: an import opens files, and openat is not on the list.
"""

from __future__ import annotations

import _signal  # not signal, socket: their enums are memory of every container (issue 12)
import _socket
import errno
import fcntl
import os
import select
import struct
import sys
from types import ModuleType

from .fdpass import recv_fds, send_fds
from .privileges import drop_core

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import Any

# <linux/seccomp.h>: _IOWR('!', 0, struct seccomp_notif), a struct of 80 bytes:
# u64 id; u32 pid; u32 flags; struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
NOTIF_SIZE = 80
FIONBIO, FIONCLEX, FIOCLEX = 0x5421, 0x5450, 0x5451
PROT_EXEC = 0x4

# Test switch: with this set (to anything) in the environment, signal SIGRTMIN+N makes a
# sandboxed core or dialer attempt PROBES[N] once (tests/e2e/test_privileges.py); unset,
# nothing is installed and no test code runs.
PROBE_ENV = "OCI_PORTFWD_TEST_SANDBOX_PROBE"
PROBES = ("open", "exec", "ptrace", "socket", "raise")  # raise: a bug's traceback still works

# The core once it serves: epoll, sockets it was handed or accepted (UDP's in batches), splice through pipes,
# lines to the supervisor and the log. No open, no exec, no socket(), no kill, no ptrace.
CORE_SYSCALLS = (
    "read", "write", "readv", "writev", "close", "fcntl", "lseek",
    "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll",
    "accept", "accept4", "connect", "bind", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "sendto", "recvfrom", "sendmsg", "recvmsg",
    "recvmmsg", "sendmmsg",  # UDP in batches (udp_batch.c)
    "splice", "pipe2",
    "brk", "munmap", "mremap", "madvise",
    "futex", "getpid", "gettid", "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
    "sched_yield", "rt_sigreturn", "rt_sigprocmask", "restart_syscall", "exit", "exit_group",
)
# The dialer once it has joined: make sockets, pass them on.
DIALER_SYSCALLS = (
    "read", "write", "close", "fcntl", "getsockopt", "setsockopt",
    "sendto", "recvfrom", "sendmsg", "recvmsg",
    "brk", "munmap", "mremap", "madvise",
    "futex", "getpid", "gettid", "clock_gettime",
    "rt_sigreturn", "rt_sigprocmask", "restart_syscall", "exit", "exit_group",
)

# The native dialer's loop (hook/native/portfwd-dialer.c, exec'd by the Python dialer, which
# exports this filter for it): read a request, make sockets (socket() only for AF_INET and
# AF_INET6), set their options, send them, close them; one line on stderr (fd 2 only) and
# exit on an error. rt_sigreturn and restart_syscall for a signal's handler (the test
# probes). Nothing else: no memory calls (it allocates nothing), no ioctl, no tgkill.
NATIVE_DIALER_SYSCALLS = (
    "recvfrom", "sendmsg", "setsockopt", "close",
    "rt_sigreturn", "restart_syscall", "exit", "exit_group",
)

# The relay threads in C (hook/native/portfwd_relay.c, native_relay.py), loaded by each
# thread itself before it relays: epoll (the pairs are added to its set by the core's
# add()), recv/send and splice through pipes of its own (pipe2, fcntl for their size, write
# for what a full destination does not take), the options a relay sets, the report it
# writes when it stops, and its end. Memory for pairs: mmap, never executable (it does not
# use malloc); rt_sigprocmask, munmap and madvise for the thread's own exit (glibc blocks
# signals, frees the stack), futex for the semaphore it posts once started and the socket
# pool's lock, sched_yield while add() arms a pair whose first socket is already in its set;
# accept4, bind and connect for the listeners given to the threads (native_relay.listen),
# whose connections they accept and dial themselves. A forbidden call kills the process (as
# in the dialer): the core is restarted.
RELAY_SYSCALLS = (
    "accept4", "bind", "connect",  # the listeners given to the threads (native_relay.listen)
    "write", "close", "fcntl", "epoll_wait", "epoll_pwait", "epoll_ctl",
    "recvfrom", "sendto", "splice", "pipe2", "shutdown", "setsockopt",
    "rt_sigprocmask", "munmap", "madvise", "futex", "sched_yield",
    "rt_sigreturn", "restart_syscall", "exit", "exit_group",
)


SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _library() -> ModuleType:
    try:
        import seccomp  # noqa: PLC0415 - Debian's python3-seccomp (C, imports in <1 ms)
    except ImportError:
        pass
    else:
        return seccomp
    loaded = sys.modules.get("pyseccomp")
    if loaded is not None:
        return loaded
    # pyseccomp (PyPI, the same API through ctypes) looks its libraries up with
    # ctypes.util.find_library, which imports subprocess & co. (1.6 MB per process) and runs
    # `ldconfig -p` twice (~15 ms, two fork+execs). Their sonames are fixed on Linux: it gets
    # a ctypes.util that knows just those, for the time of its import.
    util = ModuleType("ctypes.util")
    util.find_library = SONAMES.get  # type: ignore[attr-defined]
    if "typing" not in sys.modules:
        # typing, with re, enum, collections and functools, is ~2 MB of every forwarded
        # container (issue 12), for annotations that pyseccomp 0.1.2 only has Python evaluate.
        try:
            return _import_pyseccomp({"ctypes.util": util, "typing": _typing_stand_in()})
        except Exception:  # noqa: BLE001 - a pyseccomp that asks typing for more: the real one
            pass
    return _import_pyseccomp({"ctypes.util": util})


def _import_pyseccomp(stand_ins: dict[str, ModuleType]) -> ModuleType:
    """import pyseccomp with `stand_ins` in sys.modules for the time of its import."""
    import ctypes  # noqa: PLC0415

    real = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    ctypes.util = stand_ins["ctypes.util"]  # type: ignore[attr-defined]
    try:
        import pyseccomp  # noqa: PLC0415
    finally:
        for name, module in real.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
        if real["ctypes.util"] is None:
            del ctypes.util  # type: ignore[attr-defined]
        else:
            ctypes.util = real["ctypes.util"]  # type: ignore[attr-defined]
    return pyseccomp


class _Annotation:
    """typing's generics as pyseccomp's annotations use them (Union[int, str], Iterable[int]):
    evaluated when its functions are defined, never read."""

    def __getitem__(self, _args: object) -> _Annotation:
        return self


def _typing_stand_in() -> ModuleType:
    """What pyseccomp 0.1.2 imports from typing: Any, Collection, Iterable, Union (annotations),
    cast (returns its value, as typing's does) and overload (the definition that follows wins)."""
    stand_in = ModuleType("typing")
    for name in ("Any", "Collection", "Iterable", "Union"):
        setattr(stand_in, name, _Annotation())
    stand_in.cast = lambda _type, value: value  # type: ignore[attr-defined]
    stand_in.overload = lambda function: function  # type: ignore[attr-defined]
    return stand_in


def _only(lib: ModuleType, default: int, names: tuple[str, ...]) -> Any:
    """A filter that allows `names` and gives everything else `default`."""
    f = lib.SyscallFilter(default)
    f.set_attr(lib.Attr.ACT_BADARCH, lib.KILL_PROCESS)  # x32 / i386 entry points
    for name in names:
        f.add_rule(lib.ALLOW, name)
    return f


def _allow_inet_sockets(lib: ModuleType, f: Any) -> None:
    for family in (_socket.AF_INET, _socket.AF_INET6):
        f.add_rule(lib.ALLOW, "socket", lib.Arg(0, lib.EQ, family))


def _allow_list(lib: ModuleType, default: int, names: tuple[str, ...]) -> Any:
    """_only, plus what a CPython process needs around `names`."""
    f = _only(lib, default, names)
    _allow_memory(lib, f, ("mmap", "mprotect"))
    # Python's setblocking() and set_inheritable() use ioctl: those requests only.
    for request in (FIONBIO, FIONCLEX, FIOCLEX):
        f.add_rule(lib.ALLOW, "ioctl", lib.Arg(1, lib.EQ, request))
    # abort() signals itself: only itself.
    f.add_rule(lib.ALLOW, "tgkill", lib.Arg(0, lib.EQ, os.getpid()))
    return f


def _allow_memory(lib: ModuleType, f: Any, names: tuple[str, ...]) -> None:
    """Memory, but never executable memory: no code of its own for an attacker."""
    for name in names:
        f.add_rule(lib.ALLOW, name, lib.Arg(2, lib.MASKED_EQ, PROT_EXEC, 0))


def _notify_fd(lib: ModuleType, f: object) -> int:
    get = getattr(f, "get_notify_fd", None)
    if get is not None:
        return int(get())
    # pyseccomp 0.1.2 wraps seccomp_notify_fd() but does not export it.
    return int(lib._libseccomp.seccomp_notify_fd(f._filter))  # type: ignore[attr-defined]  # noqa: SLF001


class CoreSandbox:
    """One per core: made by the supervisor before the fork, entered by the core once it
    serves, read by the supervisor while the core lives."""

    def __init__(self, identity: tuple[int, int] | None) -> None:
        self.identity = identity
        self.ours, self.theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        self.listener = -1
        self.violation: str | None = None

    @classmethod
    def across_exec(cls, identity: tuple[int, int] | None, *, theirs: int = -1, listener: int = -1) -> CoreSandbox:
        """The sandbox in a process exec'd since the pair was made: the core's side in its own
        interpreter (core_process.py: `theirs`, inherited), or the supervisor's back from the
        keeper (supervisor.resume: the seccomp `listener`). A socket it does not hold is a
        closed one."""
        sandbox = cls.__new__(cls)
        sandbox.identity = identity
        sandbox.ours = _closed_socket()
        sandbox.theirs = _socket.socket(fileno=theirs) if theirs >= 0 else _closed_socket()
        sandbox.listener = listener
        sandbox.violation = None
        return sandbox

    # the core's side
    def in_child(self) -> None:
        self.ours.close()

    def enter(self, dropped: Callable[[], None] | None = None) -> None:
        """Drop every privilege, load the filter, hand the listener up. After this the core
        can only use what it holds; a forbidden call ends it. `dropped` runs in between,
        with the privileges gone and the filter not yet loaded (the relay thread starts
        there: a thread inherits its creator's credentials but not a filter loaded later)."""
        _keep_pages_shared()
        lib = _library()
        if os.environ.get(PROBE_ENV):
            _install_probes()
        _no_source_lines()
        f = _allow_list(lib, lib.NOTIFY, CORE_SYSCALLS)
        drop_core(self.identity)
        if dropped is not None:
            dropped()
        f.load()
        listener = _notify_fd(lib, f)
        send_fds(self.theirs, [b"L"], [listener])
        os.close(listener)
        self.theirs.close()

    # the supervisor's side
    def in_parent(self) -> None:
        self.theirs.close()

    def fds(self) -> list[int]:
        return [fd for fd in (self.ours.fileno(), self.listener) if fd >= 0]

    def on_readable(self, readable: Collection[int], core_pidfd: int) -> str | None:
        """Take the listener when it comes; on a violation kill the core and return the
        syscall's name (also kept in `violation`)."""
        if self.ours.fileno() in readable:
            try:
                _, fds, _, _ = recv_fds(self.ours, 16, 1, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                fds = []
            except OSError:
                fds = []
            if fds and self.listener < 0:
                self.listener = fds[0]
            elif not fds:
                self.ours.close()  # the core is gone, or has sandboxed itself: done here
        if self.listener >= 0 and self.listener in readable:
            name = self._receive(core_pidfd)
            if name is not None:
                self.violation = name
                try:
                    _signal.pidfd_send_signal(core_pidfd, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return name
        return None

    def _receive(self, core_pidfd: int) -> str | None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(core_pidfd, select.POLLIN)
        events = dict(poller.poll(0))
        mine, dead = events.get(self.listener, 0), core_pidfd in events
        if mine & select.POLLHUP or not mine & select.POLLIN or dead:
            # No notification to read (the core exited): the ioctl would block.
            os.close(self.listener)
            self.listener = -1
            return None
        buf = bytearray(NOTIF_SIZE)
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise
        _id, _pid, _flags, nr, arch = struct.unpack_from("=QIIii", buf)
        return syscall_name(arch, nr)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()
        if self.listener >= 0:
            os.close(self.listener)
            self.listener = -1


def _closed_socket() -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    sock.close()
    return sock


def syscall_name(arch: int, nr: int) -> str:
    try:
        name = _library().resolve_syscall(arch, nr)
    except (ValueError, OSError, OverflowError):
        return f"#{nr}"
    return name.decode() if isinstance(name, bytes) else str(name)


def sandbox_dialer() -> None:
    """The dialer's allow-list; a forbidden call kills it (the core then exits to be
    restarted with a new dialer). Privileges are dropped first (privileges.drop_dialer)."""
    _keep_pages_shared()
    lib = _library()
    if os.environ.get(PROBE_ENV):
        _install_probes()
    _no_source_lines()
    f = _allow_list(lib, lib.KILL_PROCESS, DIALER_SYSCALLS)
    _allow_inet_sockets(lib, f)
    f.load()


def export_native_dialer(fd: int) -> None:
    """Write the native dialer's filter to `fd` as BPF (libseccomp's export: what
    `load()` would give the kernel) and close it; the program loads it after its own setup.
    A forbidden call kills it, as the Python dialer's filter does."""
    with open(fd, "wb") as out:
        lib = _library()
        f = _only(lib, lib.KILL_PROCESS, NATIVE_DIALER_SYSCALLS)
        f.add_rule(lib.ALLOW, "write", lib.Arg(0, lib.EQ, 2))
        _allow_inet_sockets(lib, f)
        f.export_bpf(out)


def relay_filter() -> bytes:
    """The relay threads' allow-list as BPF (what `load()` would give the kernel)."""
    lib = _library()
    f = _only(lib, lib.KILL_PROCESS, RELAY_SYSCALLS)
    _allow_memory(lib, f, ("mmap",))
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with open(w, "wb", closefd=True) as out:  # a few hundred bytes: the pipe holds them
            f.export_bpf(out)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(r)


def _keep_pages_shared() -> None:
    # The imports below run the garbage collector, whose full passes write into every object
    # the process inherited from its parent: the pages it shares with the supervisor would be
    # copied. Frozen objects are never scanned (issue 12: the same before every fork).
    import gc  # noqa: PLC0415

    gc.freeze()


def _no_source_lines() -> None:
    """Tracebacks without source lines: reading a frame's source file is an openat, which the
    filter forbids and which would end the process before the traceback is written. A bug in
    fork_child's body goes through logs.format_exception already; this covers what the
    interpreter prints by itself (an uncaught exception, one in a __del__)."""
    from .logs import format_exception  # noqa: PLC0415

    def write(text: str) -> None:
        try:
            os.write(2, text.encode(errors="replace"))
        except OSError:
            pass

    def excepthook(_kind: object, value: BaseException, _tb: object) -> None:
        write(format_exception(value))

    def unraisablehook(unraisable: sys.UnraisableHookArgs) -> None:
        where = f"Exception ignored in: {unraisable.object!r}\n"
        write(where + (format_exception(unraisable.exc_value) if unraisable.exc_value else ""))

    sys.excepthook = excepthook
    sys.unraisablehook = unraisablehook
    linecache = sys.modules.get("linecache")
    if linecache is not None:  # a library loaded it: its callers must not read sources either

        def no_lines(filename: str, module_globals: object = None) -> list[str]:
            return []

        linecache.updatecache = no_lines  # type: ignore[attr-defined]


def _install_probes() -> None:
    """Tests only: SIGRTMIN+N → attempt forbidden call PROBES[N] (each must end the process)."""
    import ctypes  # noqa: PLC0415 - loaded now: an import after the filter would be a violation

    ptrace = ctypes.CDLL(None, use_errno=True).ptrace
    supervisor = os.getppid()

    def attempt(signum: int, _frame: object) -> None:
        probe = PROBES[signum - _signal.SIGRTMIN]
        if probe == "open":
            with open("/etc/hostname", "rb") as f:
                f.read()
        elif probe == "exec":
            os.execv("/bin/true", ["true"])
        elif probe == "ptrace":
            ptrace(16, supervisor, None, None)  # PTRACE_ATTACH
        elif probe == "socket":
            _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).close()
        elif probe == "raise":
            raise RuntimeError("sandbox probe: a bug")
        print(f"sandbox probe {probe}: the call was allowed", flush=True)

    for n in range(len(PROBES)):
        _signal.signal(_signal.SIGRTMIN + n, attempt)
