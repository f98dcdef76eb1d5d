"""The unprivileged user of the rootless tests, and running things as that user.

Each test session makes a user of its own (`portfwd-t<random>`) with `useradd -m`, which also
gives it /etc/subuid and /etc/subgid ranges (rootless podman needs them), and deletes it at the
end. A user per session, not a shared one: two sessions at once (two people, CI and a person)
must not delete the user, or kill its podman pause process, under each other. Users that were
there before (e.g. `tuser` of manual tests) are never touched.
No systemd/logind here: the user's XDG_RUNTIME_DIR, /run/user/UID, is made here too.
"""

import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc

TEST_USER_PREFIX = "portfwd-t"
USER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class UserUnavailable(Exception):
    """The test user cannot be had here; the message is the skip reason."""


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a pytest test class

    name: str
    uid: int
    gid: int
    home: Path
    created: bool          # by this session: delete it at the end
    made_runtime_dir: bool  # /run/user/UID made by this session

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/user/{self.uid}")

    def env(self, xdg_runtime_dir: bool = True) -> list[str]:
        """A clean environment: nothing of root's (TMPDIR, pyenv, …) leaks into the user's tools."""
        env = [f"PATH={USER_PATH}", f"HOME={self.home}", f"USER={self.name}",
               f"LOGNAME={self.name}", "LANG=C.UTF-8"]
        if xdg_runtime_dir:
            env.append(f"XDG_RUNTIME_DIR={self.runtime_dir}")
        return env

    def prefix(self) -> list[str]:
        """argv prefix that runs a command as the user (what `runuser -u USER --` does for a
        person), with XDG_RUNTIME_DIR set as a login would."""
        return ["runuser", "-u", self.name, "--", "env", "-i", *self.env()]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("check", False)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("cwd", "/")
        return subprocess.run([*self.prefix(), *argv], **kwargs)

    def make_dir(self, path: Path, mode: int = 0o700) -> Path:
        """A directory the user owns (its parents must be traversable by the user)."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        path.chmod(mode)
        return path

    def give(self, path: Path) -> Path:
        """chown -R to the user: bundles, rootfs and configs made by root for the user."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True,
                       timeout=30)
        return path

    def processes(self) -> list[Proc]:
        """Live (not zombie) processes running as the user."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and process_uid(int(entry.name)) == self.uid:
                proc = Proc.of(int(entry.name))
                if proc is not None and proc.alive():
                    found.append(proc)
        return found

    def wait_quiet(self, timeout: float, keep: list[Proc] = ()) -> list[Proc]:
        """Wait until the user runs nothing but `keep` (e.g. podman's pause process), for
        work still finishing, such as the `podman container cleanup` that conmon starts when a
        container exits. Returns what is still running at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            busy = [p for p in self.processes() if p not in keep]
            if not busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.1)

    def pause_processes(self) -> list[Proc]:
        """Rootless podman's `catatonit -P` of this user: from its pid file, else by comm+uid."""
        found = []
        pid_file = self.runtime_dir / "libpod" / "tmp" / "pause.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        candidates = [pid] if pid is not None else []
        candidates += [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
        for pid in dict.fromkeys(candidates):
            proc = Proc.of(pid)
            if proc is not None and proc.alive() and proc.comm() == "catatonit" \
                    and process_uid(pid) == self.uid:
                found.append(proc)
        return found


def process_uid(pid: int) -> int | None:
    """Real uid of a process as the host sees it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def ensure_test_user(name: str | None = None) -> TestUser:
    """Create the session's user (or use `name` if it exists, without ever deleting it)."""
    name = name or f"{TEST_USER_PREFIX}{uuid.uuid4().hex[:6]}"
    missing = [t for t in ("useradd", "userdel", "runuser") if shutil.which(t) is None]
    if missing:
        raise UserUnavailable(f"missing tools for the test user: {', '.join(missing)}")
    created = False
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True,
                           text=True, timeout=60, check=False)
        if r.returncode != 0:
            raise UserUnavailable(f"useradd -m {name} failed: {r.stderr.strip()}") from None
        created = True
        entry = pwd.getpwnam(name)
    runtime_dir = Path(f"/run/user/{entry.pw_uid}")
    if created and runtime_dir.exists():
        # Left by an earlier user of this uid (deleted since): nothing of it may be reused.
        shutil.rmtree(runtime_dir)
    made_runtime_dir = not runtime_dir.exists()
    if made_runtime_dir:
        runtime_dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        runtime_dir.mkdir(mode=0o700)
    os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
    runtime_dir.chmod(0o700)
    return TestUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=Path(entry.pw_dir),
                    created=created, made_runtime_dir=made_runtime_dir)


def has_subids(user: TestUser) -> bool:
    """Rootless podman needs ranges in both /etc/subuid and /etc/subgid."""
    def listed(path: str) -> bool:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return False
        return any(line.split(":")[0] in (user.name, str(user.uid)) for line in lines)

    return listed("/etc/subuid") and listed("/etc/subgid")


def release_test_user(user: TestUser) -> list[str]:
    """End of session: kill the user's pause process (by pid), remove what this session made.
    Returns notes about anything that could not be undone."""
    notes = []
    pause = user.pause_processes()
    busy = user.wait_quiet(10, keep=pause)
    for proc in pause:
        proc.kill()
    if busy:
        notes.append(f"{user.name} still runs {[(p.pid, p.comm()) for p in busy]}")
    if user.made_runtime_dir:
        shutil.rmtree(user.runtime_dir, ignore_errors=True)
    if user.created:
        r = subprocess.run(["userdel", "-r", user.name], capture_output=True, text=True,
                           timeout=60, check=False)
        if r.returncode != 0:
            notes.append(f"userdel -r {user.name} failed ({r.returncode}): {r.stderr.strip()}")
    return notes


@contextmanager
def fresh_test_user() -> Iterator[TestUser]:
    """A fresh unprivileged user, removed again afterwards; a skip that says why when the
    machine cannot make one."""
    import warnings

    import pytest

    try:
        user = ensure_test_user()
    except UserUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield user
    finally:
        for note in release_test_user(user):
            warnings.warn(note, stacklevel=3)
