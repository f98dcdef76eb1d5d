"""Drivers: who does the forwarding. Each declares what it can do, so that a plan is
checked against it before anything is bound or started."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import DriverError
from ..listeners import Listener
from ..plan import Plan
from ..status import StatusWriter


@dataclass(frozen=True)
class Capabilities:
    tcp: bool
    udp: bool
    ipv4: bool
    ipv6: bool
    any_loopback_address: bool  # host bindings other than 127.0.0.1 / ::1 work
    outbound: bool  # gives the container network access of its own


class Driver(Protocol):
    name: str
    capabilities: Capabilities

    def check(self, plan: Plan, warn: Callable[[str], None]) -> Plan:
        """The plan this driver will serve: unservable mappings raise or are degraded with a warning."""

    def run(self, plan: Plan, listeners: Sequence[Listener], status: StatusWriter, log: logging.Logger) -> int:
        """Serve the plan in this (forked) process until signalled; returns an exit code."""


def get_driver(name: str) -> Driver:
    from .builtin import BuiltinDriver  # noqa: PLC0415

    drivers: dict[str, Driver] = {"builtin": BuiltinDriver()}
    if name not in drivers:
        raise DriverError(f"unknown driver {name!r}; known drivers: {', '.join(sorted(drivers))}")
    return drivers[name]
