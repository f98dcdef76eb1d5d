"""The pasta driver: Debian's pasta (package passt) on the container's netns, one
-t/-u spec per mapping from the plan.

pasta connects to the same family in the container and resets a client when nothing
listens there: an IPv6 client of an IPv4-only service gets "connection reset by peer".
So mappings without an address are published on IPv4 only (warned); IPv6 is published
where the user asks for it by address. A ::1 client then gets "connection refused",
which `localhost` clients answer by trying 127.0.0.1.

Checked with pasta 2023-03-09 (Debian 12): as root it must be told --runas 0 (else it
drops to nobody and cannot open the netns); the namespaces are passed as inherited fds.
Options this pasta lacks are detected from --help, not assumed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from ..listeners import Listener
from ..logs import HookLog
from ..plan import Plan
from ..ports import PortMapping
from ..status import StatusWriter
from . import Capabilities, Driver, Warn, check_capabilities
from .external import ContainerNamespaces, find_program, serve_until_exit, spawn, stop, wait_until_bound


class PastaDriver(Driver):
    name = "pasta"
    capabilities = Capabilities(
        tcp=True,
        udp=True,
        ipv4=True,
        ipv6=True,
        family_fallback=False,
        preserves_loopback_address=False,
        outbound=True,
        # pasta 2023-03-09 publishes UDP but the container's replies never reach the
        # client (checked with a socat echo server): UDP goes through the builtin relay.
        holds_listeners=frozenset({"udp"}),
    )

    def check(self, plan: Plan, warn: Warn) -> Plan:
        find_program("pasta", "passt")
        return check_capabilities(plan, self.name, self.capabilities, warn)

    def run(
        self,
        plan: Plan,
        listeners: Sequence[Listener],
        status: StatusWriter,
        log: HookLog,
        sandbox: object = None,  # not used: this process restarts the program (README "Privileges")
    ) -> int:
        from .. import procctl  # noqa: PLC0415

        procctl.set_name("portfwd-pasta")
        program = find_program("pasta", "passt")
        options = supported_options(program)
        namespaces = ContainerNamespaces(plan, status, log)
        argv = [program, "--foreground", "--quiet", "--runas", str(os.geteuid())]
        if namespaces.user_path:
            argv += ["--userns", namespaces.user_path]
        argv += ["--netns", namespaces.net_path, "--config-net"]
        tcp = [m for m in plan.mappings if m.proto == "tcp"]
        argv += _port_options(tcp)
        # pasta's defaults forward every port the container binds back to the host
        # (-T/-U auto); that is outbound access to the host's loopback: only on request.
        if not plan.allow_host_loopback:
            argv += ["-T", "none", "-U", "none"]
            if "--no-map-gw" in options:
                argv.append("--no-map-gw")
        proc = spawn(argv, namespaces.fds(), log)
        try:
            wait_until_bound(proc, tcp, time.monotonic() + plan.ready_timeout, "pasta")
        except BaseException:
            stop(proc)
            raise
        for m in tcp:
            log.info("pasta publishes %s", m)
        try:
            return serve_until_exit(proc, "pasta", plan, listeners, status, log)
        finally:
            stop(proc)


def _port_options(mappings: Sequence[PortMapping]) -> list[str]:
    options: list[str] = []
    for proto, flag in (("tcp", "-t"), ("udp", "-u")):
        chosen = [m for m in mappings if m.proto == proto]
        if not chosen:
            # The default is "auto": every port the container binds would be published.
            options += [flag, "none"]
        for m in chosen:
            options += [flag, f"{m.host_ip}/{m.host_port}:{m.container_port}"]
    return options


def supported_options(program: str) -> set[str]:
    """The long options this pasta knows, from its --help (which it prints on stderr)."""
    result = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=5)
    words = (result.stdout + result.stderr).split()
    return {w.rstrip(",") for w in words if w.startswith("--")}
