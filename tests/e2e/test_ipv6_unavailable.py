"""A host without IPv6: the runtime (and so the hook) runs in a test netns where IPv6 is
disabled. A mapping without address must still start the container, IPv4 only, with a warning
in the hook's log."""

import re

from e2ekit import clients
from e2ekit.ports import listeners
from e2ekit.rootfs import INDEX_HTML
from e2ekit.services import Services


def test_unspecified_mapping_falls_back_to_ipv4(containers, hook_env, netns_factory, port_alloc):
    ns = netns_factory(ipv6=False)
    assert "::1" not in ns.run(["ip", "-6", "addr", "show", "dev", "lo"],
                               capture_output=True, text=True).stdout
    port = port_alloc.take()
    services = Services().http(80)
    c = containers.new(services.argv(), hook=hook_env, ports=f"{port}:80", netns=ns)
    services.wait_ready(c.start())

    r = clients.curl("127.0.0.1", port, prefix=ns.prefix())
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == INDEX_HTML
    bound = {addr for addr, p in listeners("tcp", netns_path=str(ns.path)) if p == port}
    assert bound == {"0.0.0.0"}, bound
    # Nothing of this container is bound in the host netns.
    assert port not in {p for _, p in listeners("tcp")}
    assert re.search(r"(?i)ipv6", hook_env.log_text(c.id)), hook_env.log_text(c.id)
