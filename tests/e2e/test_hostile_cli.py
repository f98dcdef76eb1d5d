"""Hostile input through the real CLI, as a runtime would run it: a table of states, configs and
annotations (thousands of ports, ranges over max_ports, huge numbers, NaN), plus a small
property test. Each gets exit 1 (2 is a bug) with one line `oci-portfwd-hook: STAGE: …` on
stderr and no traceback, and nothing is bound: the ports the input names are free afterwards,
no state file, no supervisor. max_ports is inclusive: exactly 1024 ports work end to end.

Unit-level properties of the same parsers: tests/unit/test_hostile_input.py. test_errors.py has
the plain user errors (bad spec, bad config keys, port in use).
"""

import json
import subprocess
import warnings

import pytest
from e2ekit.hookenv import oci_state, reap_leftovers
from e2ekit.ports import listeners
from e2ekit.procs import find_by_comm, supervisor_comm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PORTS = "io.oci-portfwd.ports"
MAX_PORTS = 1024   # the default



@pytest.fixture
def hostile(hook_env, tmp_path, netns_pid):
    """Runs a stage with given stdin; afterwards (even on failure) poststop for every id seen and
    a reap of leftovers, so that a hook bug does not leak into later tests."""
    ids: set[str] = set()

    def run(stage: str, stdin: bytes | str, cid: str = "hostile0") -> subprocess.CompletedProcess:
        ids.add(cid)
        return hook_env.run(stage, stdin=stdin, cwd=tmp_path)

    run.pid = netns_pid
    yield run
    for cid in ids:
        hook_env.run("poststop", stdin=oci_state(cid, "stopped", tmp_path), cwd=tmp_path)
    killed = reap_leftovers(hook_env)
    if killed:
        warnings.warn(f"killed leftover hook processes {killed}", stacklevel=2)


def assert_refused(result: subprocess.CompletedProcess, stage: str) -> str:
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 2, f"exit 2, an internal error (a bug): {err[:500]}"
    assert result.returncode == 1, f"exit {result.returncode}; stderr {err[:500]!r}"
    assert "Traceback" not in err, err[:2000]
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[:500]!r}"
    assert lines[0].startswith(f"oci-portfwd-hook: {stage}: "), lines[0][:300]
    return lines[0]


def assert_nothing_bound(hook_env, cid: str, ports: set[int]) -> None:
    bound = {p for proto in ("tcp", "udp") for _, p in listeners(proto)} & ports
    assert not bound, f"ports bound after a refused start: {sorted(bound)[:20]}"
    assert not hook_env.state_file(cid).exists(), "a state file after a refused start"
    assert not find_by_comm(supervisor_comm(cid)), "a supervisor after a refused start"


def state(pid: int, ports: str, cid: str = "hostile0", **extra) -> str:
    return json.dumps({"ociVersion": "1.0.2-dev", "id": cid, "status": "creating", "pid": pid,
                       "bundle": "/nonexistent", "annotations": {PORTS: ports}, **extra})


@pytest.fixture(scope="module")
def many_ports(port_alloc) -> list[int]:
    """MAX_PORTS + 76 free host ports, one by one: a block that large is rarely free in one
    piece late in a session (the allocator never hands a port out twice)."""
    return [port_alloc.take() for _ in range(MAX_PORTS + 76)]


def bound_among(ports: set[int]) -> set[int]:
    return {p for proto in ("tcp", "udp") for _, p in listeners(proto)} & ports


def test_thousands_of_ports(hostile, hook_env, many_ports):
    spec = ",".join(f"127.0.0.1:{p}:80" for p in many_ports)
    line = assert_refused(hostile("prestart", state(hostile.pid, spec)), "prestart")
    assert "max_ports" in line, line
    assert_nothing_bound(hook_env, "hostile0", set(many_ports))


def test_range_larger_than_max_ports(hostile, hook_env):
    # Below the allocator's ports: some may be in use by others, so "nothing bound" is "nothing
    # new bound" here.
    first, last = 12000, 12000 + MAX_PORTS
    ports = set(range(first, last + 1))
    before = bound_among(ports)
    line = assert_refused(hostile("prestart", state(hostile.pid, f"{first}-{last}:{first}-{last}/udp")),
                          "prestart")
    assert "max_ports" in line, line
    assert bound_among(ports) <= before, sorted(bound_among(ports) - before)[:20]
    assert not hook_env.state_file("hostile0").exists()


def test_range_larger_than_a_lowered_max_ports(hostile, hook_env, port_alloc):
    hook_env.write_config({"state_dir": str(hook_env.state_dir), "max_ports": 10})
    base = port_alloc.take(11)
    line = assert_refused(hostile("prestart", state(hostile.pid, f"127.0.0.1:{base}-{base + 10}:80-90")),
                          "prestart")
    assert "max_ports" in line and "10" in line, line
    assert_nothing_bound(hook_env, "hostile0", set(range(base, base + 11)))


@pytest.mark.timeout(60)
def test_exactly_max_ports_works(hostile, hook_env, many_ports):
    """The default limit itself must work: 1,024 listeners (beyond FD_SETSIZE with the rest)."""
    ports = many_ports[:MAX_PORTS]
    spec = ",".join(f"127.0.0.1:{p}:80" for p in ports)
    r = hostile("prestart", state(hostile.pid, spec, cid="hostile1024"), cid="hostile1024")
    assert r.returncode == 0, r.stderr.decode()[:1000]
    assert set(ports) <= {p for a, p in listeners("tcp") if a == "127.0.0.1"}
    r = hostile("poststop", oci_state("hostile1024", "stopped", hook_env.workdir), cid="hostile1024")
    assert r.returncode == 0, r.stderr.decode()
    assert_nothing_bound(hook_env, "hostile1024", set(ports))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def state_with(netns_pid: int, port: int, /, **changes) -> str:
    """A prestart state for 127.0.0.1:port:80 with fields replaced; a value given as
    RAW(text) goes into the JSON as written (NaN, huge numbers, nesting)."""
    doc = json.loads(state(netns_pid, f"127.0.0.1:{port}:80"))
    raws = {}
    for key, value in changes.items():
        if isinstance(value, RAW):
            raws[f"@@{key}@@"] = str(value)
            value = f"@@{key}@@"
        doc[key] = value
    text = json.dumps(doc)
    for placeholder, raw in raws.items():
        text = text.replace(json.dumps(placeholder), raw)
    return text


