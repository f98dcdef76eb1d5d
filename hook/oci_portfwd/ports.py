"""The port-request parser: docker's `-p` syntax, specs separated by commas, whitespace or both.

    8080:80   127.0.0.2:8080:80/tcp   [::1]:5353:53/udp   8000-8002:8000-8002

Whitespace as a separator is for podman: it splits `--annotation` values at commas, so
`--annotation 'io.oci-portfwd.ports=8080:80 8443:443'` is the one way to write several ports
there without CSV quoting. An omitted host address means every address of both families;
`0.0.0.0` means IPv4 only and `::` IPv6 only, as written.

Our one addition: `/tcp+proxy` (8443:443/tcp+proxy) sends the service a PROXY protocol
v2 header ahead of each connection's bytes (proxy_header.py). The protocol is spelled
out with it: a bare `/+proxy` is refused rather than guessed, and so is `udp+proxy`.
"""

from __future__ import annotations

from _socket import AF_INET6, inet_pton

from .errors import PortSpecError, quoted
from .inet import ipv6_text
from .values import Value

PROTOCOLS = ("tcp", "udp")
PROXY_OPTION = "proxy"
# A Linux interface name (IFNAMSIZ: 15 characters) or index, as the scope of fe80::1%eth0:
# [A-Za-z0-9_.:@-]{1,15}, without re (enum and functools with it: ~2 ms of every start).
INTERFACE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-")


def is_interface_name(text: str) -> bool:
    return 0 < len(text) <= 15 and all(c in INTERFACE_CHARS for c in text)


class PortMapping(Value):
    """One host port forwarded to one container port."""

    __slots__ = ("host_ip", "host_port", "container_port", "proto", "proxy")

    def __init__(
        self,
        host_ip: str | None,  # None: 0.0.0.0 and ::
        host_port: int,
        container_port: int,
        proto: str,  # "tcp" | "udp"
        proxy: bool = False,  # send a PROXY protocol v2 header first (TCP only)
    ) -> None:
        self.host_ip = host_ip
        self.host_port = host_port
        self.container_port = container_port
        self.proto = proto
        self.proxy = proxy

    def __str__(self) -> str:
        if self.host_ip is None:
            host = ""
        elif ":" in self.host_ip:
            host = f"[{self.host_ip}]:"
        else:
            host = f"{self.host_ip}:"
        option = f"+{PROXY_OPTION}" if self.proxy else ""
        return f"{host}{self.host_port}:{self.container_port}/{self.proto}{option}"


def parse_port_specs(text: str, max_ports: int | None = None) -> tuple[PortMapping, ...]:
    """Parse specs separated by commas and/or whitespace (`8080:80, 8443:443 53:53/udp`);
    every error names the spec at fault. Whitespace around a comma is part of the comma:
    only an empty place between two commas (or before or after one) is an error."""
    if not text.strip():
        raise PortSpecError(f"no port spec in {quoted(text)}")
    mappings: list[PortMapping] = []
    for between_commas in text.split(","):
        specs = between_commas.split()
        if not specs:
            raise PortSpecError(f"empty port spec in {quoted(text)} (a stray comma?)")
        for spec in specs:
            mappings.extend(parse_port_spec(spec))
            if max_ports is not None and len(mappings) > max_ports:
                raise PortSpecError(
                    f"more than {max_ports} ports requested (the config's max_ports); "
                    "raise max_ports or request fewer ports"
                )
    _reject_duplicates(mappings)
    return tuple(mappings)


def parse_port_spec(spec: str) -> list[PortMapping]:
    if ";" in spec:
        raise PortSpecError(
            f"port spec {quoted(spec)}: ';' does not separate port specs; use commas or spaces"
        )
    body, slash, suffix = spec.partition("/")
    proto, proxy = _parse_protocol(spec, suffix.lower()) if slash else ("tcp", False)
    host_ip, host_part, container_part = _split_fields(spec, body)
    host_first, host_last = _parse_range(spec, host_part, "host")
    cont_first, cont_last = _parse_range(spec, container_part, "container")
    count = host_last - host_first + 1
    if cont_last - cont_first + 1 != count:
        raise PortSpecError(
            f"port spec {quoted(spec)}: host range {quoted(host_part)} and container range {quoted(container_part)} "
            "differ in length; give ranges of the same length"
        )
    return [
        PortMapping(host_ip, host_first + i, cont_first + i, proto, proxy) for i in range(count)
    ]


