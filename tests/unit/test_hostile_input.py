"""Hostile input to the parsers, by property (hypothesis) and by a table of cases: the port-spec
parser, the OCI state JSON, the config file, the annotations (thousands of ports, ranges larger
than max_ports). Whatever comes in, the result is either a well-formed value or the module's
own error (a PortfwdError) whose message is one short line: the CLI prints it as the single
line `oci-portfwd-hook: STAGE: MESSAGE` with exit 1. Any other exception is exit 2, a bug.

The same inputs through the real CLI, with "nothing bound" checked on the host, are in
tests/e2e/test_hostile_cli.py.
"""

import json
import math
import re
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oci_portfwd.cli import stage_from_status
from oci_portfwd.config import Config, load_config
from oci_portfwd.errors import ConfigError, PortfwdError, PortSpecError, StateError
from oci_portfwd.plan import make_plan
from oci_portfwd.ports import PROTOCOLS, parse_port_specs
from oci_portfwd.state import ContainerState, parse_state

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=80, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# "One clear line": a message must also stay readable for a huge input.
MAX_MESSAGE = 1000
DEFAULT_MAX_PORTS = Config().max_ports
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,255}")


def assert_one_line(error: BaseException, short: bool = False) -> str:
    """The error is ours and one line; `short`: also readable (huge inputs are the tables' and
    test_huge_input_gives_a_short_line's business, so that each failure says one thing)."""
    assert isinstance(error, PortfwdError), f"{type(error).__name__}: {error} (the CLI exits 2)"
    message = str(error)
    assert message.strip(), "an empty error message"
    assert "\n" not in message and "\r" not in message, f"more than one line: {message[:300]!r}"
    if short:
        assert len(message) <= MAX_MESSAGE, f"a {len(message)}-character line: {message[:120]!r}…"
    return message


# --- port specs ---------------------------------------------------------------------------------

SPEC_ALPHABET = st.sampled_from(list("0123456789:[]/-,. ") + ["tcp", "udp", "TCP", "::", "²", "٣",
                                                              "\n", "\x00", "ff", "127.0.0.1"])
spec_text = st.lists(SPEC_ALPHABET, max_size=40).map("".join)
port_numbers = st.one_of(st.integers(-2, 70000), st.sampled_from([0, 1, 65535, 65536]),
                         st.integers(10**4299, 10**4299 + 5))
addresses = st.sampled_from(["", "127.0.0.1:", "127.0.0.2:", "0.0.0.0:", "[::1]:", "[::]:",
                             "[0:0::1]:", "::1:", "1.2.3:", "[1.2.3.4]:", "[fe80::1%lo]:"])


def _port_text(value) -> st.SearchStrategy[str]:
    return st.just(str(value))


