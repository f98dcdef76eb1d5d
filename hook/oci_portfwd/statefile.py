"""The per-container state file: which supervisor forwards which container.

`<state_dir>/<id>.json`, 0600 in a 0700 dir we own, written atomically. It carries the
supervisor's start time so that a reused pid is never signalled.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import StateDirError, loads_strict
from .jsontext import to_json
from .procfs import process_start_time
from .regularfile import read_regular
from .stats import as_dict, read_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

# Paths: str (or any os.PathLike given), joined with os.path: pathlib costs the start and
# stop paths ~4 ms (fnmatch, re, urllib.parse, ipaddress; issue 12).

MAX_RECORD_BYTES = 1 << 20


class Record:
    """Plain classes, not dataclasses: the start and stop paths run on every container
    start, and dataclasses brings inspect, ast and dis along (~6 ms; issue 12)."""

    __slots__ = (
        "container_id", "container_pid", "supervisor_pid", "supervisor_start_time", "driver", "ports",
        "log", "created", "stats", "name",
    )

    def __init__(
        self,
        *,
        container_id: str,
        container_pid: int,
        supervisor_pid: int,
        supervisor_start_time: int,
        driver: str,
        ports: tuple[str, ...],
        log: str,
        created: float,
        stats: dict[str, int] | None = None,  # the core's traffic totals (stats.Totals), for `ps`
        name: str | None = None,  # the engine's name for the container (names.py), for `ps`
    ) -> None:
        self.container_id = container_id
        self.container_pid = container_pid
        self.supervisor_pid = supervisor_pid
        self.supervisor_start_time = supervisor_start_time
        self.driver = driver
        self.ports = ports
        self.log = log
        self.created = created
        self.stats = stats
        self.name = name

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Record(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


class Damaged:
    """A state file that cannot be read, for `ps` to show with the reason."""

    __slots__ = ("container_id", "reason")

    def __init__(self, container_id: str, reason: str) -> None:
        self.container_id = container_id
        self.reason = reason


# Field types a state file must have: a damaged or forged one is reported, not used.
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "container_id": (str,),
    "container_pid": (int,),
    "supervisor_pid": (int,),
    "supervisor_start_time": (int,),
    "driver": (str,),
    "ports": (list,),
    "log": (str,),
    "created": (int, float),
    "stats": (dict, type(None)),
    "name": (str, type(None)),
}


def prepare_state_dir(state_dir: str | Path) -> str:
    """Create the dir 0700 if needed, and every missing parent 0700 too; refuse a state dir
    that someone else could change under us: a symlink, one owned by another user or
    writable by group or others, or one below a dir that another user could write to
    (where the state dir could be renamed away and replaced)."""
    me = os.geteuid()
    # Resolved parents: the checks below are then about the dirs really walked through.
    given_parent, given_name = parent_and_name(os.fspath(state_dir))
    path = os.path.realpath(given_parent)
    path = os.path.join(path, given_name) if given_name else path
    missing = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    owners = _trusted_owners(me)
    for parent in [existing, *_parents(existing)] if existing != path else _parents(path):
        _check_parent(path, parent, me, owners)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StateDirError(f"cannot create state dir {path}: {directory}: {e.strerror}") from None
        if directory != path:
            _check_parent(path, directory, me, owners)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"state dir {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {path} is not a directory")
    if st.st_uid != me:
        raise StateDirError(f"state dir {path} belongs to uid {st.st_uid}, not to us (uid {me})")
    if st.st_mode & 0o022:
        raise StateDirError(
            f"state dir {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "make it 0700 or choose another state_dir"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return str(path)


def parent_and_name(path: str) -> tuple[str, str]:
    """str(Path(path).parent) and Path(path).name, without pathlib."""
    # PurePosixPath: exactly two leading slashes stay (POSIX leaves them to the system),
    # other repeated slashes and "." components go; ".." stays.
    root = "//" if path.startswith("//") and not path.startswith("///") else "/" if path.startswith("/") else ""
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return (root or "."), ""
    return (root + "/".join(parts[:-1])) or ".", parts[-1]


def _parents(path: str) -> list[str]:
    """Path(path).parents of an absolute, normalised path (os.path.realpath's)."""
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found


def _check_parent(state_dir: str, parent: str, me: int, owners: set[int]) -> None:
    try:
        st = os.stat(parent)
    except OSError as e:
        raise StateDirError(f"cannot use state dir {state_dir}: {parent}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"cannot use state dir {state_dir}: {parent} is not a directory")
    if st.st_uid not in owners:
        raise StateDirError(
            f"cannot use state dir {state_dir}: its parent {parent} belongs to uid {st.st_uid}, "
            f"neither root nor us (uid {me}); choose another state_dir"
        )
    # Sticky (like /tmp): others may add entries but not rename or remove ours.
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StateDirError(
            f"cannot use state dir {state_dir}: its parent {parent} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit; choose another state_dir"
        )


def _trusted_owners(me: int) -> set[int]:
    owners = {0, me}
    # In a user namespace (rootless podman runs hooks as its uid 0), host root's dirs show
    # the overflow uid, as do any other user's: there is no telling them apart from inside.
    try:
        with open("/proc/self/uid_map", "rb") as f:
            identity = f.read(4096).split() == [b"0", b"0", b"4294967295"]
        if not identity:
            with open("/proc/sys/kernel/overflowuid", "rb") as f:
                owners.add(int(f.read(64)))
    except (OSError, ValueError):
        pass
    return owners


def record_path(state_dir: str, container_id: str) -> str:
    return os.path.join(state_dir, f"{container_id}.json")


def counters_path(state_dir: str, container_id: str) -> str:
    """The forwarding's traffic page (stats.counters_file), beside its state file."""
    return os.path.join(state_dir, f"{container_id}.counters")


def log_path(state_dir: str, container_id: str) -> str:
    return os.path.join(state_dir, f"{container_id}.log")


def write_record(state_dir: str, record: Record) -> None:
    final = record_path(state_dir, record.container_id)
    tmp = os.path.join(state_dir, f".{record.container_id}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, to_json(record.as_dict()).encode())
        os.close(fd)
        fd = -1
        os.rename(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink(tmp)
        raise


def read_record(state_dir: str, container_id: str) -> Record | None:
    path = record_path(state_dir, container_id)
    try:
        raw = read_regular(path, MAX_RECORD_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        hint = " (a symlink is refused)" if e.errno == errno.ELOOP else ""
        raise StateDirError(f"cannot read state file {path}: {e.strerror}{hint}") from None
    try:
        doc = loads_strict(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key, value in doc.items():
            types = RECORD_TYPES.get(key)
            if types is None:
                raise ValueError(f"unknown key {key!r}")
            if not isinstance(value, types) or isinstance(value, bool):
                raise ValueError(f"{key} is a {type(value).__name__}")
        if not all(isinstance(p, str) for p in doc.get("ports", ())):
            raise ValueError("ports holds a non-string")
        if not all(type(v) is int for v in (doc.get("stats") or {}).values()):
            raise ValueError("stats holds a non-integer")
        doc["ports"] = tuple(doc.get("ports", ()))
        return Record(**doc)
    except (ValueError, TypeError, RecursionError) as e:
        raise StateDirError(f"state file {path} is damaged ({str(e)[:100]}); remove it") from None


def remove_record(state_dir: str, container_id: str, *, owner_pid: int | None = None) -> None:
    """Remove the state file; with owner_pid, only if it still names that supervisor."""
    if owner_pid is not None:
        try:
            record = read_record(state_dir, container_id)
        except StateDirError:
            return
        if record is None or record.supervisor_pid != owner_pid:
            return
    _unlink(counters_path(state_dir, container_id))
    _unlink(record_path(state_dir, container_id))


def prune_logs(state_dir: str, max_age: float, max_count: int, now: float) -> None:
    """Of the logs of containers that are gone (no state file), remove those older than
    max_age, then the oldest beyond max_count."""
    try:
        names = set(os.listdir(state_dir))
    except FileNotFoundError:
        return
    kept: list[tuple[float, str]] = []
    for name in names:
        if not name.endswith(".log") or f"{name[: -len('.log')]}.json" in names:
            continue
        path = os.path.join(state_dir, name)
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


def list_records(state_dir: str) -> list[Record | Damaged]:
    records: list[Record | Damaged] = []
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
            except StateDirError as e:
                records.append(Damaged(name[: -len(".json")], str(e)))
                continue
            if record is not None:
                figures = read_file(counters_path(state_dir, record.container_id))
                if figures is not None:
                    record.stats = as_dict(figures)
                records.append(record)
    return records


def is_alive(record: Record) -> bool:
    return process_start_time(record.supervisor_pid) == record.supervisor_start_time


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
