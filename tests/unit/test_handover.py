"""handover.py: what the supervisor hands a core across the exec comes back equal."""

import os

from oci_portfwd import handover
from oci_portfwd.listeners import BindTarget
from oci_portfwd.plan import Plan
from oci_portfwd.ports import PortMapping, parse_port_specs

KINDS = (Plan, PortMapping, BindTarget)


def test_a_plan_and_its_listeners_come_back_equal():
    mappings = parse_port_specs("127.0.0.1:8080:80/tcp,[::1]:5353:53/udp,9000:90/tcp+proxy", 100)
    plan = Plan("abc", 42, "builtin", "preserve", mappings, 30.5, 10.0, source_address="client")
    target = BindTarget(10, "::1", 5353, "udp", mappings[1])
    given = {"plan": plan, "listeners": [(target, 7)], "sandbox": ((65534, 65534), 9), "none": None,
             "log_path": "/x/é.log", "supervisor": 1}
    fd = handover.write(given)
    try:
        got = handover.read(os.dup(fd), KINDS)
    finally:
        os.close(fd)
    assert got["plan"] == plan and isinstance(got["plan"].mappings, tuple)
    assert got["listeners"] == ((target, 7),)
    assert got["sandbox"] == ((65534, 65534), 9) and got["none"] is None
    assert got["log_path"] == "/x/é.log" and got["supervisor"] == 1


def test_the_memfd_is_inherited_by_an_exec():
    fd = handover.write({"a": 1})
    try:
        assert os.get_inheritable(fd)
    finally:
        os.close(fd)
