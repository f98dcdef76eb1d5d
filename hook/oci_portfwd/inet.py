"""IP addresses as text and as packed bytes, with the C library's inet_pton and inet_ntop
(`_socket`'s), where ipaddress's classes were used. ipaddress brings re, enum and functools
with it: ~1 MB of the memory of every forwarded container (the hook's modules stay in its
supervisor and core, issue 12); what is asked of an address (loopback? its bytes? mapped
into IPv6? its usual spelling?) is a few bytes' comparison.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

IPV6_LOOPBACK = bytes(15) + b"\x01"
IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d (RFC 4291 2.5.5.2)


def packed(text: str) -> bytes:
    """The address's 4 or 16 bytes; an IPv6 scope (fe80::1%eth0) is dropped. ValueError for
    what is no address, as ipaddress.ip_address raises."""
    host = text.partition("%")[0]
    try:
        return inet_pton(AF_INET6 if ":" in host else AF_INET, host)
    except OSError:
        raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address") from None


def is_loopback(text: str) -> bool:
    """127.0.0.0/8 or ::1, as ipaddress's is_loopback (which does not look into ::ffff:127.x)."""
    address = packed(text)
    return address[0] == 127 if len(address) == 4 else address == IPV6_LOOPBACK


def ipv4_unmapped(address: bytes) -> bytes:
    """An IPv4-mapped IPv6 address's IPv4 bytes (ipaddress's ipv4_mapped); others unchanged."""
    return address[12:] if len(address) == 16 and address[:12] == IPV4_MAPPED_PREFIX else address


def ipv6_mapped(address: bytes) -> bytes:
    """IPv4 bytes as the IPv4-mapped IPv6 address; IPv6 bytes unchanged."""
    return IPV4_MAPPED_PREFIX + address if len(address) == 4 else address



def ipv6_text(address: bytes) -> str:
    """str(ipaddress.IPv6Address(address)) (Python 3.11's): RFC 5952's compressed form, in
    hextets throughout, also where the C library writes ::a.b.c.d or ::ffff:a.b.c.d."""
    text = inet_ntop(AF_INET6, address)
    if "." in text:
        high, low = int.from_bytes(address[12:14], "big"), int.from_bytes(address[14:], "big")
        text = f"{text.rpartition(':')[0]}:{high:x}:{low:x}"
    return text
