"""poststop: stop the container's supervisor and free its ports. Idempotent; never blocks
the container's deletion: nothing to stop is success."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from .config import Config, load_config, state_dir_of
from .errors import ConfigError
from .logs import close_log, open_log
from .polling import wait_readable
from .state import parse_state
from .statefile import Record, is_alive, log_path, prune_logs, read_record, remove_record

STOP_TIMEOUT = 5.0
KILL_TIMEOUT = 2.0
# A log that records an error (a failed create, a core that crashed) is kept this long
# for the user to read; the log of an uneventful forwarding is removed at poststop.
KEEP_FAILURE_LOGS = 24 * 3600.0
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
    log = open_log(None, config.log_level, stderr=True)
    try:
        if broken_config is not None:
            log.warning("%s; looking for the forwarding in the default state dir %s", broken_config, state_dir)
        record = read_record(state_dir, state.id)
        if record is None:
            log.info("container %s has no forwarding (already stopped)", state.id)
        elif is_alive(record):
            stop_supervisor(record, log)
        else:
            log.info("supervisor of container %s is already gone", state.id)
        remove_record(state_dir, state.id)
        _remove_log_unless_failed(state_dir, state.id)
        prune_logs(state_dir, KEEP_FAILURE_LOGS, time.time())
    finally:
        close_log(log)
    return 0


def stop_supervisor(record: Record, log: logging.Logger) -> None:
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
        for signum, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, KILL_TIMEOUT)):
            try:
                signal.pidfd_send_signal(pidfd, signum)
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
            log.warning("supervisor pid %d did not stop on %s", record.supervisor_pid, signum.name)
    finally:
        os.close(pidfd)


def _remove_log_unless_failed(state_dir: Path, container_id: str) -> None:
    path = log_path(state_dir, container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - (1 << 20)))
        text = f.read()
    if not any(mark in text for mark in FAILURE_MARKS):
        os.unlink(path)
