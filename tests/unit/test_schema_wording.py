"""The hook (compiled validators) and check-config (jsonschema) word a schema error the same
way, and say what would be accepted (the range, the choices, the known keys)."""

import json

import pytest
from oci_portfwd.config import load_config
from oci_portfwd.errors import ConfigError, StateError
from oci_portfwd.state import parse_state

CONFIGS = {
    "unknown-key": ({"bogus": 1}, "unknown key 'bogus' (known keys: $schema, allow_host_loopback"),
    "ready-timeout-too-small": ({"ready_timeout": 0.001}, "/ready_timeout: must be between 1 and 300 (got 0.001)"),
    "ready-timeout-zero": ({"ready_timeout": 0}, "/ready_timeout: must be between 1 and 300 (got 0)"),
    "ready-timeout-too-large": ({"ready_timeout": 301}, "/ready_timeout: must be between 1 and 300"),
    "udp-timeout-zero": ({"udp_idle_timeout": 0}, "/udp_idle_timeout: must be more than 0 and at most 86400"),
    "max-ports-string": ({"max_ports": "x"}, "/max_ports: must be an integer (got 'x')"),
    "driver": ({"driver": "nope"}, "/driver: must be one of builtin, slirp4netns, pasta (got 'nope')"),
    "state-dir-relative": ({"state_dir": "run/x"}, "/state_dir: must be an absolute path (got 'run/x')"),
    "not-an-object": ([], ": must be a JSON object (got [])"),
    "allow-host-loopback": ({"allow_host_loopback": "yes"}, "/allow_host_loopback: must be true or false"),
}


@pytest.mark.parametrize("doc, expected", CONFIGS.values(), ids=CONFIGS.keys())
def test_hook_and_check_config_say_the_same(tmp_path, doc, expected):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    said = []
    for thorough in (False, True):
        with pytest.raises(ConfigError) as e:
            load_config({"OCI_PORTFWD_CONFIG": str(path)}, thorough=thorough)
        said.append(str(e.value))
    hook, check_config = said
    assert hook == check_config
    assert expected in hook, hook


def test_ready_timeout_range_boundaries_accepted(tmp_path):
    path = tmp_path / "c.json"
    for value in (1, 300, 2.5):
        path.write_text(json.dumps({"ready_timeout": value}))
        for thorough in (False, True):
            assert load_config({"OCI_PORTFWD_CONFIG": str(path)}, thorough=thorough).ready_timeout == value


STATES = {
    "missing-id": ({"ociVersion": "1.0", "status": "creating"}, "the required key 'id' is missing"),
    "annotation-not-string": ({"ociVersion": "1.0", "id": "web", "status": "created",
                               "annotations": {"io.oci-portfwd.ports": 80}},
                              "/annotations/io.oci-portfwd.ports: must be a string (got 80)"),
    "bad-status": ({"ociVersion": "1.0", "id": "web", "status": "exploded"}, "/status: must be one of creating"),
}


@pytest.mark.parametrize("doc, expected", STATES.values(), ids=STATES.keys())
def test_state_errors_worded_alike(doc, expected):
    from oci_portfwd.schema import validate

    said = []
    for thorough in (False, True):
        with pytest.raises(StateError) as e:
            validate(doc, "oci-state.schema.json", "OCI state", StateError, thorough=thorough)
        said.append(str(e.value))
    assert said[0] == said[1]
    assert expected in said[0], said[0]
    with pytest.raises(StateError):
        parse_state(json.dumps(doc).encode(), full_validation=True)
