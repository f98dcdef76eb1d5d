"""Config + a container's annotations → the Plan of what to forward."""

from __future__ import annotations

from .errors import ConfigError, StateError, quoted
from .ports import PortMapping, parse_port_specs
from .values import Value

TYPE_CHECKING = False
if TYPE_CHECKING:  # the core unpickles a Plan: not its parsers' modules (issue 12)
    from collections.abc import Mapping

    from .config import Config
    from .state import ContainerState

ANNOTATION_PREFIX = "io.oci-portfwd."
PORTS_ANNOTATION = ANNOTATION_PREFIX + "ports"
DRIVER_ANNOTATION = ANNOTATION_PREFIX + "driver"
LOOPBACK_ANNOTATION = ANNOTATION_PREFIX + "loopback"
SOURCE_ADDRESS_ANNOTATION = ANNOTATION_PREFIX + "source-address"
KNOWN_ANNOTATIONS = {PORTS_ANNOTATION, DRIVER_ANNOTATION, LOOPBACK_ANNOTATION, SOURCE_ADDRESS_ANNOTATION}
LOOPBACK_POLICIES = ("preserve", "loopback", "container-address")
SOURCE_ADDRESSES = ("client", "loopback")


class Plan(Value):
    __slots__ = (
        "container_id", "container_pid", "driver", "loopback", "mappings", "udp_idle_timeout",
        "ready_timeout", "allow_host_loopback", "source_address", "core_user",
    )

    def __init__(
        self,
        container_id: str,
        container_pid: int,
        driver: str,
        loopback: str,
        mappings: tuple[PortMapping, ...],
        udp_idle_timeout: float,
        ready_timeout: float,
        allow_host_loopback: bool = False,
        source_address: str = "client",
        core_user: str = "nobody",  # rootful: who the core runs as (privileges.py)
    ) -> None:
        self.container_id = container_id
        self.container_pid = container_pid
        self.driver = driver
        self.loopback = loopback
        self.mappings = mappings
        self.udp_idle_timeout = udp_idle_timeout
        self.ready_timeout = ready_timeout
        self.allow_host_loopback = allow_host_loopback
        self.source_address = source_address
        self.core_user = core_user


def make_plan(state: ContainerState, annotations: Mapping[str, str], config: Config) -> Plan:
    if state.pid is None:
        raise StateError(
            f"OCI state of container {state.id} has no pid; prestart needs the container's pid"
        )
    for key in annotations:
        if key.startswith(ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS:
            raise ConfigError(
                f"unknown annotation {quoted(key)}; known: {', '.join(sorted(KNOWN_ANNOTATIONS))}"
            )
    loopback = annotations.get(LOOPBACK_ANNOTATION, config.loopback)
    if loopback not in LOOPBACK_POLICIES:
        raise ConfigError(
            f"annotation {LOOPBACK_ANNOTATION}={quoted(loopback)}: use one of {', '.join(LOOPBACK_POLICIES)}"
        )
    source_address = annotations.get(SOURCE_ADDRESS_ANNOTATION, config.source_address)
    if source_address not in SOURCE_ADDRESSES:
        raise ConfigError(
            f"annotation {SOURCE_ADDRESS_ANNOTATION}={quoted(source_address)}: use one of {', '.join(SOURCE_ADDRESSES)}"
        )
    return Plan(
        container_id=state.id,
        container_pid=state.pid,
        driver=annotations.get(DRIVER_ANNOTATION, config.driver),
        loopback=loopback,
        mappings=parse_port_specs(annotations.get(PORTS_ANNOTATION, ""), config.max_ports)
        if annotations.get(PORTS_ANNOTATION, "").strip()
        else (),
        udp_idle_timeout=config.udp_idle_timeout,
        ready_timeout=config.ready_timeout,
        allow_host_loopback=config.allow_host_loopback,
        source_address=source_address,
        core_user=config.core_user,
    )