def _parse_protocol(spec: str, suffix: str) -> tuple[str, bool]:
    """`tcp`, `udp` or `tcp+proxy`; returns (protocol, proxy)."""
    proto, plus, option = suffix.partition("+")
    if proto not in PROTOCOLS:
        if not proto and plus:
            raise PortSpecError(
                f"port spec {quoted(spec)}: name the protocol before +{option} (e.g. /tcp+{PROXY_OPTION})"
            )
        raise PortSpecError(f"port spec {quoted(spec)}: unknown protocol {quoted(proto)} (use tcp or udp)")
    if not plus:
        return proto, False
    if option != PROXY_OPTION:
        raise PortSpecError(
            f"port spec {quoted(spec)}: unknown option {quoted(option)} after {proto}+ (the one option is +{PROXY_OPTION})"
        )
    if proto != "tcp":
        raise PortSpecError(
            f"port spec {quoted(spec)}: +{PROXY_OPTION} (a PROXY protocol header) is for TCP only; drop it from this UDP mapping"
        )
    return proto, True


def _split_fields(spec: str, body: str) -> tuple[str | None, str, str]:
    if body.startswith("["):
        address, bracket, rest = body[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise PortSpecError(f"port spec {quoted(spec)}: expected [ADDRESS]:HOST_PORT:CONTAINER_PORT")
        fields = rest[1:].split(":")
        if len(fields) != 2:
            raise PortSpecError(f"port spec {quoted(spec)}: expected [ADDRESS]:HOST_PORT:CONTAINER_PORT")
        return _parse_address(spec, address), fields[0], fields[1]
    fields = body.split(":")
    if len(fields) == 2:
        return None, fields[0], fields[1]
    if len(fields) == 3:
        return _parse_address(spec, fields[0]), fields[1], fields[2]
    if len(fields) == 1:
        raise PortSpecError(
            f"port spec {quoted(spec)}: a host port is required (HOST_PORT:CONTAINER_PORT)"
        )
    raise PortSpecError(
        f"port spec {quoted(spec)}: too many ':' (an IPv6 address goes in brackets: [::1]:8080:80)"
    )


def _parse_address(spec: str, text: str) -> str:
    if _is_plain_ipv4(text):
        return text  # what ipaddress would return: the same text
    # ipaddress takes IPv4 only as plain dotted quads: anything else is IPv6 or no address.
    # Read as ipaddress.ip_address reads it, with inet_pton: ipaddress brings re, enum and
    # functools into the hook and, with it, into each forwarded container's supervisor and
    # core (issue 12).
    host, percent, scope = text.partition("%")
    try:
        if percent and (not scope or "%" in scope):
            raise ValueError(scope)
        address = inet_pton(AF_INET6, host)
    except (OSError, ValueError):
        raise PortSpecError(f"port spec {quoted(spec)}: {quoted(text)} is not an IP address") from None
    if not percent and address[0] == 0xFE and address[1] & 0xC0 == 0x80:
        # fe80::/10. Every interface has fe80::/64: the kernel cannot tell which one is meant.
        raise PortSpecError(
            f"port spec {quoted(spec)}: {text} is a link-local address; name its interface: "
            f"[{text}%IFACE]"
        )
    if percent and not is_interface_name(scope):
        raise PortSpecError(f"port spec {quoted(spec)}: {quoted(scope)} is not an interface name")
    # The scope is kept (fe80::1%eth0): logs, `ps` and the bind need it.
    return ipv6_text(address) + percent + scope


def _is_plain_ipv4(text: str) -> bool:
    """Four decimal octets 0-255 without leading zeros: the text is the address as
    ipaddress writes it (and accepts it), so the common 127.0.0.1:8080:80 needs no ipaddress."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p == "0" or p[0] != "0") and int(p) <= 255 for p in parts
    )


def _parse_range(spec: str, text: str, side: str) -> tuple[int, int]:
    first, dash, last = text.partition("-")
    low = _parse_port(spec, first, side)
    high = _parse_port(spec, last, side) if dash else low
    if high < low:
        raise PortSpecError(f"port spec {quoted(spec)}: {side} range {quoted(text)} runs backwards")
    return low, high


def _parse_port(spec: str, text: str, side: str) -> int:
    # isdigit() alone would accept "²" and other Unicode digits that int() rejects.
    # Five digits at most before int(): Python refuses to convert very long digit strings.
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        if text.isascii() and text.isdigit():
            raise PortSpecError(f"port spec {quoted(spec)}: {side} port {quoted(text)} is outside 1-65535")
        raise PortSpecError(f"port spec {quoted(spec)}: {side} port {quoted(text)} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise PortSpecError(f"port spec {quoted(spec)}: {side} port {port} is outside 1-65535")
    return port


def _reject_duplicates(mappings: list[PortMapping]) -> None:
    seen: dict[tuple[str | None, int, str], PortMapping] = {}
    for m in mappings:
        key = (m.host_ip, m.host_port, m.proto)
        if key in seen:
            raise PortSpecError(f"host port {m} is requested twice (also as {seen[key]})")
        seen[key] = m
