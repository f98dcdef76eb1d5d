"""Plumbing of the benchmark: processes by pid, a cleanup stack, netns, free ports, readiness.

Everything the benchmark creates registers its own undo on the Cleanup stack right after it is
made; the stack runs in reverse on any exit (normal, exception, SIGINT, SIGTERM). Processes are
only ever ended by pid, and only when (pid, start time) still names the process we started.
"""

import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# What a hook's cost is measured against: a hook that reads the state the runtime writes to its
# stdin, as every hook must, and exits. Not /bin/true: crun writes the state after the fork, and
# a hook that has exited before that write kills crun with SIGPIPE (a `crun delete -f` ended with
# exit -13 in one make bench, and the bench with it).
BASELINE_HOOK = "/bin/dd"
BASELINE_HOOK_ARGS = ["dd", "of=/dev/null", "status=none"]
BASELINE_LABEL = "dd of=/dev/null"


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> "Proc | None":
        st = _stat(pid)
        return None if st is None else cls(pid, int(st[19]))

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and int(st[19]) == self.start_time and st[0] not in ("Z", "X")

    def comm(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/comm").read_text().strip()
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def _all_procs() -> dict[int, list[Proc]]:
    """One pass over /proc: parent pid -> its children."""
    by_parent: dict[int, list[Proc]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                by_parent.setdefault(int(st[1]), []).append(Proc(int(entry.name), int(st[19])))
    return by_parent


def tree(pid: int) -> list[Proc]:
    """The process and all its descendants (those alive now)."""
    root = Proc.of(pid)
    if root is None:
        return []
    by_parent = _all_procs()
    result, todo = [root], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            result.append(child)
            todo.append(child.pid)
    return result


def kill_procs(procs: list[Proc], grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL what is left. Only these exact processes."""
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.signal(signal.SIGKILL)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among their users (fair for forked peers)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime, in clock ticks."""
    st = _stat(pid)
    if st is None:
        return 0
    return sum(int(x) for x in st[11:15])


CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- cleanup


class Cleanup:
    """A LIFO stack of undo actions; each runs once, errors are reported and skipped."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, object, object]] = []

    def push(self, what: str, fn) -> object:
        token = object()
        self._stack.append((what, fn, token))
        return token

    def pop(self, token: object) -> None:
        """Run one action now (and forget it)."""
        for i, (what, fn, t) in enumerate(self._stack):
            if t is token:
                del self._stack[i]
                self._run(what, fn)
                return

    def run_all(self) -> None:
        while self._stack:
            what, fn, _ = self._stack.pop()
            self._run(what, fn)

    @staticmethod
    def _run(what: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            print(f"bench: cleanup of {what} failed: {exc}", flush=True)


def work_dir(cleanup: Cleanup, prefix: str) -> Path:
    """A fresh directory for a bench script's files, removed by `cleanup`; 0755: the bench user
    (rootlesskit, ours rootless) reads the server binary and bundles under it."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    cleanup.push(f"workdir {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    return work


def root_session(prog: str, prefix: str) -> tuple[Cleanup, Path] | None:
    """What a bench script that starts forwarders does first: as root only (None, said on
    stderr, otherwise), more descriptors, signals as exceptions (so that the cleanup runs), an
    undo stack and a work dir on it."""
    if os.geteuid() != 0:
        print(f"{prog}: run as root (crun, netns, veth)", file=sys.stderr)
        return None
    raise_nofile()
    signals_to_exceptions()
    cleanup = Cleanup()
    return cleanup, work_dir(cleanup, prefix)


def signals_to_exceptions() -> None:
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- commands


class CommandLog:
    """Every command the benchmark runs, for RESULTS.md ('the exact commands')."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[str]] = {}

    def note(self, key: str, argv: list[str] | str) -> None:
        text = argv if isinstance(argv, str) else shlex.join(str(a) for a in argv)
        self.by_key.setdefault(key, [])
        if text not in self.by_key[key]:
            self.by_key[key].append(text)


def start(cleanup: Cleanup, argv: list[str], log: Path, what: str, **kwargs) -> subprocess.Popen:
    """Start a long-running process, output to `log`; its whole tree is killed at cleanup."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                **kwargs)
    me = Proc.of(proc.pid)

    def stop() -> None:
        if me is not None and me.alive():
            kill_procs(tree(proc.pid))
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    cleanup.push(f"{what} (pid {proc.pid})", stop)
    return proc


def run(argv: list[str], timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    res = subprocess.run(argv, timeout=timeout, check=False, **kwargs)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or '')[-800:]}{(res.stdout or '')[-400:]}")
    return res


def run_timed(argv: list[str], out, timeout: float = 60) -> tuple[int, float]:
    """(exit code, wall seconds) of a command whose output goes to `out` (a file or DEVNULL).
    Not subprocess.run(timeout=…) for a timing: its wait polls with sleeps growing to 50 ms,
    which rounds every figure up to the next such step. A pidfd wakes us at the exit itself."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            proc.kill()
        elapsed = time.perf_counter() - t0
    finally:
        os.close(pidfd)
    return proc.wait(), elapsed


# ---------------------------------------------------------------- network


def free_port(taken: set[int]) -> int:
    """A port free for TCP and UDP on 127.0.0.1 (and not handed out before in this run)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in taken or port < 20000:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken.add(port)
        return port
    raise RuntimeError("no free port found")


class Netns:
    """A named network namespace (ip netns) with lo up, deleted at cleanup."""

    def __init__(self, cleanup: Cleanup, cmdlog: CommandLog, key: str) -> None:
        self.name = f"pfbench-{uuid.uuid4().hex[:8]}"
        self.path = f"/run/netns/{self.name}"
        run(["ip", "netns", "add", self.name])
        cmdlog.note(key, ["ip", "netns", "add", "NAME"])
        cleanup.push(f"netns {self.name}", lambda: run(["ip", "netns", "del", self.name], check=False))
        run(self.prefix() + ["ip", "link", "set", "lo", "up"])

    def prefix(self) -> list[str]:
        # nsenter, not `ip netns exec` (which remounts /sys).
        return ["nsenter", f"--net={self.path}"]


def tcp_sockets(pid: int):
    """The rows of /proc/PID/net/tcp and tcp6 (the network namespace of process `pid`), split
    into fields: [sl, local, remote, state, ...], addresses as hex ADDR:PORT."""
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3:
                yield fields


def listening(pid: int, port: int) -> bool:
    """Does something listen on TCP `port` in the network namespace of process `pid`?"""
    want = f":{port:04X} "
    return any((f[1][-5:] + " ") == want and f[3] == "0A" for f in tcp_sockets(pid))


def wait_for(cond, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False
