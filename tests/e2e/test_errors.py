"""Errors a user makes: one clear line on stderr, a non-zero exit, no traceback, nothing bound,
nothing left running. Directly (the hook with a state on stdin) and through both runtimes."""

import json
import re
import socket
import subprocess
import warnings
from pathlib import Path

import pytest
from e2ekit.hookenv import oci_state, reap_leftovers
from e2ekit.ports import port_is_free
from e2ekit.procs import find_by_comm, supervisor_comm
from e2ekit.services import Services

PORTS_ANNOTATION = "io.oci-portfwd.ports"
BAD_SPECS = ["99999:80", "abc", "1-5:1-3", "8080:99999", "300.0.0.1:8080:80"]


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 0, f"exit 0 for bad input; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {err!r}"
    return lines[0]



@pytest.fixture
def run_prestart(hook_env, tmp_path):
    """Runs prestart directly; a run that wrongly succeeds gets its poststop, so that a hook bug
    does not leak a supervisor into later tests; whatever is still left is then reaped."""
    ran: list[str] = []

    def run(state: str) -> subprocess.CompletedProcess:
        ran.append(state)
        return hook_env.run("prestart", stdin=state, cwd=tmp_path)

    yield run
    for state in ran:
        try:
            cid = json.loads(state)["id"]
        except (ValueError, KeyError, TypeError):
            continue
        hook_env.run("poststop", stdin=oci_state(cid, "stopped", tmp_path), cwd=tmp_path)
    killed = reap_leftovers(hook_env)
    if killed:
        warnings.warn(f"killed leftover hook processes {killed}", stacklevel=2)


def assert_nothing_left(cid: str, hook_env, binds) -> None:
    assert all(port_is_free(*b) for b in binds), [b for b in binds if not port_is_free(*b)]
    assert not hook_env.state_file(cid).exists()
    assert not find_by_comm(supervisor_comm(cid))


def test_malformed_state_json(run_prestart):
    assert_one_line_error(run_prestart('{"ociVersion": "1.0.2", "id": '))


def test_state_not_an_object(run_prestart):
    assert_one_line_error(run_prestart('["not", "a", "state"]'))


def test_prestart_state_without_pid(run_prestart, hook_env, tmp_path, port_alloc):
    port = port_alloc.take()
    state = oci_state("nopid0000", "creating", tmp_path,
                      annotations={PORTS_ANNOTATION: f"{port}:80"})
    assert_one_line_error(run_prestart(state))
    assert_nothing_left("nopid0000", hook_env, [("0.0.0.0", port, "tcp"), ("::", port, "tcp")])


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_port_spec(run_prestart, hook_env, tmp_path, netns_pid, port_alloc, spec):
    good = port_alloc.take()
    cid = "badspec00"
    state = oci_state(cid, "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS_ANNOTATION: f"127.0.0.1:{good}:80,{spec}"})
    line = assert_one_line_error(run_prestart(state))
    parts = [p for p in re.split(r"[:\[\]/]", spec) if p]
    assert any(p in line for p in parts), f"error does not name {spec!r}: {line}"
    assert_nothing_left(cid, hook_env, [("127.0.0.1", good, "tcp")])


def test_unknown_driver_annotation(run_prestart, hook_env, tmp_path, netns_pid, port_alloc):
    port = port_alloc.take()
    state = oci_state("baddriver", "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS_ANNOTATION: f"127.0.0.1:{port}:80",
                                   "io.oci-portfwd.driver": "no-such-driver"})
    line = assert_one_line_error(run_prestart(state))
    assert "no-such-driver" in line
    assert_nothing_left("baddriver", hook_env, [("127.0.0.1", port, "tcp")])


