"""The hook refuses to publish from a network namespace made inside its own user namespace
(rootlesskit's, under rootless Docker or nerdctl), and only there: the host's namespaces, and a
user namespace over the host's network namespace (rootless podman's hooks), go on.
`unshare -Ur[n]` makes those namespaces here; tests/e2e/test_engines.py has the real rootless
dockerd."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from oci_portfwd import hostnet

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / ".venv" / "bin" / "oci-portfwd-hook"
PROBE = "from oci_portfwd.hostnet import netns_made_in_our_user_namespace as f; print(f())"


def in_namespaces(flags: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("missing tool: unshare (util-linux)")
    r = subprocess.run(["unshare", flags, "true"], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot make user namespaces here: {r.stderr.decode().strip()}")
    return subprocess.run(["unshare", flags, *argv], capture_output=True, text=True, timeout=30, **kw)


def test_uid_map(tmp_path):
    m = tmp_path / "uid_map"
    m.write_text("         0          0 4294967295\n")
    assert hostnet.in_initial_user_namespace(str(m))
    m.write_text("         0       1000          1\n         1     100000      65536\n")
    assert not hostnet.in_initial_user_namespace(str(m))


@pytest.mark.parametrize("flags, expected", [
    ("-Urn", "True"),   # rootlesskit: user namespace and a network namespace made in it
    ("-Ur", "False"),   # rootless podman's hooks: a user namespace over the host's network
])
def test_detection(flags, expected):
    r = in_namespaces(flags, [sys.executable, "-c", PROBE])
    assert r.returncode == 0 and r.stdout.strip() == expected, r.stderr
    assert not hostnet.netns_made_in_our_user_namespace()  # this process: the host's


def test_hook_refuses_in_rootlesskit_like_namespaces(tmp_path):
    if not HOOK.exists():
        pytest.fail(f"{HOOK} is missing: run `make venv`")
    config = tmp_path / "oci-portfwd.json"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state")}))
    state = {"ociVersion": "1.0.2-dev", "id": "rl", "status": "creating", "pid": 1, "bundle": "/",
             "annotations": {"io.oci-portfwd.ports": "127.0.0.1:18999:80"}}
    r = in_namespaces("-Urn", [str(HOOK), "prestart"], input=json.dumps(state),
                      env={"OCI_PORTFWD_CONFIG": str(config), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert r.stderr.startswith("oci-portfwd-hook: prestart: this runs in a network namespace made "
                               "inside its own user namespace"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
