"""The supervisor: a detached process that holds the host listeners for the container's
whole life, runs the driver's core as its child and restarts it when it dies.

    hook ─fork─▶ (setsid) ─fork─▶ supervisor ─fork─▶ core ─fork─▶ dialer
                     exits          │ pidfd on the container's init: gone → tear down
                                    │ SIGTERM (poststop) → tear down
                                    └ core died → restart with backoff; the listeners stay
                                      open here, so clients queue instead of being refused
"""

from __future__ import annotations

import _signal as signal  # signal's enums (~2 ms with enum) are off the hook's path
import os
import sys
import time

from .errors import NamespaceError, StartError, StateDirError
from .forking import fork_child
from .logs import HookLog
from .polling import wait_readable
from .privileges import check_seccomp_binding, core_identity, limit_supervisor
from .procfs import children, close_fds_except, process_start_time
from .statefile import Record, counters_path, record_path, remove_record, write_record
from .stats import counters_file, forget_open
from .status import StatusReader, StatusWriter

# The hook imports this module and the supervisor runs in the hook's image until it says
# ready: what it needs besides is imported after that, and no dataclasses or logging at all;
# the core runs in an interpreter of its own (core_process.py), and once it serves this
# process execs portfwd-keeper (issue 12).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from .drivers import Driver
    from .listeners import Listener
    from .plan import Plan
    from .seccomp_filter import CoreSandbox
    from .stats import Counters

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0  # a core that lived this long restarts without backoff
STOP_GRACE = 1.0
PYTHON_SUPERVISOR_ENV = "OCI_PORTFWD_PYTHON_SUPERVISOR"
HANDOVER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class Started:
    __slots__ = ("pid", "start_time")

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self.start_time = start_time


class Context:
    __slots__ = ("plan", "listeners", "driver", "state_dir", "log_path", "log_level", "annotations", "bundle")

    def __init__(
        self,
        plan: Plan,
        listeners: Sequence[Listener],
        driver: Driver,
        state_dir: str,
        log_path: str,
        log_level: str,
        # Where the engine's name for the container is found (names.py), for the state file.
        annotations: Mapping[str, str] | None = None,
        bundle: str | None = None,
    ) -> None:
        self.plan = plan
        self.listeners = listeners
        self.driver = driver
        self.state_dir = state_dir
        self.log_path = log_path
        self.log_level = log_level
        self.annotations: Mapping[str, str] = {} if annotations is None else annotations
        self.bundle = bundle


