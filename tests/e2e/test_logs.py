"""Which logs stay after the container is gone: only those that explain a failure."""

import socket

from e2ekit.services import Services

WHO = 81


def test_uneventful_log_is_removed_even_when_the_container_exited_first(containers, hook_env, port_alloc):
    # kill then delete: the supervisor sees the container exit and tears down before
    # poststop runs (podman always works this way).
    port = port_alloc.take()
    services = Services().whoami(WHO)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
    services.wait_ready(c.start())
    assert hook_env.log_file(c.id).exists()
    c.stop()
    assert not hook_env.log_file(c.id).exists(), hook_env.log_text(c.id)


def test_log_of_a_failed_start_is_kept(containers, hook_env, port_alloc):
    port = port_alloc.take()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        c = containers.new(Services().whoami(WHO).argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{WHO}")
        assert not c.create().ok
    c.stop()  # runc runs poststop after a failed create; crun does not
    assert "already in use" in hook_env.log_text(c.id)
