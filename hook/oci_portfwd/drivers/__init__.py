"""Drivers: who does the forwarding. Each declares what it can do, so that a plan is
checked against it before anything is bound or started: one warning per mapping it
serves differently from what was asked, an error where it cannot serve at all."""

from __future__ import annotations

from ..errors import DriverError, quoted
from ..values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..listeners import Listener
    from ..logs import HookLog
    from ..plan import Plan
    from ..ports import PortMapping
    from ..seccomp_filter import CoreSandbox
    from ..status import StatusWriter

    Warn = Callable[[str], None]
else:
    Warn = object  # for the drivers' annotations only


class Capabilities(Value):
    __slots__ = (
        "tcp", "udp", "ipv4", "ipv6", "family_fallback", "preserves_loopback_address", "outbound",
        "holds_listeners", "link_local",
    )

    def __init__(
        self,
        *,
        tcp: bool,
        udp: bool,
        ipv4: bool,
        ipv6: bool,  # can publish on IPv6 host addresses
        family_fallback: bool,  # a refused dial of one family is retried in the other
        preserves_loopback_address: bool,  # 127.0.0.2 on the host is dialled as 127.0.0.2
        outbound: bool,  # gives the container network access of its own
        # Protocols served on the sockets the hook bound; the driver's program binds the rest.
        holds_listeners: frozenset[str],
        link_local: bool = False,  # can publish on a scoped link-local address (fe80::1%eth0)
    ) -> None:
        self.tcp = tcp
        self.udp = udp
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.family_fallback = family_fallback
        self.preserves_loopback_address = preserves_loopback_address
        self.outbound = outbound
        self.holds_listeners = holds_listeners
        self.link_local = link_local


class Driver:
    """What every driver provides (a plain base class: typing.Protocol would cost the start
    path the typing import)."""

    name: str
    capabilities: Capabilities

    def check(self, plan: Plan, warn: Warn) -> Plan:
        """The plan this driver will serve (raises DriverError when it cannot)."""
        raise NotImplementedError

    def run(
        self,
        plan: Plan,
        listeners: Sequence[Listener],
        status: StatusWriter,
        log: HookLog,
        sandbox: CoreSandbox | None = None,
    ) -> int:
        """Serve the plan in this (forked) process until signalled; returns an exit code.
        `sandbox`: the process drops its privileges through it once it serves (builtin)."""
        raise NotImplementedError


DRIVER_NAMES = ("builtin", "slirp4netns", "pasta")


def get_driver(name: str) -> Driver:
    if name == "builtin":
        from .builtin import BuiltinDriver  # noqa: PLC0415

        return BuiltinDriver()
    if name == "slirp4netns":
        from .slirp4netns import Slirp4netnsDriver  # noqa: PLC0415

        return Slirp4netnsDriver()
    if name == "pasta":
        from .pasta import PastaDriver  # noqa: PLC0415

        return PastaDriver()
    raise DriverError(f"unknown driver {quoted(name)}; known drivers: {', '.join(DRIVER_NAMES)}")


def check_capabilities(plan: Plan, driver: str, caps: Capabilities, warn: Warn) -> Plan:
    """Degrade what the driver cannot do as asked, with one warning per mapping."""
    kept: list[PortMapping] = []
    for m in plan.mappings:
        if m.proto == "udp" and not caps.udp or m.proto == "tcp" and not caps.tcp:
            raise DriverError(f"driver {driver} cannot forward {m.proto.upper()} ({m})")
        if m.proxy and m.proto not in caps.holds_listeners:
            # The header is written by our relay; the driver's own program relays this port.
            raise DriverError(
                f"driver {driver} cannot send a PROXY protocol header ({m}); "
                "use the builtin driver or drop +proxy"
            )
        if not caps.link_local and m.host_ip is not None and "%" in m.host_ip:
            # pasta 2023-03-09 binds such an address but never delivers a connection.
            warn(f"driver {driver} cannot forward from a link-local address: {m} is not forwarded")
            continue
        mapped = _ipv4_for(m, driver, caps, warn)
        if mapped is None:
            continue
        if mapped is not m and _already_covered(mapped, kept):
            warn(f"driver {driver}: {m} is already covered by another mapping on IPv4; not forwarded twice")
            continue
        if not caps.preserves_loopback_address and _is_other_loopback(mapped.host_ip):
            warn(
                f"driver {driver}: {m} is published on {mapped.host_ip} but reaches the container's "
                "127.0.0.1 (a service bound only to that address in the container is not reached)"
            )
        kept.append(mapped)
    return plan.replace(mappings=tuple(kept))


def _ipv4_for(m: PortMapping, driver: str, caps: Capabilities, warn: Warn) -> PortMapping | None:
    if m.host_ip is None:
        if not caps.ipv6:
            warn(f"driver {driver} cannot forward IPv6: {m} is published on 0.0.0.0 (IPv4) only")
            return m.replace(host_ip="0.0.0.0")
        if not caps.family_fallback:
            warn(
                f"driver {driver} cannot fall back between families (an IPv6 client of an IPv4-only "
                f"service would be reset): {m} is published on 0.0.0.0 (IPv4) only; "
                f"ask for [::]:{m.host_port}:{m.container_port}/{m.proto} to publish IPv6 too"
            )
            return m.replace(host_ip="0.0.0.0")
        return m
    if caps.ipv6:
        return m
    import ipaddress  # noqa: PLC0415 - only for a driver without IPv6 (re and enum with it)

    address = ipaddress.ip_address(m.host_ip)
    if address.version == 4:
        return m
    if address.is_loopback or address.is_unspecified:
        ipv4 = "127.0.0.1" if address.is_loopback else "0.0.0.0"
        warn(f"driver {driver} cannot forward IPv6: {m} is published on {ipv4}:{m.host_port} (IPv4) instead")
        return m.replace(host_ip=ipv4)
    warn(f"driver {driver} cannot forward IPv6 and {m.host_ip} has no IPv4 twin: {m} is not forwarded")
    return None


def _already_covered(m: PortMapping, kept: list[PortMapping]) -> bool:
    return any(
        k.host_port == m.host_port and k.proto == m.proto and (k.host_ip == m.host_ip or "0.0.0.0" in (k.host_ip, m.host_ip))
        for k in kept
    )


def _is_other_loopback(host_ip: str | None) -> bool:
    if host_ip is None:
        return False
    import ipaddress  # noqa: PLC0415

    address = ipaddress.ip_address(host_ip)
    return address.is_loopback and host_ip not in ("127.0.0.1", "::1")
