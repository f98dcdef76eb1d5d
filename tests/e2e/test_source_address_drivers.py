"""What the service sees with the slirp4netns and pasta drivers (the README's table, measured on
Debian 12's slirp4netns 1.2.0 and pasta 2023-03-09). Their UDP is the builtin relay's, in a netns
with a default route (the program's tap): non-loopback UDP clients are seen as loopback there,
loopback clients as themselves."""

import pytest
from e2ekit import clients
from e2ekit.clientaddrs import V4_CLIENT, on_loopback
from e2ekit.services import Services
from e2ekit.tools import need_tools

DRIVERS = {"slirp4netns": "slirp4netns", "pasta": "pasta"}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request):
    need_tools(DRIVERS[request.param])
    return request.param


# One runtime is enough: the drivers' programs decide what the service sees, not the runtime.
@pytest.mark.parametrize("runtime", ["runc"], indirect=True)
def test_what_the_service_sees(containers, hook_env, port_alloc, driver):
    p4, p6, u = port_alloc.take(), port_alloc.take(), port_alloc.take()
    services = Services().peer(80).udp_peer(53)
    spec = f"{p4}:80,{u}:53/udp" + (f",[::]:{p6}:80" if driver == "pasta" else "")
    c = containers.new(services.argv(), hook=hook_env, ports=spec,
                       annotations={"io.oci-portfwd.driver": driver})
    services.wait_ready(c.start())
    log = lambda: hook_env.log_text(c.id)  # noqa: E731
    with on_loopback(V4_CLIENT):
        seen, seen_port, own = clients.tcp_peer("127.0.0.5", "127.0.0.1", p4)
        if driver == "slirp4netns":
            assert (seen, seen_port) == ("10.0.2.2", own)
            seen, seen_port, own = clients.tcp_peer(V4_CLIENT, "127.0.0.1", p4)
            assert (seen, seen_port) == (V4_CLIENT, own)
        else:
            assert seen == "127.0.0.1" and seen_port != own
            seen, seen_port, own = clients.tcp_peer("::1", "::1", p6)
            assert seen == "::1" and seen_port != own
        got = clients.udp_peer("127.0.0.5", "127.0.0.1", u)
        assert got is not None and (got[0], got[1]) == ("127.0.0.5", got[2]), log()
        got = clients.udp_peer(V4_CLIENT, "127.0.0.1", u)
        assert got is not None and got[0] == "127.0.0.1", log()
    assert "UDP clients of 0.0.0.0:" in log()