@st.composite
def near_valid_specs(draw) -> str:
    """Specs built from the grammar, each part valid or slightly off."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        h1, c1 = draw(port_numbers), draw(port_numbers)
        host, cont = str(h1), str(c1)
        if draw(st.booleans()):
            span = draw(st.integers(-1, 3000))
            host += f"-{h1 + span}"
            cont += f"-{c1 + span + draw(st.sampled_from([0, 0, 0, 1]))}"
        proto = draw(st.sampled_from(["", "/tcp", "/udp", "/UDP", "/sctp", "/"]))
        parts.append(f"{draw(addresses)}{host}:{cont}{proto}")
    return ",".join(parts)


def check_mappings(mappings, max_ports: int | None) -> None:
    assert max_ports is None or len(mappings) <= max_ports
    keys = set()
    for m in mappings:
        assert 1 <= m.host_port <= 65535 and 1 <= m.container_port <= 65535, m
        assert m.proto in PROTOCOLS
        keys.add((m.host_ip, m.host_port, m.proto))
    assert len(keys) == len(mappings), "a host port requested twice was accepted"


@PROPERTY
@given(text=st.one_of(spec_text, near_valid_specs()), max_ports=st.sampled_from([None, 1, 5, 1024]))
@example(text="1" * 5000 + ":80", max_ports=1024)
@example(text="80:" + "9" * 4301, max_ports=None)
def test_port_specs_parse_or_fail_with_one_line(text, max_ports):
    try:
        mappings = parse_port_specs(text, max_ports)
    except PortfwdError as e:
        assert isinstance(e, PortSpecError), type(e)
        assert_one_line(e)
    except Exception as e:  # noqa: BLE001 - the property's point
        pytest.fail(f"parse_port_specs({text[:60]!r}…) raised {type(e).__name__}: {str(e)[:200]}")
    else:
        check_mappings(mappings, max_ports)


@PROPERTY
@given(ranges=st.lists(st.tuples(st.integers(1, 60000), st.integers(0, 600)), min_size=1, max_size=6),
       max_ports=st.integers(1, 1500))
def test_max_ports_counts_every_port_of_every_range(ranges, max_ports):
    # Disjoint host ranges, so that only the count can fail.
    specs, total, base = [], 0, 1
    for _, length in ranges:
        if base + length > 65535:
            break
        specs.append(f"{base}-{base + length}:{base}-{base + length}")
        total += length + 1
        base += length + 1
    try:
        mappings = parse_port_specs(",".join(specs), max_ports)
    except PortSpecError as e:
        assert total > max_ports, f"{total} ports <= max_ports {max_ports} refused: {e}"
        assert "max_ports" in assert_one_line(e)
    else:
        assert total <= max_ports and len(mappings) == total


PORT_SPEC_CASES = {
    "thousands-of-single-ports": ",".join(f"{p}:{p}" for p in range(20000, 25000)),
    "range-larger-than-limit": "1-65535:1-65535",
    "limit-plus-one": "20000-21024:20000-21024",
    "thousands-of-duplicates": ",".join(["8080:80"] * 3000),
    "huge-number": "1" * 5000 + ":80",
    "huge-container-number": "80:" + "9" * 5000,
    "huge-range-end": "1-" + "9" * 5000 + ":1-2",
    "nul-byte": "8080\x00:80",
    "newline-in-spec": "8080:80\n/tcp",
    "unicode-digits": "８０８０:80",
}


@pytest.mark.parametrize("text", PORT_SPEC_CASES.values(), ids=PORT_SPEC_CASES.keys())
def test_hostile_port_specs_table(text):
    started = time.monotonic()
    with pytest.raises(PortfwdError) as e:
        parse_port_specs(text, DEFAULT_MAX_PORTS)
    assert time.monotonic() - started < 2, "parsing took over 2 s"
    assert_one_line(e.value)


def test_exactly_max_ports_is_accepted():
    assert len(parse_port_specs("20000-21023:20000-21023", DEFAULT_MAX_PORTS)) == DEFAULT_MAX_PORTS


# --- the OCI state ------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)
ids = st.one_of(st.text(max_size=20),
                st.sampled_from(["web", "web\n", "..", ".", "a/b", "../etc", "-x", "a" * 256,
                                 "a" * 257, "web\x00", "wéb", "web ", " web", "a.b+c_d-e"]))
VALID_STATE = {"ociVersion": "1.0.2-dev", "id": "web", "status": "creating", "pid": 4242,
               "bundle": "/nonexistent-bundle", "annotations": {"io.oci-portfwd.ports": "8080:80"}}
FIELD_VALUES = {
    "ociVersion": st.one_of(json_values, st.text(min_size=60, max_size=70)),
    "id": st.one_of(ids, json_values),
    "status": st.one_of(st.sampled_from(["creating", "created", "running", "stopped", "paused",
                                         "exploded", "", "STOPPED"]), json_values),
    "pid": st.one_of(st.integers(-5, 5_000_000), st.sampled_from([0, 1, 4194304, 4194305, 2**64]),
                     st.floats(allow_nan=True), json_values),
    "bundle": st.one_of(st.text(max_size=20), st.just("x" * 5000), json_values),
    "annotations": st.one_of(st.dictionaries(st.text(max_size=25), st.one_of(st.text(max_size=20),
                                                                             json_values),
                                             max_size=4), json_values),
    "root": json_values,
}


@st.composite
def hostile_states(draw) -> dict:
    doc = dict(VALID_STATE)
    for key in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)))):
        doc[key] = draw(FIELD_VALUES[key])
    for key in draw(st.sets(st.sampled_from(sorted(VALID_STATE)))):
        doc.pop(key, None)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=8))] = draw(json_values)
    return doc


def check_state(state: ContainerState, full: bool) -> None:
    assert SAFE_ID.fullmatch(state.id), f"container id {state.id!r} accepted (it names files)"
    assert isinstance(state.annotations, dict)
    if full:    # poststop never uses the pid
        assert state.pid is None or (type(state.pid) is int and state.pid > 0), state.pid


@PROPERTY
@given(doc=hostile_states(), full=st.booleans())
@example(doc={**VALID_STATE, "id": "web\n"}, full=False)
@example(doc={**VALID_STATE, "annotations": {"\n": 1}}, full=True)
def test_state_parses_or_fails_with_one_line(doc, full):
    raw = json.dumps(doc).encode()
    try:
        state = parse_state(raw, full_validation=full)
    except PortfwdError as e:
        assert isinstance(e, StateError), type(e)
        assert_one_line(e)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"parse_state(full_validation={full}) raised {type(e).__name__}: {e}")
    else:
        check_state(state, full)
        if full:
            assert all(isinstance(v, str) for v in state.annotations.values())


@PROPERTY
@given(status=json_values)
@example(status="running")
@example(status="paused")
def test_auto_stage_from_any_status(status):
    raw = json.dumps({**VALID_STATE, "status": status}).encode()
    try:
        stage = stage_from_status(raw)
    except PortfwdError as e:
        assert status not in ("creating", "created", "stopped")
        assert_one_line(e)
    else:
        assert stage == ("poststop" if status == "stopped" else "prestart")
        assert status in ("creating", "created", "stopped")


def _nested(depth: int, open_: str, close: str) -> bytes:
    return (open_ * depth + close * depth).encode()


STATE_CASES = {
    "empty": b"",
    "whitespace": b" \n\t ",
    "over-1MiB": b'{"ociVersion": "1.0", "id": "web", "status": "creating", "pad": "'
                 + b"x" * (1 << 20) + b'"}',
    "over-1MiB-of-spaces": b" " * ((1 << 20) + 10),
    "nested-arrays": _nested(200000, "[", "]"),
    "nested-objects": b'{"a":' * 100000 + b"1" + b"}" * 100000,
    "nested-in-annotations": b'{"ociVersion": "1.0", "id": "web", "status": "creating", "pid": 5, '
                             b'"annotations": {"x": ' + _nested(50000, "[", "]") + b"}}",
    "array": b"[]",
    "string": b'"state"',
    "number": b"42",
    "null": b"null",
    "not-utf8": b'{"ociVersion": "1.0", "id": "w\xff\xfe", "status": "creating"}',
    "nul-bytes": b'{"ociVersion": "1.0", "id": "web", "status": "creating"}\x00\x00',
    "truncated": b'{"ociVersion": "1.0", "id": "web", "status": "crea',
    "nan-pid": b'{"ociVersion": "1.0", "id": "web", "status": "creating", "pid": NaN}',
    "huge-pid": b'{"ociVersion": "1.0", "id": "web", "status": "creating", "pid": 1' + b"0" * 5000 + b"}",
    "pid-string": json.dumps({**VALID_STATE, "pid": "4242"}).encode(),
    "pid-negative": json.dumps({**VALID_STATE, "pid": -1}).encode(),
    "pid-too-big": json.dumps({**VALID_STATE, "pid": 2**40}).encode(),
    "pid-bool": json.dumps({**VALID_STATE, "pid": True}).encode(),
    "id-number": json.dumps({**VALID_STATE, "id": 7}).encode(),
    "id-path": json.dumps({**VALID_STATE, "id": "../../etc/passwd"}).encode(),
    "id-newline": json.dumps({**VALID_STATE, "id": "web\nINFO forged log line"}).encode(),
    "id-trailing-newline": json.dumps({**VALID_STATE, "id": "web\n"}).encode(),
    "id-too-long": json.dumps({**VALID_STATE, "id": "a" * 257}).encode(),
    "status-unknown": json.dumps({**VALID_STATE, "status": "exploded"}).encode(),
    "status-number": json.dumps({**VALID_STATE, "status": 3}).encode(),
    "annotations-list": json.dumps({**VALID_STATE, "annotations": ["8080:80"]}).encode(),
    "annotation-not-string": json.dumps({**VALID_STATE, "annotations": {"io.oci-portfwd.ports": 8080}}).encode(),
    "missing-everything": b"{}",
}


@pytest.mark.parametrize("raw", STATE_CASES.values(), ids=STATE_CASES.keys())
@pytest.mark.parametrize("full", [True, False], ids=["prestart", "poststop"])
def test_hostile_states_table(raw, full):
    try:
        state = parse_state(raw, full_validation=full)
    except PortfwdError as e:
        assert_one_line(e)
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__}: {str(e)[:200]} (the CLI exits 2)")
    # poststop is lenient on purpose (it must find the forwarding whatever the runtime sends),
    # but what it accepts must still be safe to use.
    assert not full, f"prestart accepted {raw[:80]!r}"
    check_state(state, full)


# --- the config ---------------------------------------------------------------------------------

CONFIG_KEYS = ["driver", "loopback", "state_dir", "udp_idle_timeout", "max_ports", "ready_timeout",
               "log_level", "allow_host_loopback", "$schema"]
config_values = st.one_of(json_values, st.sampled_from([
    "builtin", "pasta", "slirp4netns", "preserve", "loopback", "container-address", "/run/x",
    "relative", "", "debug", "info", "WARNING", 0, 1, 1024, 65535, 65536, 0.5, 300, 301, 86400,
    86401, -1, 5.0, True, False, math.nan, math.inf, -math.inf, 1e308, 2**63]))


@st.composite
def hostile_configs(draw):
    doc = draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, max_size=5))
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.text(max_size=12))] = draw(json_values)
    return doc


def check_config(config: Config) -> None:
    assert config.driver in ("builtin", "slirp4netns", "pasta")
    assert config.loopback in ("preserve", "loopback", "container-address")
    assert config.log_level in ("debug", "info", "warning", "error")
    assert config.state_dir is None or (isinstance(config.state_dir, str) and config.state_dir.startswith("/"))
    assert type(config.allow_host_loopback) is bool
    assert type(config.max_ports) in (int, float) and 1 <= config.max_ports <= 65535
    for key, top in (("udp_idle_timeout", 86400), ("ready_timeout", 300)):
        value = getattr(config, key)
        assert type(value) in (int, float) and math.isfinite(value) and 0 < value <= top, \
            f"{key}={value!r} accepted"


def write(tmp_path, text: str | bytes):
    path = tmp_path / "oci-portfwd.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return {"OCI_PORTFWD_CONFIG": str(path)}


@FEW
@given(doc=hostile_configs())
@example(doc={"ready_timeout": math.nan})
@example(doc={"udp_idle_timeout": math.nan})
def test_config_loads_or_fails_with_one_line(tmp_path, doc):
    env = write(tmp_path, json.dumps(doc))
    try:
        config = load_config(env)
    except PortfwdError as e:
        assert isinstance(e, ConfigError), type(e)
        assert_one_line(e)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"load_config raised {type(e).__name__}: {e}")
    else:
        check_config(config)


CONFIG_CASES = {
    "unknown-key": '{"drivr": "builtin"}',
    "unknown-nested": '{"driver": {"name": "builtin"}}',
    "list": "[]",
    "string": '"builtin"',
    "null": "null",
    "number": "1",
    "empty-file": "",
    "max-ports-zero": '{"max_ports": 0}',
    "max-ports-bool": '{"max_ports": true}',
    "max-ports-float": '{"max_ports": 10.5}',
    "max-ports-huge": '{"max_ports": 1' + "0" * 5000 + "}",
    "max-ports-string": '{"max_ports": "1024"}',
    "ready-timeout-nan": '{"ready_timeout": NaN}',
    "udp-timeout-nan": '{"udp_idle_timeout": NaN}',
    "ready-timeout-infinity": '{"ready_timeout": Infinity}',
    "ready-timeout-negative": '{"ready_timeout": -1}',
    "state-dir-relative": '{"state_dir": "run/x"}',
    "state-dir-number": '{"state_dir": 5}',
    "log-level-upper": '{"log_level": "DEBUG"}',
    "allow-host-loopback-string": '{"allow_host_loopback": "yes"}',
    "duplicate-key-last-bad": '{"driver": "builtin", "driver": "nope"}',
    "deeply-nested": '{"driver": ' + "[" * 100000 + "]" * 100000 + "}",
    "over-1MiB": '{"$schema": "' + "x" * (1 << 20) + '"}',
    "not-utf8": b'{"driver": "b\xffuiltin"}',
}


@pytest.mark.parametrize("text", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
@pytest.mark.parametrize("thorough", [False, True], ids=["prestart", "check-config"])
def test_hostile_configs_table(tmp_path, text, thorough):
    env = write(tmp_path, text)
    with pytest.raises(PortfwdError) as e:
        config = load_config(env, thorough=thorough)
        pytest.fail(f"accepted: {config}")
    assert_one_line(e.value)


@pytest.mark.parametrize("path", ["/dev/zero", "/", "/proc/self/mem"])
def test_config_path_that_is_not_a_file(path):
    with pytest.raises(ConfigError) as e:
        load_config({"OCI_PORTFWD_CONFIG": path})
    assert_one_line(e.value)


# --- annotations --------------------------------------------------------------------------------

CRUN_STATE = {**VALID_STATE, "status": "created"}


def plan_for(annotations: dict, config: Config | None = None):
    state = parse_state(json.dumps({**CRUN_STATE, "annotations": annotations}).encode(),
                        full_validation=True)
    return make_plan(state, annotations, config or Config())


ANNOTATION_CASES = {
    "5000-ports": {"io.oci-portfwd.ports": ",".join(f"{p}:80" for p in range(20000, 25000))},
    "range-over-limit": {"io.oci-portfwd.ports": "20000-30000:20000-30000"},
    "all-ports": {"io.oci-portfwd.ports": "1-65535:1-65535/udp"},
    "limit-plus-one": {"io.oci-portfwd.ports": "20000-21024:20000-21024"},
    "unknown-annotation": {"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.port": "3:4"},
    "unknown-driver": {"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.driver": "../../bin/sh"},
    "unknown-loopback": {"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.loopback": "sideways"},
}


@pytest.mark.parametrize("annotations", ANNOTATION_CASES.values(), ids=ANNOTATION_CASES.keys())
def test_hostile_annotations_table(annotations):
    with pytest.raises(PortfwdError) as e:
        plan = plan_for(annotations)
        if plan.driver not in ("builtin", "slirp4netns", "pasta"):
            from oci_portfwd.drivers import get_driver

            get_driver(plan.driver)
        pytest.fail(f"accepted: {plan}")
    assert_one_line(e.value)


@FEW
@given(annotations=st.dictionaries(
    st.one_of(st.sampled_from(["io.oci-portfwd.ports", "io.oci-portfwd.driver",
                               "io.oci-portfwd.loopback", "io.oci-portfwd.", "io.oci-portfwd.Ports",
                               "other"]), st.text(max_size=12)),
    st.one_of(spec_text, near_valid_specs(), st.text(max_size=20)), max_size=4),
    max_ports=st.integers(1, 2000))
def test_annotations_plan_or_fail_with_one_line(annotations, max_ports):
    try:
        plan = plan_for(annotations, Config(max_ports=max_ports))
    except PortfwdError as e:
        assert_one_line(e)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"make_plan raised {type(e).__name__}: {str(e)[:200]}")
    else:
        check_mappings(plan.mappings, max_ports)
        assert plan.loopback in ("preserve", "loopback", "container-address")


# --- huge input, short lines -------------------------------------------------------------------

HUGE_INPUTS = {
    "port-spec-1MiB-of-commas": lambda: parse_port_specs("," * (1 << 20), DEFAULT_MAX_PORTS),
    "port-spec-1MiB-word": lambda: parse_port_specs("x" * (1 << 20), DEFAULT_MAX_PORTS),
    "port-spec-4000-digit-port": lambda: parse_port_specs("0:" + "1" * 4000, DEFAULT_MAX_PORTS),
    "loopback-annotation-100k": lambda: plan_for({"io.oci-portfwd.ports": "1:2",
                                                  "io.oci-portfwd.loopback": "x" * 100000}),
    "unknown-annotation-100k": lambda: plan_for({"io.oci-portfwd." + "x" * 100000: "1"}),
    "state-id-100k": lambda: parse_state(json.dumps({**VALID_STATE, "id": "x" * 100000}).encode(),
                                         full_validation=False),
    "state-bundle-100k": lambda: parse_state(json.dumps({**VALID_STATE, "bundle": "/" * 100000}).encode(),
                                             full_validation=True),
}


@pytest.mark.parametrize("call", HUGE_INPUTS.values(), ids=HUGE_INPUTS.keys())
def test_huge_input_gives_a_short_line(call):
    """A megabyte of input must not become a megabyte-long error line (the schema errors are
    cut at 200 characters for that reason)."""
    with pytest.raises(PortfwdError) as e:
        call()
    assert_one_line(e.value, short=True)
