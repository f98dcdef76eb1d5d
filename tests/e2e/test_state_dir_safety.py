"""The config's state_dir: the hook (root here) creates it 0700, with every missing parent 0700,
and refuses with one line a state dir that someone else could change under it: writable by
group or others, owned by another user, or below a parent another user owns or may write to
without the sticky bit (/tmp's sticky bit is fine). A refused start binds nothing."""

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from e2ekit.hookenv import oci_state, reap_leftovers
from e2ekit.ports import port_is_free

PORTS = "io.oci-portfwd.ports"


@pytest.fixture
def area():
    """A fresh directory under /tmp (sticky, world-writable: an accepted parent)."""
    path = Path(tempfile.mkdtemp(prefix="pfa-statedir-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def prestart(hook_env, state_dir: Path, pid: int, port: int, cid: str):
    hook_env.write_config({"state_dir": str(state_dir), "log_level": "debug"})
    state = oci_state(cid, "creating", hook_env.workdir, pid=pid,
                      annotations={PORTS: f"127.0.0.1:{port}:80"})
    return hook_env.run("prestart", stdin=state)


def refused(result, *words: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oci-portfwd-hook: prestart: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_missing_chain_created_0700(hook_env, area, netns_pid, port_alloc):
    state_dir = area / "a" / "b" / "state"
    port = port_alloc.take()
    cid = f"sd-{uuid.uuid4().hex[:8]}"
    hook_env.state_dir = state_dir
    try:
        r = prestart(hook_env, state_dir, netns_pid, port, cid)
        assert r.returncode == 0, r.stderr.decode()
        for d in (area / "a", area / "a" / "b", state_dir):
            st = os.lstat(d)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), \
                f"{d}: uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):o}"
        assert (state_dir / f"{cid}.json").exists()
    finally:
        hook_env.run("poststop", stdin=oci_state(cid, "stopped", hook_env.workdir))
        reap_leftovers(hook_env)
    assert port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o775])
def test_state_dir_writable_by_others_refused(hook_env, area, netns_pid, port_alloc, mode):
    state_dir = area / "state"
    state_dir.mkdir()
    state_dir.chmod(mode)
    port = port_alloc.take()
    refused(prestart(hook_env, state_dir, netns_pid, port, "sdmode"),
            str(state_dir), "writable by group or others", f"{mode:o}")
    assert stat.S_IMODE(os.lstat(state_dir).st_mode) == mode, "the refused dir was changed"
    assert not list(state_dir.iterdir())
    assert port_is_free("127.0.0.1", port)


def test_parent_writable_by_others_refused(hook_env, area, netns_pid, port_alloc):
    parent = area / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    port = port_alloc.take()
    refused(prestart(hook_env, parent / "state", netns_pid, port, "sdparent"),
            f"its parent {parent} is writable by group or others", "sticky")
    assert not (parent / "state").exists(), "created below a dir others may write to"
    assert port_is_free("127.0.0.1", port)


def test_state_dir_of_another_user_refused(hook_env, area, netns_pid, port_alloc, test_user):
    state_dir = test_user.make_dir(area / "state")
    port = port_alloc.take()
    refused(prestart(hook_env, state_dir, netns_pid, port, "sdowner"),
            str(state_dir), f"belongs to uid {test_user.uid}")
    assert port_is_free("127.0.0.1", port)


def test_parent_of_another_user_refused(hook_env, area, netns_pid, port_alloc, test_user):
    parent = test_user.make_dir(area / "users", mode=0o755)
    port = port_alloc.take()
    refused(prestart(hook_env, parent / "state", netns_pid, port, "sdpowner"),
            f"its parent {parent} belongs to uid {test_user.uid}")
    assert not (parent / "state").exists()
    assert port_is_free("127.0.0.1", port)


def test_check_config_names_the_state_dir_it_would_use(hook_env, area):
    """check-config only reads: it reports the state dir and creates nothing."""
    path = area / "c.json"
    path.write_text(json.dumps({"state_dir": str(area / "x" / "state")}))
    r = hook_env.run("check-config", str(path))
    assert r.returncode == 0 and f"state_dir: {area / 'x' / 'state'}" in r.stdout.decode(), r
    assert not (area / "x").exists()
