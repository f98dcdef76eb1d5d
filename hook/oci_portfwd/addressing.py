"""Where a connection goes inside the container: the loopback-mapping policy.

For each host listener the core gets an ordered list of container-side targets; the first
is the policy's choice, the second the other family's, tried when the first is refused (a
service that listens only on IPv4 still answers a client on ::1 or `localhost`).
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6  # not socket, ipaddress: memory of every container (issue 12)

from .inet import is_loopback
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

LOOPBACK: dict[int, str] = {AF_INET: "127.0.0.1", AF_INET6: "::1"}


class Target(Value):
    # A Value, not a dataclass: dataclasses brings inspect, ast and dis into the supervisor and
    # the core, ~1 MB of each forwarded container's memory (issue 12).
    __slots__ = ("family", "address", "port")

    def __init__(self, family: int, address: str, port: int) -> None:
        self.family = family
        self.address = address
        self.port = port

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == AF_INET6 else self.address
        return f"{host}:{self.port}"


def other_family(family: int) -> int:
    return AF_INET6 if family == AF_INET else AF_INET


def container_address(
    policy: str, host_family: int, host_address: str, container_addrs: Mapping[int, Sequence[str]]
) -> str:
    """The container-side address for a host binding, by policy (schema: config `loopback`)."""
    if policy == "preserve":
        if is_loopback(host_address):
            return host_address
        return LOOPBACK[host_family]
    if policy == "container-address":
        found = container_addrs.get(host_family) or ()
        return found[0] if found else LOOPBACK[host_family]
    return LOOPBACK[host_family]


def dial_targets(
    policy: str,
    host_family: int,
    host_address: str,
    container_port: int,
    container_addrs: Mapping[int, Sequence[str]],
) -> tuple[Target, ...]:
    first = Target(
        host_family,
        container_address(policy, host_family, host_address, container_addrs),
        container_port,
    )
    fallback_family = other_family(host_family)
    fallback_host = LOOPBACK[fallback_family]
    fallback = Target(
        fallback_family,
        container_address(policy, fallback_family, fallback_host, container_addrs),
        container_port,
    )
    return (first, fallback)
