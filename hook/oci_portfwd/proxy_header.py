"""The PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2), binary format.

A mapping written `/tcp+proxy` sends it on the container-side socket before the client's first
byte, so that the service learns who connected and to which host address and port, whatever
the dial inside the container looked like (loopback, the other family after a fallback):

    12 bytes  signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   0x21: version 2, command PROXY
     1 byte   0x11: TCP over IPv4 | 0x21: TCP over IPv6
     2 bytes  length of what follows, big endian: 12 (IPv4) or 36 (IPv6); no TLVs
              source address, destination address, source port, destination port

Source: the client (the accepted socket's peer). Destination: the host address and port the
client connected to (the accepted socket's own name: the real address even when the listener
is bound to 0.0.0.0 or ::).

Families: both ends of one TCP connection have the same family. An IPv4 client that reached an
IPv6 socket (IPV6_V6ONLY off; the hook's own listeners always set it) shows as ::ffff:a.b.c.d on
both ends and is sent as TCP over IPv4 with the plain IPv4 addresses, which is what it is. A pair
that still mixes families (only if a caller passes one) is sent as IPv6, the IPv4 side mapped.
"""

from __future__ import annotations

import struct

from .inet import ipv4_unmapped, ipv6_mapped, packed

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2_PROXY = 0x21
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21

Address = tuple[str, int] | tuple[str, int, int, int]


def header_for(client: _socket.socket, peer: Address) -> bytes:
    """The header for an accepted client socket and the peer address accept() returned."""
    return v2_header(peer, client.getsockname()[:2])


def v2_header(source: Address, destination: Address) -> bytes:
    """The header for a TCP connection from `source` to `destination` (socket addresses:
    (host, port), or IPv6's (host, port, flowinfo, scope_id))."""
    # A link-local peer comes as fe80::1%eth0: the header has no room for the scope (packed
    # drops it).
    src = ipv4_unmapped(packed(source[0]))
    dst = ipv4_unmapped(packed(destination[0]))
    if len(src) != len(dst):
        src, dst = ipv6_mapped(src), ipv6_mapped(dst)
    if len(src) == 4:
        family, size = TCP_OVER_IPV4, 12
    else:
        family, size = TCP_OVER_IPV6, 36
    return (
        SIGNATURE
        + struct.pack("!BBH", VERSION_2_PROXY, family, size)
        + src
        + dst
        + struct.pack("!HH", source[1], destination[1])
    )
