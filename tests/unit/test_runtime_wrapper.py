"""oci-portfwd-runtime without an engine: how it reads runc's command lines, what it does to a
bundle's config.json, which runtime it execs and how (the real program, a fake runtime), and
how its errors reach an engine. tests/e2e/test_engines.py runs it under dockerd and containerd."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from oci_portfwd import config as config_module
from oci_portfwd import plan as plan_module
from oci_portfwd import runtime_wrapper as rw
from oci_portfwd.drivers import DRIVER_NAMES
from oci_portfwd.errors import ConfigError, PortSpecError

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / ".venv" / "bin" / "oci-portfwd-runtime"
DOCKER_ENV = ["PATH=/usr/bin:/bin", "HOSTNAME=abc"]
# What containerd's runc shim runs (dockerd 20.10 and ctr alike).
SHIM_CREATE = ["--root", "/run/runc/moby", "--log", "/b/log.json", "--log-format", "json", "create",
               "--bundle", "/b", "--pid-file", "/b/init.pid", "cid"]


def spec(env=(), annotations=None, hooks=None) -> dict:
    doc: dict = {"ociVersion": "1.0.2-dev", "process": {"args": ["sh"], "env": [*DOCKER_ENV, *env]},
                 "root": {"path": "rootfs"}}
    if annotations is not None:
        doc["annotations"] = annotations
    if hooks is not None:
        doc["hooks"] = hooks
    return doc


@pytest.fixture
def install(tmp_path):
    """A fake installation: bin/oci-portfwd-runtime with the hook next to it."""
    bindir = tmp_path / "inst" / "bin"
    bindir.mkdir(parents=True)
    for name in ("oci-portfwd-runtime", "oci-portfwd-hook"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    return bindir


@pytest.fixture
def env(tmp_path):
    cfg = tmp_path / "oci-portfwd.json"
    cfg.write_text("{}")
    return {"OCI_PORTFWD_CONFIG": str(cfg), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def bundle_with(tmp_path, doc, mode=0o644) -> Path:
    b = tmp_path / "bundle"
    b.mkdir(exist_ok=True)
    path = b / "config.json"
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return b


def create(b: Path, *extra: str) -> rw.Invocation:
    return rw.Invocation(["--root", "/r", "--log", str(b / "log.json"), "--log-format", "json",
                          "create", "--bundle", str(b), *extra, "cid"])


# --- the command line ---------------------------------------------------------------------------

def test_shim_command_line():
    inv = rw.Invocation(SHIM_CREATE)
    assert inv.command == "create"
    assert (inv.bundle, inv.container_id, inv.spec_path) == ("/b", "cid", "/b/config.json")
    assert inv.options == {"root": "/run/runc/moby", "log": "/b/log.json", "log-format": "json"}


@pytest.mark.parametrize("args, command, bundle", [
    (["--systemd-cgroup", "--root=/r", "run", "-b", "/x", "-d", "id"], "run", "/x"),
    (["-root", "/r", "create", "-bundle=/y", "id"], "create", "/y"),
    (["create", "id", "--bundle", "/z"], "create", "/z"),          # argp (crun) allows this order
    (["--debug", "--log", "create", "state", "id"], "state", None),  # --log's value is "create"
    (["--version"], None, None),
    (["kill", "--all", "id", "9"], "kill", None),
    (["features"], "features", None),
])
def test_command_and_bundle(args, command, bundle):
    inv = rw.Invocation(args)
    assert inv.command == command
    if bundle:
        assert inv.bundle == bundle


def test_bundle_defaults_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inv = rw.Invocation(["create", "id"])
    assert inv.bundle == str(tmp_path) and inv.spec_path == str(tmp_path / "config.json")


def test_crun_config_flag_names_the_spec():
    assert rw.Invocation(["create", "-b", "/b", "-f", "other.json", "id"]).spec_path == "/b/other.json"
    assert rw.Invocation(["create", "--config=/s.json", "id"]).spec_path == "/s.json"


def test_constants_match_the_hooks_own():
    assert rw.DEFAULT_CONFIG_PATH == config_module.DEFAULT_CONFIG_PATH
    assert rw.CONFIG_ENV == config_module.CONFIG_ENV
    assert rw.ANNOTATION_PREFIX == plan_module.ANNOTATION_PREFIX
    assert rw.PORTS_ANNOTATION == plan_module.PORTS_ANNOTATION
    # The wrapper checks a driver's name against the config schema's enum.
    schema = json.loads((REPO / "schemas" / "config.schema.json").read_text())
    assert tuple(schema["properties"]["driver"]["enum"]) == DRIVER_NAMES


# --- the bundle ---------------------------------------------------------------------------------

def test_no_request_leaves_the_spec_untouched(tmp_path, env, install):
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_DEBUG=1"], hooks={"prestart": []}))
    before = (b / "config.json").read_bytes(), os.stat(b / "config.json")
    assert not rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))
    after = os.stat(b / "config.json")
    assert (b / "config.json").read_bytes() == before[0]
    assert (after.st_ino, after.st_mtime_ns) == (before[1].st_ino, before[1].st_mtime_ns)


def test_env_request_becomes_annotations_and_hooks(tmp_path, env, install):
    other = {"path": "/proc/1/exe", "args": ["libnetwork-setkey", "x"]}
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_PORTS=127.0.0.2:8080:80,5353:53/udp",
                                        "OCI_PORTFWD_LOOPBACK=loopback", "OCI_PORTFWD_CONFIG=/x",
                                        "OCI_PORTFWD_UNKNOWN=1"],
                                   hooks={"prestart": [other], "poststop": [other]}), mode=0o640)
    ino = os.stat(b / "config.json").st_ino
    assert rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))
    doc = json.loads((b / "config.json").read_text())
    hook = str(install / "oci-portfwd-hook")
    assert doc["annotations"] == {"io.oci-portfwd.ports": "127.0.0.2:8080:80,5353:53/udp",
                                  "io.oci-portfwd.loopback": "loopback"}
    assert doc["hooks"]["prestart"] == [other, {"path": hook, "args": ["oci-portfwd-hook", "prestart"]}]
    assert doc["hooks"]["poststop"] == [other, {"path": hook, "args": ["oci-portfwd-hook", "poststop"]}]
    st = os.stat(b / "config.json")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_ino != ino  # renamed over, same mode
    assert sorted(p.name for p in b.iterdir()) == ["config.json"]  # no temp file left
    # The next create of the same spec (hooks.d-like: our hook already there) adds nothing.
    assert not rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))


def test_annotation_wins_over_env(tmp_path, env, install):
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_PORTS=1:1"],
                                   annotations={"io.oci-portfwd.ports": "8080:80", "other": "x"}))
    assert rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))
    doc = json.loads((b / "config.json").read_text())
    assert doc["annotations"] == {"io.oci-portfwd.ports": "8080:80", "other": "x"}


def test_spec_with_our_hook_from_hooks_d_is_left_alone(tmp_path, env, install):
    hooks_d = {"path": "/usr/libexec/oci/hooks.d/oci-portfwd-hook", "args": ["oci-portfwd-hook", "auto"]}
    b = bundle_with(tmp_path, spec(annotations={"io.oci-portfwd.ports": "8080:80"},
                                   hooks={"prestart": [hooks_d], "poststop": [hooks_d]}))
    before = (b / "config.json").read_bytes()
    assert not rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))
    assert (b / "config.json").read_bytes() == before


@pytest.mark.parametrize("container_type, rewritten", [("sandbox", True), ("container", False)])
def test_cri_pod_sandbox_forwards_for_the_pod(tmp_path, env, install, container_type, rewritten):
    b = bundle_with(tmp_path, spec(annotations={"io.oci-portfwd.ports": "8080:80",
                                                "io.kubernetes.cri.container-type": container_type}))
    assert rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime")) is rewritten


def test_packaged_layout_prefers_libexec(tmp_path):
    usr = tmp_path / "usr"
    (usr / "bin").mkdir(parents=True)
    libexec_hook = usr / "libexec" / "oci" / "hooks.d" / "oci-portfwd-hook"
    libexec_hook.parent.mkdir(parents=True)
    for p in (libexec_hook, usr / "bin" / "oci-portfwd-hook"):
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    assert rw.hook_path(str(usr / "bin" / "oci-portfwd-runtime")) == str(libexec_hook)
    libexec_hook.unlink()
    assert rw.hook_path(str(usr / "bin" / "oci-portfwd-runtime")) == str(usr / "bin" / "oci-portfwd-hook")


@pytest.mark.parametrize("ports, error, words", [
    ("99999:80", PortSpecError, "port spec '99999:80': host port 99999 is outside 1-65535"),
    ("80", PortSpecError, "a host port is required"),
    ("8080:80,8080:80", PortSpecError, "requested twice"),
])
def test_bad_request_fails_before_the_spec_changes(tmp_path, env, install, ports, error, words):
    b = bundle_with(tmp_path, spec(env=[f"OCI_PORTFWD_PORTS={ports}"]))
    before = (b / "config.json").read_bytes()
    with pytest.raises(error, match=words):
        rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))
    assert (b / "config.json").read_bytes() == before


@pytest.mark.parametrize("extra_env, words", [
    ("OCI_PORTFWD_DRIVER=nope", "io.oci-portfwd.driver='nope': must be one of builtin, slirp4netns, pasta"),
    ("OCI_PORTFWD_LOOPBACK=maybe", "io.oci-portfwd.loopback='maybe'"),
])
def test_bad_override_fails(tmp_path, env, install, extra_env, words):
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_PORTS=8080:80", extra_env]))
    with pytest.raises(Exception, match=words):
        rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))


def test_unknown_annotation_fails(tmp_path, env, install):
    b = bundle_with(tmp_path, spec(annotations={"io.oci-portfwd.ports": "8080:80", "io.oci-portfwd.prots": "1"}))
    with pytest.raises(ConfigError, match="unknown annotation 'io.oci-portfwd.prots'"):
        rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))


def test_broken_config_fails_a_create_with_ports(tmp_path, env, install):
    Path(env["OCI_PORTFWD_CONFIG"]).write_text('{"driver": "warp"}')
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_PORTS=8080:80"]))
    with pytest.raises(ConfigError, match="/driver"):
        rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))


@pytest.mark.parametrize("content, words", [
    (None, "cannot read the bundle's spec"),
    ("{nope OCI_PORTFWD_", "is not valid JSON"),
])
def test_unreadable_bundle(tmp_path, env, install, content, words):
    b = tmp_path / "bundle"
    b.mkdir()
    if content is not None:
        (b / "config.json").write_text(content)
    with pytest.raises(rw.BundleError, match=words):
        rw.prepare_bundle(create(b), env, str(install / "oci-portfwd-runtime"))


# --- the real runtime ---------------------------------------------------------------------------

def test_runtime_default_and_configured(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("crun", "myruntime"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    own = str(tmp_path / "oci-portfwd-runtime")
    assert rw.resolve_runtime(None, str(bindir), own) == str(bindir / "crun")  # no runc there
    assert rw.resolve_runtime("myruntime", str(bindir), own) == str(bindir / "myruntime")
    assert rw.resolve_runtime(str(bindir / "crun"), "", own) == str(bindir / "crun")
    with pytest.raises(rw.RuntimeNotFound, match="'runsc' is not an executable"):
        rw.resolve_runtime("runsc", str(bindir), own)
    with pytest.raises(rw.RuntimeNotFound, match="neither runc nor crun"):
        rw.resolve_runtime(None, str(tmp_path / "empty"), own)
    (bindir / "runc").symlink_to(own)
    Path(own).write_text("#!/bin/sh\n")
    Path(own).chmod(0o755)
    with pytest.raises(rw.RuntimeNotFound, match="is oci-portfwd-runtime itself"):
        rw.resolve_runtime(None, str(bindir), own)


def test_configured_runtime_is_read_lightly(tmp_path):
    cfg = tmp_path / "c.json"
    assert rw.configured_runtime({"OCI_PORTFWD_CONFIG": str(cfg)}) is None  # absent
    cfg.write_text('{"runtime": "crun", "driver": "builtin"}')
    assert rw.configured_runtime({"OCI_PORTFWD_CONFIG": str(cfg)}) == "crun"
    cfg.write_text('{"runtime": ')  # broken: the default, so that delete still works
    assert rw.configured_runtime({"OCI_PORTFWD_CONFIG": str(cfg)}) is None
    assert load_runtime_key(cfg, '{"runtime": "/usr/bin/crun"}') == "/usr/bin/crun"
    with pytest.raises(ConfigError, match="/runtime"):
        load_runtime_key(cfg, '{"runtime": "bin/crun"}')


def test_check_config_prints_the_runtime(tmp_path):
    cfg = tmp_path / "c.json"
    hook = REPO / ".venv" / "bin" / "oci-portfwd-hook"
    for text, expected in [('{}', "runtime: default: runc, else crun -> "),
                           ('{"runtime": "/bin/sh"}', "runtime: /bin/sh -> /bin/sh (oci-portfwd-runtime"),
                           ('{"runtime": "nope"}', "runtime: nope -> NOT FOUND (the configured runtime 'nope'")]:
        cfg.write_text(text)
        r = subprocess.run([str(hook), "check-config", str(cfg)], capture_output=True, text=True,
                           timeout=30, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert r.returncode == 0 and expected in r.stdout, r.stdout + r.stderr


def load_runtime_key(path: Path, text: str):
    path.write_text(text)
    return config_module.load_config({"OCI_PORTFWD_CONFIG": str(path)}).runtime


def test_log_records():
    record = json.loads(rw.log_record("oci-portfwd-runtime: bad", "json"))
    assert record["level"] == "error" and record["msg"] == "oci-portfwd-runtime: bad"
    assert rw.log_record('say "x"', "text").endswith(' level=error msg="say \\"x\\""\n')


# --- the program: exec, exit codes, signals, errors (a fake runtime) -----------------------------

FAKE_RUNTIME = """#!/bin/sh
echo "pid=$$ args=$*"
[ -n "$FAKE_SIGNAL" ] && kill -"$FAKE_SIGNAL" $$
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def fake_runtime(tmp_path):
    if not os.access(WRAPPER, os.X_OK):
        pytest.fail(f"{WRAPPER} is missing: run `make venv`")
    fake = tmp_path / "fake-runc"
    fake.write_text(FAKE_RUNTIME)
    fake.chmod(0o755)
    cfg = tmp_path / "oci-portfwd.json"
    cfg.write_text(json.dumps({"runtime": str(fake)}))
    return {"OCI_PORTFWD_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}


def run_wrapper(env, *args, extra_env=None):
    proc = subprocess.Popen([str(WRAPPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, **(extra_env or {})}, text=True)
    out, err = proc.communicate(timeout=30)
    return proc, out, err


def test_execs_the_runtime_with_the_same_arguments(fake_runtime):
    args = ["--root", "/r", "--log", "/dev/null", "--log-format", "json", "kill", "cid", "9"]
    proc, out, _ = run_wrapper(fake_runtime, *args, extra_env={"FAKE_EXIT": "42"})
    assert proc.returncode == 42
    # The same process: exec'd, no child of ours in between.
    assert out.strip() == f"pid={proc.pid} args={' '.join(args)}"


def test_signal_death_passes_through(fake_runtime):
    proc, _, _ = run_wrapper(fake_runtime, "state", "cid", extra_env={"FAKE_SIGNAL": "TERM"})
    assert proc.returncode == -signal.SIGTERM


def test_bad_spec_error_goes_to_the_json_log(fake_runtime, tmp_path):
    b = bundle_with(tmp_path, spec(env=["OCI_PORTFWD_PORTS=99999:80"]))
    log = b / "log.json"
    proc, out, err = run_wrapper(fake_runtime, "--root", "/r", "--log", str(log), "--log-format",
                                 "json", "create", "--bundle", str(b), "cid")
    assert proc.returncode == 1 and out == ""  # the runtime never ran
    assert err.strip() == ("oci-portfwd-runtime: port spec '99999:80': host port 99999 is "
                           "outside 1-65535")
    assert json.loads(log.read_text())["msg"] == err.strip()


def test_create_without_request_execs_untouched(fake_runtime, tmp_path):
    b = bundle_with(tmp_path, spec())
    before = (b / "config.json").read_bytes()
    proc, out, _ = run_wrapper(fake_runtime, "create", "--bundle", str(b), "cid")
    assert proc.returncode == 0 and out.startswith(f"pid={proc.pid} ")
    assert (b / "config.json").read_bytes() == before


def test_missing_runtime_is_one_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"runtime": "/nonexistent/runc"}')
    proc, out, err = run_wrapper({"OCI_PORTFWD_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}, "state", "x")
    assert proc.returncode == 1
    assert err.strip() == ("oci-portfwd-runtime: the configured runtime '/nonexistent/runc' is "
                           "not an executable file (PATH=/usr/bin:/bin)")


def test_pass_through_imports_stay_light(tmp_path):
    """Every state/kill/delete pays for the wrapper's imports: none of the hook's heavy ones."""
    code = ("import sys; from oci_portfwd import runtime_wrapper; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=30).stdout.split())
    heavy = {"pyroute2", "jsonschema", "dataclasses", "typing", "pathlib", "logging",
             "oci_portfwd.config", "oci_portfwd.plan", "oci_portfwd.validators"}
    assert not loaded & heavy, loaded & heavy
