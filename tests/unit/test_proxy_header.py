"""The PROXY protocol v2 header against the byte layout of haproxy's proxy-protocol.txt (2.2)."""

import socket
import struct

import pytest
from oci_portfwd.proxy_header import header_for, v2_header

SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_ipv4_layout_byte_by_byte():
    header = v2_header(("198.51.100.10", 40000), ("127.0.0.1", 8443))
    assert header == (
        SIGNATURE
        + bytes([0x21, 0x11, 0x00, 0x0C])  # v2 PROXY, TCP over IPv4, 12 address bytes follow
        + bytes([198, 51, 100, 10])
        + bytes([127, 0, 0, 1])
        + bytes([40000 >> 8, 40000 & 0xFF])
        + bytes([8443 >> 8, 8443 & 0xFF])
    )
    assert len(header) == 16 + 12


def test_ipv6_layout():
    header = v2_header(("2001:db8:11b::10", 51234, 0, 0), ("::1", 8443, 0, 0))
    assert header[:12] == SIGNATURE
    assert header[12:16] == bytes([0x21, 0x21, 0x00, 0x24])  # TCP over IPv6, 36 bytes
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8:11b::10")
    assert header[32:48] == socket.inet_pton(socket.AF_INET6, "::1")
    assert struct.unpack("!HH", header[48:]) == (51234, 8443)
    assert len(header) == 16 + 36


def test_length_field_counts_what_follows():
    for src, dst in ((("1.2.3.4", 1), ("5.6.7.8", 2)), (("::2", 1), ("::3", 2))):
        header = v2_header(src, dst)
        assert struct.unpack("!H", header[14:16])[0] == len(header) - 16


def test_ipv4_mapped_pair_is_sent_as_ipv4():
    assert v2_header(("::ffff:198.51.100.10", 1000), ("::ffff:127.0.0.1", 80)) == v2_header(
        ("198.51.100.10", 1000), ("127.0.0.1", 80)
    )


def test_mixed_families_are_sent_as_ipv6_with_the_ipv4_side_mapped():
    header = v2_header(("198.51.100.10", 1000), ("::1", 80))
    assert header[13] == 0x21
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.10")


def test_link_local_scope_is_dropped():
    assert v2_header(("fe80::1%lo", 1, 0, 1), ("fe80::2%lo", 2, 0, 1)) == v2_header(
        ("fe80::1", 1), ("fe80::2", 2)
    )


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_header_for_an_accepted_socket_names_peer_and_dialled_address(family, host):
    # Listener on the wildcard address: the destination is the address the client dialled.
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((host, port)) as client:
            accepted, peer = listener.accept()
            with accepted:
                header = header_for(accepted, peer)
            assert header == v2_header(client.getsockname(), (host, port))
