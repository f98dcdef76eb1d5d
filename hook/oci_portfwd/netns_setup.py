"""What the dialer does once inside the container's netns: make sure `lo` is up and
read the container's own addresses (netlink, through pyroute2)."""

from __future__ import annotations

import _socket  # not socket: its enums are off the hook's path (listeners.py)


def reachable(family: int, address: str) -> bool:
    """Whether this netns has a route to `address`: connect() on a UDP socket looks the
    route up and sends nothing. Binding is no test: kernel 6.18 lets a netns bind 127.0.0.1
    while lo is down, and only routing fails (ENETUNREACH)."""
    try:
        s = _socket.socket(family, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        s.connect((address, 9))
        return True
    except OSError:
        return False
    finally:
        s.close()


def loopback_is_up() -> bool:
    # Checked before bringing lo up: spares the ~120 ms pyroute2 import when the runtime
    # already did it (runc and crun do).
    return reachable(_socket.AF_INET, "127.0.0.1")


def bring_loopback_up() -> None:
    from pyroute2 import IPRoute  # noqa: PLC0415 - heavy, rarely needed

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=index, state="up")


def container_addresses() -> dict[int, list[str]]:
    """The container's non-loopback addresses of global scope, per family."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - heavy, only for loopback=container-address

    found: dict[int, list[str]] = {_socket.AF_INET: [], _socket.AF_INET6: []}
    with IPRoute() as ipr:
        for msg in list(ipr.get_addr()):
            family = msg["family"]
            address = msg.get_attr("IFA_ADDRESS")
            if family in found and address and msg["scope"] == 0:
                found[family].append(address)
    return found
