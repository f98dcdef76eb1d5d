"""Traffic figures of one core, for `oci-portfwd-hook ps`.

Counted where it costs nothing on the data path: bytes per direction of a connection
(one addition per splice), folded into the listener's totals when it closes; the core
reports totals up the status pipe every few seconds when they changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REPORT_EVERY = 2.0


@dataclass
class Totals:
    tcp_open: int = 0
    tcp_total: int = 0
    tcp_unanswered: int = 0  # dials refused in every family: the client got a reset
    bytes_to_container: int = 0
    bytes_to_client: int = 0
    udp_sessions: int = 0
    udp_datagrams: int = 0

    def add(self, other: Totals) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