def launch(ctx: Context, log: HookLog) -> Started:
    """Detach the supervisor and wait until it says ready. Raises StartError."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)

    def intermediate() -> int:
        # setsid, then fork again and exit: the supervisor is no session leader and is
        # nobody's child but init's (or a subreaper's), so the runtime never waits for it.
        os.close(read_fd)
        os.setsid()
        # The supervisor outlives the hook and this intermediate process by design.
        fork_child(lambda: _supervisor_main(ctx, write_fd), die_with_parent=False)
        return 0

    pid = fork_child(intermediate, die_with_parent=False)
    os.close(write_fd)
    os.waitpid(pid, 0)
    try:
        return _await_ready(StatusReader(read_fd), ctx, log)
    finally:
        os.close(read_fd)


def _await_ready(reader: StatusReader, ctx: Context, log: HookLog) -> Started:
    # The supervisor enforces ready_timeout on the core; the margin covers its own start.
    deadline = time.monotonic() + ctx.plan.ready_timeout + 2.0
    started: Started | None = None
    try:
        while True:
            line = reader.read_line(deadline)
            if line is None:
                raise StartError(f"the forwarding supervisor exited before it was ready; see {ctx.log_path}")
            word, _, rest = line.partition(" ")
            if word == "pid":
                pid_text, _, start_text = rest.partition(" ")
                started = Started(int(pid_text), int(start_text))
            elif word == "ready" and started is not None:
                return started
            elif word == "error":
                raise StartError(rest)
    except TimeoutError:
        if started is not None and process_start_time(started.pid) == started.start_time:
            os.kill(started.pid, signal.SIGKILL)
        raise StartError(
            f"the forwarding did not come up within {ctx.plan.ready_timeout:g}s (ready_timeout); see {ctx.log_path}"
        ) from None


def _supervisor_main(ctx: Context, report_fd: int) -> int:
    keep = {report_fd} | {listener.sock.fileno() for listener in ctx.listeners}
    _detach_stdio(ctx.log_path)
    close_fds_except(keep)
    # One HookLog for the supervisor's whole life; the core inherits it (a fork).
    supervisor = Supervisor(ctx, StatusWriter(report_fd), HookLog(ctx.log_path, ctx.log_level, stderr=False))
    try:
        return supervisor.run()
    finally:
        supervisor.log.close()


def _detach_stdio(log_path: str) -> None:
    # The runtime waits for EOF on the hook's stdout/stderr: keep none of its pipes.
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


class Core:
    __slots__ = ("pid", "pidfd", "status", "started_at", "counts", "ready", "sandbox")

    def __init__(
        self,
        pid: int,
        pidfd: int,
        status: StatusReader,
        started_at: float,
        counts: Counters,
        sandbox: CoreSandbox | None = None,
    ) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.status = status
        self.started_at = started_at
        self.counts = counts
        self.ready = False
        self.sandbox = sandbox


class Supervisor:
    log: HookLog

    def __init__(self, ctx: Context, report: StatusWriter, log: HookLog) -> None:
        self.ctx = ctx
        self.plan = ctx.plan
        self.report = report
        self.log = log
        self.stop_reason: str | None = None
        # Between "ready" and the core's fork (builtin): a stop ends this process at once.
        self.quick_stop = False
        # The forwarding's traffic page (stats.py): every core counts into it.
        self.counts: Counters | None = None
        self.keeper = native_keeper()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.core_identity: tuple[int, int] | None = None

    def run(self) -> int:
        cid = self.plan.container_id
        # PR_SET_NAME, without loading python-prctl's C module before the hook may return.
        with open("/proc/self/comm", "w") as comm:
            comm.write(f"portfwd:{cid[:7]}")
        me = os.getpid()
        start_time = process_start_time(me)
        assert start_time is not None
        self.report.send(f"pid {me} {start_time}")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)

        try:
            container = os.pidfd_open(self.plan.container_pid)
        except ProcessLookupError:
            return self._fail(f"container process {self.plan.container_pid} is gone")
        # Least privilege: keep what restarting the core needs (privileges.py).
        try:
            self.core_identity = core_identity(self.plan.core_user)
            if self.plan.driver == "builtin":
                check_seccomp_binding()
        except StartError as e:
            return self._fail(str(e))
        if self.plan.driver == "builtin":
            return self._run_bound(container, me, start_time)
        self._settle()
        core = self._spawn_core()
        try:
            self._await_first_ready(core)
            self._write_first_record(me, start_time)
            # Lines that came with "ready" in the same read wait in the buffer.
            for line in core.status.lines():
                self._on_core_line(core, line)
        except (StartError, StateDirError, OSError) as e:
            self._stop_core(core)
            return self._fail(str(e))
        self.log.info(
            "forwarding %s for container %s (driver %s, core pid %d)",
            ", ".join(str(m) for m in self.plan.mappings),
            cid,
            self.plan.driver,
            core.pid,
        )
        self.report.ready()
        self.report.close()
        reason = self._watch(container, core)
        self.log.info("tearing down: %s", reason)
        self._teardown()
        return 0

    def _run_bound(self, container: int, me: int, start_time: int) -> int:
        """The builtin driver: the hook returns once the ports are bound and held here (issue
        12); the kernel queues connections until the core serves them. What could still fail
        the start is checked before: the container's namespaces can be opened (rootless crun's
        are not before it exec'd: deferred, as the core's dialer does), the state file is
        written. A core that fails later is logged (an error: poststop keeps the log) and
        restarted, as after any crash; the listeners stay open meanwhile."""
        from .namespaces import open_namespaces  # noqa: PLC0415

        deferred: list[bool] = []
        try:
            user_fd, net_fd = open_namespaces(self.plan.container_pid, 0.0, lambda: deferred.append(True))
        except NamespaceError as e:
            if not deferred:
                return self._fail(str(e))
        else:
            for fd in (user_fd, net_fd):
                if fd is not None:
                    os.close(fd)
        try:
            self._write_first_record(me, start_time)
        except (StateDirError, OSError) as e:
            return self._fail(str(e))
        self.log.info(
            "forwarding %s for container %s (driver %s): bound, starting the core",
            ", ".join(str(m) for m in self.plan.mappings),
            self.plan.container_id,
            self.plan.driver,
        )
        self.report.ready()
        self.report.close()
        # A delete right after the start (short-lived containers) must not wait for what
        # follows: the core's imports, ~20-30 ms of CPU. Nothing runs yet but
        # this process; the kernel closes the listeners with it.
        self.quick_stop = True
        if self.stop_reason is not None:
            self._stop_before_core()
        self._settle()
        self.quick_stop = False
        core = self._spawn_core()
        reason = self._watch(container, core)
        self.log.info("tearing down: %s", reason)
        self._teardown()
        return 0

    def _settle(self) -> None:
        """What the supervisor is for its long life, before it starts a core: the reaper of
        the core's orphans, not dumpable, and only the privileges that restarting the core
        needs (privileges.py). Builtin: after the hook has returned."""
        from . import procctl  # noqa: PLC0415

        procctl.set_child_subreaper()
        procctl.set_dumpable(False)
        limit_supervisor(self.plan.driver)

    def _write_first_record(self, me: int, start_time: int) -> None:
        from .names import container_name  # noqa: PLC0415 - only the supervisor needs it

        cid = self.plan.container_id
        self.record = Record(
            container_id=cid,
            name=container_name(cid, self.ctx.annotations, self.ctx.bundle),
            container_pid=self.plan.container_pid,
            supervisor_pid=me,
            supervisor_start_time=start_time,
            driver=self.plan.driver,
            ports=tuple(str(m) for m in self.plan.mappings),
            log=str(self.ctx.log_path),
            created=time.time(),
        )
        write_record(self.ctx.state_dir, self.record)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_reason = f"{_signal_name(signum)} received (poststop)"
        if self.quick_stop:
            self._stop_before_core()

    def _stop_before_core(self) -> None:
        """Teardown before the first core exists: no child to wait for; the state file goes,
        then this process, and the listeners with it. From the signal handler: it runs
        between two bytecodes of whatever was under way (an import)."""
        try:
            self.log.info("tearing down: %s (before the core started)", self.stop_reason)
        except (OSError, ValueError):
            pass  # the log cannot be written: the state file still goes
        remove_record(self.ctx.state_dir, self.plan.container_id, owner_pid=os.getpid())
        os._exit(0)

    def _fail(self, message: str) -> int:
        self.log.error("%s", message)
        # The ports first: the hook fails the start as soon as it reads the error, and a port
        # still bound for a moment after that is a retry's "address in use".
        for listener in self.ctx.listeners:
            listener.close()
        self.report.error(message)
        self._teardown()
        return 1

    # the core
    def _spawn_core(self) -> Core:
        from . import handover  # noqa: PLC0415
        from .seccomp_filter import CoreSandbox  # noqa: PLC0415 - after ready

        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        counters = counters_path(self.ctx.state_dir, self.plan.container_id)
        if self.counts is None:
            self.counts = counters_file(counters, fresh=True)
        counts = self.counts
        # The builtin core sandboxes itself once it serves; the external drivers' process
        # restarts its program and stays as privileged as the supervisor.
        sandbox = CoreSandbox(self.core_identity) if self.plan.driver == "builtin" else None

        prefix, path = sys.prefix, sys.path

        def core() -> int:
            # A fresh interpreter for the core (core_process.py): the fork keeps none of
            # this process's imports alive in the container's cost.
            os.close(status_r)
            listeners = [(listener.target, listener.sock.fileno()) for listener in self.ctx.listeners]
            given: dict[str, object] = {
                "supervisor": os.getppid(), "prefix": prefix, "plan": self.plan, "listeners": listeners,
                "log_path": self.ctx.log_path, "log_level": self.ctx.log_level,
                "status_fd": status_w, "counters": counters, "sandbox": None,
            }
            inherited = [status_w] + [fd for _, fd in listeners]
            if sandbox is not None:
                sandbox.in_child()
                given["sandbox"] = (sandbox.identity, sandbox.theirs.fileno())
                inherited.append(sandbox.theirs.fileno())
            for fd in inherited:
                os.set_inheritable(fd, True)
            fd = handover.write(given)
            os.execv(sys.executable, [
                sys.executable, "-IS", "-c",
                f"import sys; sys.path[:0] = {path!r}; from oci_portfwd.core_process import main; main({fd})",
            ])
            return 1

        pid = fork_child(core)
        os.close(status_w)
        if sandbox is not None:
            sandbox.in_parent()
        return Core(pid, os.pidfd_open(pid), StatusReader(status_r), time.monotonic(), counts, sandbox=sandbox)

    def _await_first_ready(self, core: Core) -> None:
        deadline = time.monotonic() + self.plan.ready_timeout
        while True:
            try:
                line = core.status.read_line(deadline)
            except TimeoutError:
                raise StartError(
                    f"the forwarding core did not become ready within {self.plan.ready_timeout:g}s (ready_timeout)"
                ) from None
            if line == "ready":
                core.ready = True
                return
            if line is None:
                raise StartError(f"the forwarding core exited before it was ready; see {self.ctx.log_path}")
            if line.startswith("error "):
                raise StartError(line[len("error ") :])

    def _stop_core(self, core: Core) -> None:
        try:
            signal.pidfd_send_signal(core.pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not wait_readable([core.pidfd], STOP_GRACE):
            try:
                signal.pidfd_send_signal(core.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.debug("core pid %d stopped (%s)", core.pid, self._reap_core(core))

    # the watch
    def _watch(self, container: int, core: Core, backoff: float = BACKOFF_FIRST) -> str:
        current: Core | None = core
        restart_at = 0.0
        reason: str | None = None
        while reason is None:
            fds = [container, self.wake_r]
            if current is not None:
                timeout = 1.0
                fds.append(current.pidfd)
                if current.sandbox is not None:
                    fds += current.sandbox.fds()
                if not current.status.eof:
                    fds.append(current.status.fd)
            else:
                timeout = max(0.0, restart_at - time.monotonic())
            readable = wait_readable(fds, timeout)
            self._drain_wakeup()
            self._reap_orphans(current.pid if current else 0)
            reason = self.stop_reason
            if container in readable:
                reason = f"container process {self.plan.container_pid} exited"
            elif current is not None:
                if current.sandbox is not None:
                    current.sandbox.on_readable(readable, current.pidfd)  # kills on a violation
                if current.status.fd in readable:
                    current.status.feed()
                    for line in current.status.lines():
                        self._on_core_line(current, line)
                if current.pidfd in readable and process_start_time(self.plan.container_pid) is None:
                    # It ended with the container (which the container's pidfd tells next).
                    reason = f"container process {self.plan.container_pid} exited"
                    self.log.debug("core pid %d ended (%s)", current.pid, self._reap_core(current))
                    current = None
                elif current.pidfd in readable:
                    lived = time.monotonic() - current.started_at
                    # An error, so that poststop keeps the log: the builtin core's open
                    # connections were reset (see tcp_relay), which a user may need explained.
                    self.log.error(
                        "forwarding core pid %d died (%s) after %.1fs; restarting it",
                        current.pid, self._reap_core(current), lived,
                    )
                    if lived > STABLE_AFTER:
                        backoff = BACKOFF_FIRST
                    delay, backoff = backoff, min(backoff * 2, BACKOFF_MAX)
                    # Its page holds its figures up to its last splice; its connections are gone.
                    forget_open(current.counts)
                    restart_at = time.monotonic() + delay
                    current = None
                else:
                    self._check_ready_in_time(current)
                    if reason is None and self._may_hand_over(current):
                        self._hand_over(container, current, backoff)
            elif time.monotonic() >= restart_at:
                current = self._spawn_core()
                self.log.info("forwarding core restarted, pid %d", current.pid)
        if current is not None:
            self._stop_core(current)
        return reason

    # the handover (hook/native/portfwd-keeper.c)
    def _may_hand_over(self, core: Core) -> bool:
        """A core that serves (and, builtin, sandboxed itself and handed up its listener)
        leaves this process nothing to decide until something ends: the keeper waits."""
        return (
            self.keeper is not None
            and self.stop_reason is None
            and core.ready
            and not core.status.buffered
            and (core.sandbox is None or (core.sandbox.listener >= 0 and core.sandbox.violation is None))
        )

    def _hand_over(self, container: int, core: Core, backoff: float) -> None:
        """Exec portfwd-keeper: the rest of this process's life without an interpreter (a
        second CPython per container was ~5 MB of its cost, issue 12). It tears down by
        itself; for anything to decide (the core died or broke its sandbox) it execs this
        interpreter again on resume(), which reads back what is written here. Returns only
        if the exec did not happen (a stop came first, or the exec failed)."""
        from . import handover  # noqa: PLC0415

        assert self.keeper is not None and self.counts is not None
        plan = self.plan
        notify = -1
        if core.sandbox is not None:
            core.sandbox.ours.close()  # the core sent its listener: nothing else comes there
            notify = core.sandbox.listener
        listeners = [(listener.target, listener.sock.fileno()) for listener in self.ctx.listeners]
        state = handover.write({  # inherited by the keeper, and back to resume()
            "plan": plan, "listeners": listeners, "state_dir": self.ctx.state_dir,
            "log_path": self.ctx.log_path, "log_level": self.ctx.log_level,
            "annotations": dict(self.ctx.annotations), "bundle": self.ctx.bundle,
            "core_identity": self.core_identity, "record": self.record.as_dict(), "backoff": backoff,
            "container": container, "core": (core.pid, core.pidfd, core.status.fd, core.started_at),
            "notify": notify,
        })
        inherited = [fd for _, fd in listeners] + [container, core.pidfd, core.status.fd, self.log.fd]
        inherited += [notify] if notify >= 0 else []
        for fd in inherited:
            os.set_inheritable(fd, True)
        resume_argv = [
            sys.executable, "-I", "-c",
            f"import sys; sys.path[:0] = {sys.path!r}; "
            f"from oci_portfwd.supervisor import resume; sys.exit(resume({state}))",
        ]
        argv = [
            self.keeper, f"portfwd:{plan.container_id[:7]}", str(self.log.fd), str(self.log.level),
            str(plan.container_pid), str(container), str(core.pid), str(core.pidfd), str(notify),
            record_path(self.ctx.state_dir, plan.container_id),
            counters_path(self.ctx.state_dir, plan.container_id),
            ",".join(str(fd) for _, fd in listeners), "--", *resume_argv,
        ]
        # Blocked across the exec (the keeper unblocks them once its handlers are in): a
        # stop must wait for it, not end it with the default action half-way.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
        self._drain_wakeup()
        if self.stop_reason is None:
            self.log.debug("core pid %d serves; the supervisor continues in %s", core.pid, self.keeper)
            try:
                os.execv(self.keeper, argv)
            except OSError as e:
                self.log.warning("cannot exec %s (%s): the supervisor stays in Python", self.keeper, e.strerror)
                self.keeper = None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)
        os.close(state)
        for fd in inherited:
            os.set_inheritable(fd, False)  # the next core's exec must not get them

    def resume(self, state: dict[str, Any]) -> int:
        """Back from the keeper (see _hand_over): the watch goes on where it handed over."""
        from .seccomp_filter import CoreSandbox  # noqa: PLC0415

        plan = self.plan
        with open("/proc/self/comm", "w") as comm:
            comm.write(f"portfwd:{plan.container_id[:7]}")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)  # a stop meanwhile: now
        self._settle()  # exec made it dumpable again; the rest is as it was
        self.core_identity = state["core_identity"]
        self.record = Record(**state["record"])
        self.counts = counters_file(counters_path(self.ctx.state_dir, plan.container_id), fresh=False)
        pid, pidfd, status_fd, started_at = state["core"]
        notify = state["notify"]
        sandbox = None
        if plan.driver == "builtin":
            sandbox = CoreSandbox.across_exec(self.core_identity, listener=notify)
        core = Core(pid, pidfd, StatusReader(status_fd), started_at, self.counts, sandbox=sandbox)
        core.ready = True
        # What the keeper passed on stays here: the next core's exec must not get it.
        for fd in [state["container"], pidfd, status_fd, *(fd for _, fd in state["listeners"])]:
            os.set_inheritable(fd, False)
        if notify >= 0:
            os.set_inheritable(notify, False)
        self.log.debug("the supervisor is back in Python (core pid %d)", pid)
        reason = self._watch(state["container"], core, state["backoff"])
        self.log.info("tearing down: %s", reason)
        self._teardown()
        return 0

    def _on_core_line(self, core: Core, line: str) -> None:
        if line == "ready":
            core.ready = True
        self.log.info("core pid %d: %s", core.pid, line)

    def _check_ready_in_time(self, core: Core) -> None:
        # Off the hook's path (builtin): a core that does not come up is killed and restarted.
        if core.ready or time.monotonic() - core.started_at < self.plan.ready_timeout:
            return
        core.ready = True  # said once
        self.log.error(
            "the forwarding core pid %d did not become ready within %gs (ready_timeout); killing it",
            core.pid, self.plan.ready_timeout,
        )
        try:
            signal.pidfd_send_signal(core.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap_core(self, core: Core) -> str:
        try:
            _, status = os.waitpid(core.pid, 0)
        except ChildProcessError:
            return "exit status unknown"
        finally:
            os.close(core.pidfd)
            os.close(core.status.fd)
            if core.sandbox is not None:
                core.sandbox.close()
        if core.sandbox is not None and core.sandbox.violation:
            return f"ended by its seccomp filter: forbidden system call {core.sandbox.violation}"
        if os.WIFSIGNALED(status):
            return f"killed by {_signal_name(os.WTERMSIG(status))}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _reap_orphans(self, core_pid: int) -> None:
        # As child subreaper we inherit the core's dialer when the core dies. Reap those by
        # pid; the core itself is reaped where its exit is reported (waitpid(-1) would eat it).
        for child in children():
            if child != core_pid:
                try:
                    pid, status = os.waitpid(child, os.WNOHANG)
                except ChildProcessError:
                    continue
                if pid and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
                    # Only seccomp kills with SIGSYS (seccomp_filter.py: the dialer's filter).
                    self.log.warning(
                        "the core's dialer pid %d was killed by its seccomp filter: a forbidden "
                        "system call (the kernel's audit log names it)", pid,
                    )

    def _teardown(self) -> None:
        for listener in self.ctx.listeners:
            listener.close()
        # Children first: slirp4netns/pasta hold their ports themselves, and a poststop that
        # finds no state file returns at once, so the record goes only once they are gone.
        self._reap_all(deadline=time.monotonic() + STOP_GRACE)
        remove_record(self.ctx.state_dir, self.plan.container_id, owner_pid=os.getpid())

    def _reap_all(self, deadline: float) -> None:
        """Wait for every remaining child (a dialer left to us); kill those that linger."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                if time.monotonic() >= deadline:
                    for child in children():
                        try:
                            os.kill(child, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    deadline = time.monotonic() + STOP_GRACE
                self._wait_for_a_child(deadline)

    @staticmethod
    def _wait_for_a_child(deadline: float) -> None:
        """Until one of our children exits (its pidfd), not a fixed sleep: poststop, and the
        container's delete with it, waits for this teardown (issue 12)."""
        pidfds = []
        for child in children():
            try:
                pidfds.append(os.pidfd_open(child))
            except ProcessLookupError:
                pass
        try:
            # A child may be gone between waitpid and here: then poll briefly, not forever.
            wait_readable(pidfds, max(0.0, deadline - time.monotonic()) if pidfds else 0.005)
        finally:
            for fd in pidfds:
                os.close(fd)


def native_keeper() -> str | None:
    """portfwd-keeper where the packages (and `make venv`) put it, or None: the supervisor
    then stays in Python for its whole life (as it does with OCI_PORTFWD_PYTHON_SUPERVISOR set)."""
    if os.environ.get(PYTHON_SUPERVISOR_ENV):
        return None
    path = sys.prefix + "/libexec/oci-portfwd-hook/portfwd-keeper"
    return path if os.access(path, os.X_OK) else None


def resume(state_fd: int) -> int:
    """The entry of the supervisor exec'd again by portfwd-keeper (Supervisor._hand_over)."""
    import _socket  # noqa: PLC0415

    from . import handover  # noqa: PLC0415
    from .drivers import get_driver  # noqa: PLC0415
    from .listeners import BindTarget, Listener  # noqa: PLC0415
    from .plan import Plan  # noqa: PLC0415
    from .ports import PortMapping  # noqa: PLC0415

    state = handover.read(state_fd, (Plan, PortMapping, BindTarget))
    plan = state["plan"]
    listeners = [Listener(target, _socket.socket(fileno=fd)) for target, fd in state["listeners"]]
    ctx = Context(plan, listeners, get_driver(plan.driver), state["state_dir"], state["log_path"],
                  state["log_level"], state["annotations"], state["bundle"])
    supervisor = Supervisor(ctx, StatusWriter(-1), HookLog(ctx.log_path, ctx.log_level, stderr=False))
    try:
        return supervisor.resume(state)
    except Exception:
        supervisor.log.exception("the supervisor failed after a core's end; tearing down")
        supervisor._teardown()
        return 1
    finally:
        supervisor.log.close()


def _signal_name(signum: int) -> str:
    """signal.Signals(signum).name, without the signal module and its enums (issue 12): of the
    names a number has (SIGABRT and SIGIOT), the first in alphabetical order, as Signals does."""
    names = sorted(name for name in dir(signal) if name.startswith("SIG") and not name.startswith("SIG_"))
    for name in names:
        if getattr(signal, name) == signum:
            return name
    return f"signal {signum}"
