"""The per-container state file: which supervisor forwards which container.

`<state_dir>/<id>.json`, 0600 in a 0700 dir we own, written atomically. It carries the
supervisor's start time so that a reused pid is never signalled.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StateDirError
from .procfs import process_start_time


@dataclass(frozen=True)
class Record:
    container_id: str
    container_pid: int
    supervisor_pid: int
    supervisor_start_time: int
    driver: str
    ports: tuple[str, ...]
    log: str
    created: float
    stats: dict[str, int] | None = None  # the core's traffic totals (stats.Totals), for `ps`


def prepare_state_dir(path: Path) -> Path:
    """Create the dir 0700 if needed; refuse a symlink or a dir someone else owns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateDirError(f"cannot create state dir {path}: {e.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"state dir {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"state dir {path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def record_path(state_dir: Path, container_id: str) -> Path:
    return state_dir / f"{container_id}.json"


def log_path(state_dir: Path, container_id: str) -> Path:
    return state_dir / f"{container_id}.log"


def write_record(state_dir: Path, record: Record) -> None:
    final = record_path(state_dir, record.container_id)
    tmp = state_dir / f".{record.container_id}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(record), f, indent=1)
        os.rename(tmp, final)
    except BaseException:
        _unlink(tmp)
        raise


def read_record(state_dir: Path, container_id: str) -> Record | None:
    path = record_path(state_dir, container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateDirError(f"cannot open state file {path}: {e.strerror} (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 20)
    try:
        doc = json.loads(raw)
        doc["ports"] = tuple(doc["ports"])
        return Record(**doc)
    except (ValueError, TypeError, KeyError) as e:
        raise StateDirError(f"state file {path} is damaged ({e}); remove it") from None


def remove_record(state_dir: Path, container_id: str, *, owner_pid: int | None = None) -> None:
    """Remove the state file; with owner_pid, only if it still names that supervisor."""
    if owner_pid is not None:
        try:
            record = read_record(state_dir, container_id)
        except StateDirError:
            return
        if record is None or record.supervisor_pid != owner_pid:
            return
    _unlink(record_path(state_dir, container_id))


def prune_logs(state_dir: Path, max_age: float, max_count: int, now: float) -> None:
    """Of the logs of containers that are gone (no state file), remove those older than
    max_age, then the oldest beyond max_count."""
    try:
        names = set(os.listdir(state_dir))
    except FileNotFoundError:
        return
    kept: list[tuple[float, Path]] = []
    for name in names:
        if not name.endswith(".log") or f"{name[: -len('.log')]}.json" in names:
            continue
        path = state_dir / name
        try:
            mtime = os.lstat(path).st_mtime
            if now - mtime > max_age:
                os.unlink(path)
            else:
                kept.append((mtime, path))
        except FileNotFoundError:
            pass
    kept.sort(reverse=True)
    for _, path in kept[max_count:]:
        _unlink(path)


def list_records(state_dir: Path) -> list[Record]:
    records = []
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateDirError(f"cannot read the state dir {state_dir}: {e.strerror}") from None
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            try:
                record = read_record(state_dir, name[: -len(".json")])
            except StateDirError:
                continue
            if record is not None:
                records.append(record)
    return records


def is_alive(record: Record) -> bool:
    return process_start_time(record.supervisor_pid) == record.supervisor_start_time


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
