"""Binding with real sockets on loopback."""

import socket

import pytest
from oci_portfwd.errors import BindError
from oci_portfwd.listeners import bind_all, bind_targets
from oci_portfwd.ports import parse_port_specs


def free_port(proto="tcp"):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port, address="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def test_unspecified_binds_both_families_as_separate_sockets():
    port = free_port()
    listeners = bind_all(bind_targets(parse_port_specs(f"{port}:80"), True, pytest.fail))
    try:
        families = sorted(listener.sock.family for listener in listeners)
        assert families == [socket.AF_INET, socket.AF_INET6]
        v6 = next(listener.sock for listener in listeners if listener.sock.family == socket.AF_INET6)
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for listener in listeners:
            listener.close()


def test_without_ipv6_warns_and_binds_ipv4_only():
    warnings = []
    targets = bind_targets(parse_port_specs("8080:80,[::1]:8081:80"), False, warnings.append)
    assert [t.address for t in targets] == ["0.0.0.0", "::1"]
    assert len(warnings) == 1 and "IPv6 is not available" in warnings[0] and "8080:80/tcp" in warnings[0]


def test_port_in_use_names_address_and_port_and_frees_the_rest():
    first, busy = free_port(), free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", busy))
        blocker.listen()
        specs = parse_port_specs(f"127.0.0.1:{first}:80,127.0.0.1:{busy}:80")
        with pytest.raises(BindError) as e:
            bind_all(bind_targets(specs, True, pytest.fail))
        assert f"127.0.0.1:{busy}/tcp" in str(e.value) and "already in use" in str(e.value)
        assert bindable(first), "the socket bound before the failure was left open"


def test_udp_port_in_use_is_detected():
    busy = free_port("udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind(("127.0.0.1", busy))
        with pytest.raises(BindError, match="already in use"):
            bind_all(bind_targets(parse_port_specs(f"127.0.0.1:{busy}:53/udp"), True, pytest.fail))


def test_prune_logs_keeps_recent_and_live_ones(tmp_path):
    import os

    from oci_portfwd.statefile import prune_logs

    for name in ("old.log", "recent.log", "live.log", "live.json"):
        (tmp_path / name).write_text("x")
    for name in ("old.log", "live.log"):
        os.utime(tmp_path / name, (1000, 1000))
    prune_logs(tmp_path, 3600, 10, now=1000 + 7200)
    assert sorted(os.listdir(tmp_path)) == ["live.json", "live.log", "recent.log"]


def test_prune_logs_keeps_the_newest_when_too_many(tmp_path):
    import os

    from oci_portfwd.statefile import prune_logs

    for i in range(8):
        (tmp_path / f"gone{i}.log").write_text("x")
        os.utime(tmp_path / f"gone{i}.log", (1000 + i, 1000 + i))
    (tmp_path / "live.log").write_text("x")
    os.utime(tmp_path / "live.log", (1, 1))
    (tmp_path / "live.json").write_text("{}")
    prune_logs(tmp_path, 3600, 3, now=1010)
    assert sorted(os.listdir(tmp_path)) == ["gone5.log", "gone6.log", "gone7.log", "live.json", "live.log"]
