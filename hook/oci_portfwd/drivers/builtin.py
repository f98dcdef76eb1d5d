"""The builtin driver: our own relay (core.py). It can do everything a host can."""

from __future__ import annotations

from . import Capabilities, Driver, Warn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..listeners import Listener
    from ..logs import HookLog
    from ..plan import Plan
    from ..seccomp_filter import CoreSandbox
    from ..status import StatusWriter


class BuiltinDriver(Driver):
    name = "builtin"
    capabilities = Capabilities(
        tcp=True,
        udp=True,
        ipv4=True,
        ipv6=True,
        family_fallback=True,
        preserves_loopback_address=True,
        outbound=False,
        holds_listeners=frozenset({"tcp", "udp"}),
        link_local=True,
    )

    def check(self, plan: Plan, warn: Warn) -> Plan:
        return plan

    def run(
        self,
        plan: Plan,
        listeners: Sequence[Listener],
        status: StatusWriter,
        log: HookLog,
        sandbox: CoreSandbox | None = None,
    ) -> int:
        from ..core import run_core  # noqa: PLC0415

        return run_core(plan, listeners, status, log, sandbox=sandbox)