def test_too_many_ports(run_prestart, hook_env, tmp_path, netns_pid, port_alloc):
    hook_env.write_config({"state_dir": str(hook_env.state_dir), "max_ports": 2})
    port = port_alloc.take(3)
    state = oci_state("toomany00", "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS_ANNOTATION: f"127.0.0.1:{port}-{port + 2}:80-82"})
    assert_one_line_error(run_prestart(state))
    assert_nothing_left("toomany00", hook_env, [("127.0.0.1", p, "tcp") for p in range(port, port + 3)])


BAD_CONFIGS = {
    "unknown-key": '{"no_such_key": 1}',
    "unknown-driver": '{"driver": "no-such-driver"}',
    "wrong-type": '{"max_ports": "many"}',
    "bad-loopback": '{"loopback": "sideways"}',
    "not-json": "{driver: builtin",
}


@pytest.mark.parametrize("text", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_fails_prestart(run_prestart, hook_env, tmp_path, netns_pid, port_alloc, text):
    hook_env.write_config(text)
    port = port_alloc.take()
    state = oci_state("badconfig", "creating", tmp_path, pid=netns_pid,
                      annotations={PORTS_ANNOTATION: f"127.0.0.1:{port}:80"})
    line = assert_one_line_error(run_prestart(state))
    assert str(hook_env.config_path) in line or hook_env.config_path.name in line, line
    assert_nothing_left("badconfig", hook_env, [("127.0.0.1", port, "tcp")])


@pytest.mark.parametrize("text", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_check_config_rejects(hook_env, tmp_path, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert_one_line_error(hook_env.run("check-config", str(bad)))


def test_check_config_accepts_a_full_config(hook_env, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"driver": "builtin", "loopback": "preserve",
                                "state_dir": str(tmp_path / "s"), "udp_idle_timeout": 30,
                                "max_ports": 10, "ready_timeout": 5, "log_level": "info"}))
    r = hook_env.run("check-config", str(good))
    assert r.returncode == 0, r.stderr.decode()


def test_version(hook_env):
    init = Path(__file__).resolve().parents[2] / "hook" / "oci_portfwd" / "__init__.py"
    version = re.search(r'__version__ = "([^"]+)"', init.read_text()).group(1)
    r = hook_env.run("--version")
    assert r.returncode == 0, r.stderr.decode()
    assert version in r.stdout.decode(), r.stdout


# --- through the runtimes -------------------------------------------------------------------

def runtime_error_text(container, result, hook_env) -> str:
    """Where the hook's error line ends up: runc folds hook stderr into its own error; crun
    drops it, so the hook's log is the only place."""
    return result.stderr if container.runtime.name == "runc" else hook_env.log_text(container.id)


def test_host_port_in_use_fails_the_container(containers, hook_env, port_alloc):
    busy, other, udp = port_alloc.take(), port_alloc.take(), port_alloc.take()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen(1)
        c = containers.new(Services().whoami(81).argv(), hook=hook_env,
                           ports=f"{other}:81,127.0.0.1:{busy}:81,{udp}:53/udp")
        result = c.create()
        assert not result.ok, "the container started although its host port was taken"
        text = runtime_error_text(c, result, hook_env)
        assert f"127.0.0.1:{busy}" in text, f"error does not name 127.0.0.1:{busy}:\n{text}"
        assert c.status() in (None, "stopped"), c.status()
        assert_nothing_left(c.id, hook_env, [("0.0.0.0", other, "tcp"), ("::", other, "tcp"),
                                             ("0.0.0.0", udp, "udp"), ("::", udp, "udp")])


def test_bad_annotation_fails_the_container(containers, hook_env, port_alloc):
    good = port_alloc.take()
    c = containers.new(Services().whoami(81).argv(), hook=hook_env,
                       ports=f"127.0.0.1:{good}:81,99999:81")
    result = c.create()
    assert not result.ok, "the container started with an invalid port spec"
    text = runtime_error_text(c, result, hook_env)
    assert "99999" in text, text
    assert "Traceback" not in text, text
    assert c.status() in (None, "stopped"), c.status()
    assert_nothing_left(c.id, hook_env, [("127.0.0.1", good, "tcp")])


def test_a_state_too_large_is_refused_without_killing_the_runtime(containers, hook_env, port_alloc):
    """A state over the 1 MiB the hook reads (a huge annotation): the hook says so and reads
    the rest anyway. Left unread, the runtime's write of the state fails, and crun before 1.17
    dies of the SIGPIPE (crun issue 1551): `run` and `delete` killed, no word of why."""
    port = port_alloc.take()
    c = containers.new(Services().whoami(81).argv(), hook=hook_env, ports=f"127.0.0.1:{port}:81",
                       annotations={"example.com/huge": "x" * (3 << 20)})
    result = c.create()
    assert result.returncode > 0, f"run: exit {result.returncode} (negative: killed by a signal)\n{result.stderr}"
    if c.runtime.name == "runc":  # crun drops a hook's stderr, and no log names a container it cannot read
        assert "state on stdin is larger than" in result.stderr, result.stderr
    deleted = c.delete()
    assert deleted.returncode >= 0, f"delete: killed by signal {-deleted.returncode}\n{deleted.stderr}"
    assert c.status() is None
    assert_nothing_left(c.id, hook_env, [("127.0.0.1", port, "tcp")])
