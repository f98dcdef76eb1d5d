"""Files the hook reads that are not regular files: a FIFO (whose open() would wait for a writer
forever), a directory, a device. Each is refused at once with one line naming the file, by
check-config, prestart and poststop (which still finds the forwarding with the defaults), for
the config, the bundle's config.json and a state file.

Every hook run here is bounded (subprocess timeout): a hang fails the test instead of blocking.
"""

import os
from pathlib import Path

import pytest
from e2ekit.hookenv import oci_state
from e2ekit.ports import port_is_free

PORTS = "io.oci-portfwd.ports"
TIMEOUT = 10


def make_odd(path: Path, kind: str) -> str:
    """Put a FIFO or a directory at `path`, or name a device; returns the path to use."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        return "/dev/zero"
    return str(path)


def one_line(stderr: bytes, stage: str) -> str:
    err = stderr.decode(errors="replace")
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"oci-portfwd-hook: {stage}: "), lines[0]
    return lines[0]


KINDS = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}


@pytest.mark.parametrize("kind", KINDS)
def test_check_config_refuses(hook_env, tmp_path, kind):
    path = make_odd(tmp_path / f"config.{kind}", kind)
    r = hook_env.run("check-config", path, timeout=TIMEOUT)
    assert r.returncode == 1, r
    line = one_line(r.stderr, "check-config")
    assert path in line and f"{KINDS[kind]}, not a regular file" in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_prestart_refuses_the_config(hook_env, tmp_path, netns_pid, port_alloc, kind):
    hook_env.config_path.unlink()
    if kind == "device":
        hook_env.config_path.symlink_to("/dev/zero")
    else:
        make_odd(hook_env.config_path, kind)
    port = port_alloc.take()
    state = oci_state("oddconfig", "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS: f"127.0.0.1:{port}:80"})
    r = hook_env.run("prestart", stdin=state, timeout=TIMEOUT)
    assert r.returncode == 1, r
    line = one_line(r.stderr, "prestart")
    assert str(hook_env.config_path) in line and "not a regular file" in line, line
    assert port_is_free("127.0.0.1", port)


def test_poststop_with_a_fifo_config_still_returns(hook_env, tmp_path):
    hook_env.config_path.unlink()
    os.mkfifo(hook_env.config_path)
    r = hook_env.run("poststop", stdin=oci_state("oddconfig", "stopped", tmp_path),
                     timeout=TIMEOUT)
    assert r.returncode == 0, r
    err = r.stderr.decode()
    assert str(hook_env.config_path) in err and "a FIFO, not a regular file" in err, err


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_prestart_refuses_a_bundle_config_that_is_not_a_file(hook_env, tmp_path, netns_pid,
                                                             port_alloc, kind):
    """The state has no annotations, so the hook reads bundle/config.json for them."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    make_odd(bundle / "config.json", kind)
    port = port_alloc.take()
    state = oci_state("oddbundle", "creating", bundle, pid=netns_pid)
    r = hook_env.run("prestart", stdin=state, cwd=bundle, timeout=TIMEOUT)
    assert r.returncode == 1, r
    line = one_line(r.stderr, "prestart")
    assert str(bundle / "config.json") in line and "not a regular file" in line, line
    assert port_is_free("127.0.0.1", port)


def test_state_file_that_is_a_fifo(hook_env, tmp_path):
    """A FIFO where poststop looks for the container's state file: one line, at once; `ps`
    lists it with the reason."""
    hook_env.state_dir.mkdir(mode=0o700, parents=True)
    os.mkfifo(hook_env.state_file("oddstate"))
    r = hook_env.run("poststop", stdin=oci_state("oddstate", "stopped", tmp_path),
                     timeout=TIMEOUT)
    line = one_line(r.stderr, "poststop")
    assert "a FIFO, not a regular file" in line, line
    r = hook_env.run("ps", timeout=TIMEOUT)
    assert r.returncode == 0, r
    out = r.stdout.decode()
    row = next((x for x in out.splitlines() if x.startswith("oddstate")), None)
    assert row is not None and "a FIFO, not a regular file" in row, out


def test_prestart_with_a_fifo_as_the_log(hook_env, tmp_path, netns_pid, port_alloc):
    """The log is opened for writing: a FIFO in its place would block that open too."""
    hook_env.state_dir.mkdir(mode=0o700, parents=True)
    os.mkfifo(hook_env.log_file("oddlog"))
    port = port_alloc.take()
    state = oci_state("oddlog", "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS: f"127.0.0.1:{port}:80"})
    r = hook_env.run("prestart", stdin=state, timeout=TIMEOUT)
    assert r.returncode == 1, r
    line = one_line(r.stderr, "prestart")
    assert str(hook_env.log_file("oddlog")) in line, line
    assert port_is_free("127.0.0.1", port)
