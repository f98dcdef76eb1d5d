"""source_address: config key, annotation, and which address a container-side socket binds to."""

import json
import socket

import pytest
from oci_portfwd.config import Config, load_config
from oci_portfwd.core import client_udp_ports
from oci_portfwd.errors import ConfigError
from oci_portfwd.listeners import bind_targets
from oci_portfwd.plan import make_plan
from oci_portfwd.ports import parse_port_specs
from oci_portfwd.source_address import source_for
from oci_portfwd.state import parse_state

STATE = {"ociVersion": "1.0", "id": "c1", "status": "created", "pid": 42, "bundle": "/b"}


def plan_for(annotations, config=None):
    state = parse_state(json.dumps({**STATE, "annotations": annotations}).encode(), full_validation=True)
    return make_plan(state, annotations, config or Config())


def test_default_is_client_and_config_and_annotation_override(tmp_path):
    assert plan_for({"io.oci-portfwd.ports": "1:2"}).source_address == "client"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"source_address": "loopback"}))
    config = load_config({"OCI_PORTFWD_CONFIG": str(path)})
    assert config.source_address == "loopback"
    assert plan_for({"io.oci-portfwd.ports": "1:2"}, config).source_address == "loopback"
    annotated = {"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.source-address": "client"}
    assert plan_for(annotated, config).source_address == "client"


def test_bad_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="source-address='peer'"):
        plan_for({"io.oci-portfwd.ports": "1:2", "io.oci-portfwd.source-address": "peer"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"source_address": "peer"}))
    with pytest.raises(ConfigError, match="/source_address"):
        load_config({"OCI_PORTFWD_CONFIG": str(path)})


@pytest.mark.parametrize(
    "client, family, expected",
    [
        (("198.51.100.3", 40000), socket.AF_INET, ("198.51.100.3", 40000)),
        (("127.0.0.5", 40000), socket.AF_INET, ("127.0.0.5", 40000)),
        (("2001:db8:5::3", 40000, 0, 0), socket.AF_INET6, ("2001:db8:5::3", 40000)),
        (("::1", 40000, 0, 0), socket.AF_INET6, ("::1", 40000)),
        # IPv4 client, IPv6-only service: RFC 6052's prefix; a loopback client as ::1.
        (("198.51.100.3", 40000), socket.AF_INET6, ("64:ff9b::c633:6403", 40000)),
        (("127.0.0.5", 40000), socket.AF_INET6, ("::1", 40000)),
        # IPv6 client, IPv4-only service; a link-local client (its scope is a host interface).
        (("2001:db8:5::3", 40000, 0, 0), socket.AF_INET, None),
        (("fe80::1", 40000, 0, 2), socket.AF_INET6, None),
    ],
)
def test_source_for(client, family, expected):
    assert source_for(client, family) == expected


def test_udp_port_ranges_for_the_routing_rules():
    class Listener:
        def __init__(self, target):
            self.target = target

    targets = bind_targets(parse_port_specs("5000:53/udp,5001-5003:54-56/udp,5010:58/udp,80:80"), True, print)
    listeners = [Listener(t) for t in targets]
    assert client_udp_ports(listeners) == [(53, 56), (58, 58)]
