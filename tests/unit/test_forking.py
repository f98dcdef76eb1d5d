"""fork_child: a child that must die with its parent never outlives it, even when the parent
dies before the child has set its death signal (the race that left orphaned cores bound to
1,024 ports)."""

import os
import subprocess
import sys
import time

PARENT = """
import os, sys, time
from oci_portfwd.forking import fork_child
pid = fork_child(lambda: (time.sleep(30), 0)[1], die_with_parent={die})
with open(sys.argv[1], "w") as f:
    f.write(str(pid))
os._exit(0)  # dies at once: often before the child has called prctl
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _child_of_a_dying_parent(die: bool, tmp_path) -> int:
    # The pid through a file: a pipe would stay open in the child until it exits.
    pid_file = tmp_path / "child.pid"
    subprocess.run([sys.executable, "-c", PARENT.format(die=die), str(pid_file)],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30, check=True)
    return int(pid_file.read_text())


def test_child_dies_with_its_parent(tmp_path):
    for _ in range(20):  # many tries: each lands on one side of the race or the other
        pid = _child_of_a_dying_parent(True, tmp_path)
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _running(pid), f"child {pid} outlived its parent"


def test_a_detached_child_outlives_its_parent(tmp_path):
    pid = _child_of_a_dying_parent(False, tmp_path)
    try:
        time.sleep(0.3)
        assert _running(pid)
    finally:
        os.kill(pid, 9)
