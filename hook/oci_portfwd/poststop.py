"""poststop: stop the container's supervisor and free its ports. Idempotent; never blocks
the container's deletion: nothing to stop is success.

The container's log goes with an uneventful forwarding. It stays when it records an error:
a failed start, a core that died, or a supervisor found dead here (the container ran on
without forwarding; poststop writes that into the log). Kept logs of containers that are
gone are pruned here: at most KEEP_LOGS of them, none older than KEEP_LOGS_FOR.
"""

from __future__ import annotations

# The stop path imports no dataclasses, logging, json or enum (signal's, socket's): a
# container's delete waits for all of it (issue 12). _signal is the signal module's core.
import _signal
import os
import stat
import time

from .config import Config, load_config, state_dir_of
from .errors import ConfigError
from .logs import HookLog, append_line
from .polling import wait_readable
from .state import parse_state
from .statefile import Record, is_alive, log_path, prune_logs, read_record, remove_record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

STOP_TIMEOUT = 5.0
KILL_TIMEOUT = 2.0
# A log that records an error (a failed create, a core that crashed, a supervisor that
# died) is kept for the user to read, this long and at most this many of them; the log of
# an uneventful forwarding is removed at poststop.
KEEP_LOGS_FOR = 24 * 3600.0
KEEP_LOGS = 100
FAILURE_MARKS = (b" ERROR ", b"Traceback (most recent call last)")


def poststop(raw_state: bytes, env: Mapping[str, str]) -> int:
    state = parse_state(raw_state, full_validation=False)
    broken_config = None
    try:
        config = load_config(env, validate_schema=False)
    except ConfigError as e:
        # A config broken since the container started must not keep its ports bound:
        # fall back to the defaults, which name the default state dir.
        broken_config = str(e)
        try:
            config = load_config({}, explicit=None, validate_schema=False)
        except ConfigError:
            config = Config()
    state_dir = state_dir_of(config, env)
    log = HookLog(None, config.log_level, stderr=True)
    try:
        if broken_config is not None:
            log.warning("%s; looking for the forwarding in the default state dir %s", broken_config, state_dir)
        record = read_record(state_dir, state.id)
        died = None
        if record is None:
            log.info("container %s has no forwarding (already stopped)", state.id)
        elif is_alive(record):
            stop_supervisor(record, log)
        else:
            # Only a supervisor that died leaves its state file: its own teardown (the
            # container exited) removes it. The container ran on without its ports.
            died = f"supervisor pid {record.supervisor_pid} is gone"
        path = log_path(state_dir, state.id)
        if died is not None:
            append_line(path, "ERROR", f"poststop: the forwarding died before poststop ({died})")
        remove_record(state_dir, state.id)
        error = _first_error(path)
        if error is None:
            _unlink(path)
        elif died is not None:
            log.warning("the forwarding of container %s died before poststop (%s); its log is kept: %s",
                        state.id, died, path)
        else:
            log.warning("the forwarding of container %s logged an error (%s); its log is kept: %s",
                        state.id, error, path)
        prune_logs(state_dir, KEEP_LOGS_FOR, KEEP_LOGS, time.time())
    finally:
        log.close()
    return 0


def stop_supervisor(record: Record, log: HookLog) -> None:
    """SIGTERM, then SIGKILL; through a pidfd opened after checking the start time, so
    that a pid reused since the state file was written is never signalled."""
    try:
        pidfd = os.pidfd_open(record.supervisor_pid)
    except ProcessLookupError:
        return
    try:
        if not is_alive(record):
            log.warning(
                "pid %d is no longer the supervisor of container %s (start time differs); not signalling it",
                record.supervisor_pid,
                record.container_id,
            )
            return
        for signum, name, timeout in ((_signal.SIGTERM, "SIGTERM", STOP_TIMEOUT), (_signal.SIGKILL, "SIGKILL", KILL_TIMEOUT)):
            try:
                _signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                return
            except PermissionError:
                log.warning(
                    "not permitted to signal pid %d: the state file of container %s names a process "
                    "that is not ours; leaving it alone",
                    record.supervisor_pid,
                    record.container_id,
                )
                return
            if wait_readable([pidfd], timeout):
                return
            log.warning("supervisor pid %d did not stop on %s", record.supervisor_pid, name)
    finally:
        os.close(pidfd)


def _first_error(path: str) -> str | None:
    """The first line of the log's last MiB that records an error (shortened), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        size = st.st_size
        f.seek(max(0, size - (1 << 20)))
        text = f.read(1 << 20)
    for line in text.splitlines():
        for mark in FAILURE_MARKS:
            at = line.find(mark)
            if at >= 0:
                found = line[at + len(mark) :].decode(errors="replace").strip() or mark.decode().strip()
                return found if len(found) <= 160 else found[:157] + "..."
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
