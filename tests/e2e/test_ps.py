"""`oci-portfwd-hook ps`: what a person sees of the live forwardings."""

from e2ekit import clients
from e2ekit.services import Services
from e2ekit.wait import wait_until

SINK = 83


def test_ps_lists_ports_and_traffic(containers, hook_env, port_alloc):
    port = port_alloc.take()
    services = Services().sink(SINK)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{SINK}")
    services.wait_ready(c.start())

    def listing() -> str:
        return hook_env.run("ps").stdout.decode()

    # Idle: the state file carries the figures from the start.
    assert " 0/0 " in listing(), listing()
    size = 3 << 20
    assert clients.sink_roundtrip("127.0.0.1", port, size) == clients.pattern_sha256(size)

    # The supervisor copies the core's counters into the state file at least once a second.
    wait_until(lambda: "3.0MiB" in listing(), 6, lambda: f"3.0MiB sent in:\n{listing()}")
    row = next(line for line in listing().splitlines() if line.startswith(c.id[:20]))
    assert " up " in row and "builtin" in row and f"127.0.0.1:{port}:{SINK}/tcp" in row
    assert " 0/1 " in row, row  # the one connection, closed

    c.stop()
    assert c.id[:20] not in listing()


def test_ps_with_nothing_forwarded(hook_env):
    r = hook_env.run("ps")
    assert r.returncode == 0 and b"no forwarded containers" in r.stdout
