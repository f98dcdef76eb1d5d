import json
import socket

import pytest
from oci_portfwd.addressing import dial_targets
from oci_portfwd.config import Config, load_config
from oci_portfwd.errors import ConfigError, PortSpecError, StateError
from oci_portfwd.plan import make_plan
from oci_portfwd.state import bundle_annotations, parse_state

CRUN = {"ociVersion": "1.0", "id": "web", "pid": 42, "root": "rootfs", "bundle": "/b",
        "status": "created", "annotations": {"io.oci-portfwd.ports": "8080:80"}}
RUNC_POSTSTOP = {"ociVersion": "1.0.2-dev", "id": "web", "status": "stopped", "bundle": "/b"}


def raw(doc):
    return json.dumps(doc).encode()


def test_crun_prestart_state():
    state = parse_state(raw(CRUN), full_validation=True)
    assert (state.id, state.pid, state.annotations["io.oci-portfwd.ports"]) == ("web", 42, "8080:80")


def test_runc_poststop_state_without_pid_or_annotations():
    state = parse_state(raw(RUNC_POSTSTOP), full_validation=False)
    assert state.pid is None and state.annotations == {}


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{bad", "not valid JSON"),
        (b"", "no OCI state"),
        (b"[1]", "must be a JSON object"),
        (b"[" * 100000, "nested too deeply"),
        (raw({**CRUN, "pid": "42"}), "/pid"),
        (raw({**CRUN, "id": "../etc"}), "/id"),
        (raw({**CRUN, "status": "exploded"}), "/status"),
        (raw({"id": "x"}), "ociVersion"),
        (b" " * ((1 << 20) + 1), "larger than"),
    ],
)
def test_bad_state(data, words):
    with pytest.raises(StateError) as e:
        parse_state(data, full_validation=True)
    assert words in str(e.value)


def test_poststop_still_rejects_a_path_as_id():
    with pytest.raises(StateError):
        parse_state(raw({**RUNC_POSTSTOP, "id": "../../x"}), full_validation=False)


def test_annotations_from_the_bundle(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"io.oci-portfwd.ports": "1:2"}}))
    assert bundle_annotations(str(tmp_path)) == {"io.oci-portfwd.ports": "1:2"}
    assert bundle_annotations(str(tmp_path / "missing")) == {}


def write_config(tmp_path, doc):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return {"OCI_PORTFWD_CONFIG": str(path)}


def test_config_defaults_and_values(tmp_path):
    assert load_config({"OCI_PORTFWD_CONFIG": ""}, None).driver == "builtin"
    config = load_config(write_config(tmp_path, {"loopback": "loopback", "max_ports": 7}))
    assert (config.loopback, config.max_ports) == ("loopback", 7)


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"driver": "nope"}, "/driver"),
        ({"colour": "blue"}, "colour"),
        ({"max_ports": "many"}, "/max_ports"),
        ({"state_dir": "relative"}, "/state_dir"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_config(tmp_path, doc, words):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, doc))
    assert words in str(e.value)


def test_named_config_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"OCI_PORTFWD_CONFIG": str(tmp_path / "nope.json")})


def plan_for(annotations):
    state = parse_state(raw({**CRUN, "annotations": annotations}), full_validation=True)
    return make_plan(state, annotations, Config())


def test_plan_overrides_by_annotation():
    plan = plan_for({"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.loopback": "loopback"})
    assert plan.loopback == "loopback" and plan.driver == "builtin" and len(plan.mappings) == 1


@pytest.mark.parametrize(
    "annotations, error",
    [
        ({"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.loopback": "sideways"}, ConfigError),
        ({"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.prots": "x"}, ConfigError),
        ({"io.oci-portfwd.ports": "1-2000:1-2000"}, PortSpecError),
    ],
)
def test_plan_rejects(annotations, error):
    with pytest.raises(error):
        plan_for(annotations)


def test_plan_needs_a_pid():
    state = parse_state(raw({**CRUN, "pid": 0}), full_validation=True)
    with pytest.raises(StateError, match="no pid"):
        make_plan(state, {"io.oci-portfwd.ports": "1:2"}, Config())


V4, V6 = socket.AF_INET, socket.AF_INET6


@pytest.mark.parametrize(
    "policy, family, host, first, fallback",
    [
        ("preserve", V4, "127.0.0.2", "127.0.0.2", "::1"),
        ("preserve", V6, "::1", "::1", "127.0.0.1"),
        ("preserve", V4, "0.0.0.0", "127.0.0.1", "::1"),
        ("preserve", V6, "::", "::1", "127.0.0.1"),
        ("loopback", V4, "127.0.0.2", "127.0.0.1", "::1"),
        ("container-address", V4, "0.0.0.0", "10.0.2.100", "fd00::100"),
        ("container-address", V6, "::", "fd00::100", "10.0.2.100"),
    ],
)
def test_dial_targets(policy, family, host, first, fallback):
    addrs = {V4: ["10.0.2.100"], V6: ["fd00::100"]}
    targets = dial_targets(policy, family, host, 80, addrs)
    assert [t.address for t in targets] == [first, fallback]
    assert targets[0].family == family and targets[1].family != family


def test_container_address_without_addresses_uses_loopback():
    assert dial_targets("container-address", V4, "0.0.0.0", 80, {})[0].address == "127.0.0.1"


@pytest.mark.parametrize(
    "uid_map, euid, expected",
    [
        ("         0          0 4294967295\n", 0, 0),
        ("         0       1001          1\n         1     100000      65536\n", 0, 1001),
        ("         0       1001          1\n         1     100000      65536\n", 5, 100004),
    ],
)
def test_host_uid_from_uid_map(tmp_path, uid_map, euid, expected):
    from oci_portfwd.config import host_uid

    (tmp_path / "uid_map").write_text(uid_map)
    assert host_uid(euid, str(tmp_path / "uid_map")) == expected