class RAW(str):
    pass


ANN = "io.oci-portfwd.ports"
STATE_CASES = {
    "over-1MiB": lambda pid, p: state_with(pid, p, pad="x" * (1 << 20)),
    "nested-200k": lambda pid, p: _nested(200000),
    "nested-in-annotations": lambda pid, p: state_with(pid, p, x=RAW(_nested(50000))),
    "pid-string": lambda pid, p: state_with(pid, p, pid=str(pid)),
    "pid-nan": lambda pid, p: state_with(pid, p, pid=RAW("NaN")),
    "pid-huge": lambda pid, p: state_with(pid, p, pid=RAW("1" + "0" * 5000)),
    "annotations-list": lambda pid, p: state_with(pid, p, annotations=[{ANN: f"127.0.0.1:{p}:80"}]),
    "annotation-number": lambda pid, p: state_with(pid, p, annotations={ANN: p}),
    "id-path": lambda pid, p: state_with(pid, p, id="../../etc/x"),
    "id-newline": lambda pid, p: state_with(pid, p, id="web\nforged"),
    "status-unknown": lambda pid, p: state_with(pid, p, status="exploded"),
    "not-utf8": lambda pid, p: state_with(pid, p).encode().replace(b"creating", b"cr\xffating"),
    "huge-port-number": lambda pid, p: state_with(pid, p, annotations={ANN: f"127.0.0.1:{p}:80," + "1" * 5000 + ":80"}),
    "port-range-backwards": lambda pid, p: state_with(pid, p, annotations={ANN: f"{p + 5}-{p}:{p + 5}-{p}"}),
    "unknown-annotation": lambda pid, p: state_with(pid, p, annotations={ANN: f"127.0.0.1:{p}:80",
                                                                           "io.oci-portfwd.prots": "x"}),
}


@pytest.mark.parametrize("make", STATE_CASES.values(), ids=STATE_CASES.keys())
def test_hostile_state(hostile, hook_env, port_alloc, make):
    port = port_alloc.take()
    assert_refused(hostile("prestart", make(hostile.pid, port)), "prestart")
    assert_nothing_bound(hook_env, "hostile0", {port})


CONFIG_CASES = {
    "ready-timeout-nan": '{"ready_timeout": NaN}',
    "udp-timeout-nan": '{"udp_idle_timeout": NaN}',
    "max-ports-zero": '{"max_ports": 0}',
    "max-ports-bool": '{"max_ports": true}',
    "max-ports-huge": '{"max_ports": 1' + "0" * 5000 + "}",
    "state-dir-number": '{"state_dir": 5}',
    "nested": '{"driver": ' + _nested(100000) + "}",
    "top-level-list": "[]",
}


@pytest.mark.parametrize("text", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_hostile_config(hostile, hook_env, port_alloc, text):
    if text.startswith("{") and "state_dir" not in text:
        # This test's own state dir, so that a wrongly accepted config touches nothing else.
        text = text[:-1] + f', "state_dir": "{hook_env.state_dir}"}}'
    hook_env.write_config(text)
    port = port_alloc.take()
    assert_refused(hostile("prestart", state(hostile.pid, f"127.0.0.1:{port}:80,127.0.0.1:{port}:53/udp")),
                   "prestart")
    assert_nothing_bound(hook_env, "hostile0", {port})


def test_unknown_stage_is_a_usage_error(hook_env, tmp_path):
    r = hook_env.run("bogus", stdin=oci_state("x", "creating", tmp_path), cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 64, (r.returncode, err)
    assert "Traceback" not in err and "bogus" in err.splitlines()[0], err


@pytest.mark.parametrize("status", ["running", "paused", "exploded", ""])
def test_auto_refuses_a_status_it_cannot_map(hostile, hook_env, port_alloc, status):
    port = port_alloc.take()
    raw = state(hostile.pid, f"127.0.0.1:{port}:80").replace('"creating"', json.dumps(status))
    line = assert_refused(hostile("auto", raw), "auto")
    assert "prestart or poststop" in line, line
    assert_nothing_bound(hook_env, "hostile0", {port})


spec_parts = st.sampled_from(["{p}", "{q}", "0", "65536", "-", ":", ",", "/udp", "/tcp", "/sctp",
                              "127.0.0.1:", "[::1]:", "[::1", "x", "", "{p}-{q}", " "])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(parts=st.lists(spec_parts, min_size=1, max_size=8))
def test_random_annotations_never_crash_or_leak(hostile, hook_env, port_alloc, parts):
    """A random annotation from spec fragments (ports p and q are ours, free): exit 0 (then
    poststop frees everything) or exit 1 with one line, never exit 2, and nothing left bound."""
    p = port_alloc.take(2)
    spec = "".join(parts).format(p=p, q=p + 1)
    r = hostile("prestart", state(hostile.pid, spec))
    if r.returncode == 0:
        stop = hostile("poststop", oci_state("hostile0", "stopped", hook_env.workdir))
        assert stop.returncode == 0, stop.stderr.decode()
    else:
        assert_refused(r, "prestart")
    assert_nothing_bound(hook_env, "hostile0", {p, p + 1})
