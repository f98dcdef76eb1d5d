import pytest
from hypothesis import given
from hypothesis import strategies as st
from oci_portfwd.errors import PortSpecError
from oci_portfwd.ports import PortMapping, parse_port_specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("8080:80", [PortMapping(None, 8080, 80, "tcp")]),
        ("127.0.0.2:8080:80/tcp", [PortMapping("127.0.0.2", 8080, 80, "tcp")]),
        ("[::1]:5353:53/udp", [PortMapping("::1", 5353, 53, "udp")]),
        ("[0:0::1]:5353:53/UDP", [PortMapping("::1", 5353, 53, "udp")]),
        ("0.0.0.0:80:80", [PortMapping("0.0.0.0", 80, 80, "tcp")]),
        ("[::]:80:80", [PortMapping("::", 80, 80, "tcp")]),
        (
            "8000-8002:9000-9002",
            [PortMapping(None, 8000 + i, 9000 + i, "tcp") for i in range(3)],
        ),
        (" 1:2 , 3:4/udp ", [PortMapping(None, 1, 2, "tcp"), PortMapping(None, 3, 4, "udp")]),
        ("8080:80/tcp,8080:80/udp", [PortMapping(None, 8080, 80, "tcp"), PortMapping(None, 8080, 80, "udp")]),
        # Whitespace separates too (podman splits --annotation values at commas), alone or
        # mixed with commas; whitespace next to a comma is part of that one separator.
        ("1:2 3:4/udp", [PortMapping(None, 1, 2, "tcp"), PortMapping(None, 3, 4, "udp")]),
        ("1:2\t3:4\n[::1]:5:6", [PortMapping(None, 1, 2, "tcp"), PortMapping(None, 3, 4, "tcp"),
                               PortMapping("::1", 5, 6, "tcp")]),
        ("1:2, 3:4 5:6 ,7:8", [PortMapping(None, 2 * i + 1, 2 * i + 2, "tcp") for i in range(4)]),
        ("  1-2:3-4  ", [PortMapping(None, 1, 3, "tcp"), PortMapping(None, 2, 4, "tcp")]),
        ("8443:443/tcp+proxy", [PortMapping(None, 8443, 443, "tcp", proxy=True)]),
        ("[::1]:8443:443/TCP+Proxy", [PortMapping("::1", 8443, 443, "tcp", proxy=True)]),
        (
            "8000-8001:9000-9001/tcp+proxy",
            [PortMapping(None, 8000 + i, 9000 + i, "tcp", proxy=True) for i in range(2)],
        ),
        ("8080:80/tcp", [PortMapping(None, 8080, 80, "tcp", proxy=False)]),
    ],
)
def test_valid_specs(spec, expected):
    assert list(parse_port_specs(spec)) == expected


@pytest.mark.parametrize(
    "spec, words",
    [
        ("99999:80", "outside 1-65535"),
        ("0:80", "outside 1-65535"),
        ("abc", "host port is required"),
        ("abc:80", "not a number"),
        ("1-5:1-3", "differ in length"),
        ("8000-8010:80", "differ in length"),
        ("5-1:5-1", "runs backwards"),
        ("80:80/sctp", "unknown protocol"),
        ("::1:80:80", "too many ':'"),
        ("[::1]80:80", "expected [ADDRESS]"),
        ("[::1]:80", "expected [ADDRESS]"),
        ("1.2.3:80:80", "not an IP address"),
        ("8080:80,", "empty port spec"),
        ("8080:80,,8443:443", "empty port spec"),
        ("8080:80 , ,8443:443", "empty port spec"),
        (", 8080:80", "empty port spec"),
        ("", "no port spec"),
        (" \t\n", "no port spec"),
        ("8080:80;8443:443", "use commas or spaces"),
        ("8080:80 8080:80", "requested twice"),
        ("8080:80 8080 81", "host port is required"),
        ("8080:80,8080:81", "requested twice"),
        ("８０:80", "not a number"),
        ("²:80", "not a number"),
        ("5353:53/udp+proxy", "for TCP only"),
        ("8443:443/+proxy", "name the protocol before +proxy (e.g. /tcp+proxy)"),
        ("8443:443/tcp+pp2", "unknown option 'pp2'"),
        ("8443:443/tcp+", "unknown option ''"),
        ("8443:443/tcp+proxy+proxy", "unknown option"),
        ("8443:443/sctp+proxy", "unknown protocol 'sctp'"),
        ("8443:443/tcp,8443:443/tcp+proxy", "requested twice"),
    ],
)
def test_invalid_specs_name_the_spec(spec, words):
    with pytest.raises(PortSpecError) as e:
        parse_port_specs(spec)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_max_ports_counts_range_members():
    assert len(parse_port_specs("1000-1009:1000-1009", max_ports=10)) == 10
    with pytest.raises(PortSpecError, match="max_ports"):
        parse_port_specs("1000-1010:1000-1010", max_ports=10)


