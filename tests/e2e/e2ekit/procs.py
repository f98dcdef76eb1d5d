"""Processes by pid, the only way the tests ever end a process.

A pid alone can be reused; (pid, start time) cannot, so "is it still the same process" checks
compare both.
"""

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> "Proc | None":
        stat = _stat(pid)
        return None if stat is None else cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """True while the same process exists and is not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and int(stat[19]) == self.start_time and stat[0] != "Z"

    def comm(self) -> str:
        return _read(Path(f"/proc/{self.pid}/comm")).strip()

    def kill(self) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the comm field: [state, ppid, ...]; index 19 = starttime."""
    text = _read(Path(f"/proc/{pid}/stat"))
    if not text:
        return None
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[Proc]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and int(stat[1]) == pid:
                found.append(Proc(int(entry.name), int(stat[19])))
    return found


def descendants(pid: int) -> list[Proc]:
    result, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            result.append(child)
            todo.append(child.pid)
    return result


def forwarding_procs(supervisor: Proc) -> list[Proc]:
    """The supervisor and the descendants that live as long as the forwarding: not the
    dialer's own children (its client-address routing setup exits ~0.1 s after the start)."""
    result, todo = [supervisor], [supervisor]
    while todo:
        parent = todo.pop()
        if parent.comm() == "portfwd-dialer":
            continue
        for child in children(parent.pid):
            result.append(child)
            todo.append(child)
    return result


def find_by_comm(comm: str) -> list[Proc]:
    """Live processes whose comm is exactly `comm` (e.g. a supervisor "portfwd:<id>")."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            proc = Proc.of(int(entry.name))
            if proc is not None and proc.alive() and proc.comm() == comm:
                found.append(proc)
    return found


def supervisor_comm(container_id: str) -> str:
    return f"portfwd:{container_id[:7]}"