def test_str_round_trips():
    for spec in ["8080:80/tcp", "127.0.0.2:8080:80/tcp", "[::1]:5353:53/udp", "[::1]:8443:443/tcp+proxy"]:
        (m,) = parse_port_specs(spec)
        assert str(m) == spec
        assert parse_port_specs(str(m)) == (m,)


ports = st.integers(1, 65535)


@given(host=ports, container=ports, proto=st.sampled_from(["tcp", "udp"]))
def test_any_valid_pair_parses(host, container, proto):
    assert parse_port_specs(f"{host}:{container}/{proto}") == (PortMapping(None, host, container, proto),)


SEPARATORS = st.sampled_from([",", " ", ", ", " ,", "\t", "\n", " , ", "  "])


@given(pairs=st.lists(st.tuples(ports, ports, st.sampled_from(["tcp", "udp"])), min_size=1, max_size=6,
                      unique_by=lambda p: (p[0], p[2])),
       seps=st.lists(SEPARATORS, min_size=6, max_size=6))
def test_any_separator_mix_gives_the_same_mappings_as_commas(pairs, seps):
    specs = [f"{h}:{c}/{p}" for h, c, p in pairs]
    mixed = specs[0] + "".join(sep + spec for sep, spec in zip(seps, specs[1:], strict=False))
    assert parse_port_specs(mixed) == parse_port_specs(",".join(specs))


def test_an_error_in_a_whitespace_list_names_that_spec_alone():
    with pytest.raises(PortSpecError) as e:
        parse_port_specs("8080:80 99999:443 53:53/udp")
    assert str(e.value) == "port spec '99999:443': host port 99999 is outside 1-65535"


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_a_port_spec_error(text):
    try:
        result = parse_port_specs(text)
    except PortSpecError as e:
        assert str(e)
    else:
        assert all(1 <= m.host_port <= 65535 and 1 <= m.container_port <= 65535 for m in result)


def test_link_local_keeps_its_scope():
    (m,) = parse_port_specs("[fe80::a:10%eth0]:8081:80")
    assert m.host_ip == "fe80::a:10%eth0"
    assert str(m) == "[fe80::a:10%eth0]:8081:80/tcp"


@pytest.mark.parametrize("spec, words", [
    ("[fe80::1]:8081:80", "name its interface"),
    ("[fe80::1%a$b]:8081:80", "not an interface name"),
    ("[fe80::1%" + "x" * 16 + "]:8081:80", "not an interface name"),
])
def test_link_local_needs_a_plain_interface(spec, words):
    with pytest.raises(PortSpecError, match=words):
        parse_port_specs(spec)


def test_socket_address_of_a_scoped_address():
    import socket

    from oci_portfwd.listeners import NoSuchInterface, socket_address

    assert socket_address("127.0.0.1", 80) == ("127.0.0.1", 80)
    assert socket_address("fe80::1%lo", 80) == ("fe80::1", 80, 0, socket.if_nametoindex("lo"))
    assert socket_address("fe80::1%7", 80) == ("fe80::1", 80, 0, 7)
    with pytest.raises(NoSuchInterface, match="pfa-none"):
        socket_address("fe80::1%pfa-none", 80)
