"""`oci-portfwd-hook ps`: what a person sees of the live forwardings."""

import json

import pytest
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
    row = next(line for line in listing().splitlines() if line.startswith(c.id[:12]))
    assert " up " in row and "builtin" in row and f"127.0.0.1:{port}:{SINK}/tcp" in row
    assert " 0/1 " in row, row  # the one connection, closed

    c.stop()
    assert c.id[:12] not in listing()


def test_ps_with_nothing_forwarded(hook_env):
    r = hook_env.run("ps")
    assert r.returncode == 0 and b"no forwarded containers" in r.stdout


def test_ps_shows_the_engines_name(containers, hook_env, port_alloc):
    """Kubernetes' names from the CRI annotations (CRI-O's keys), recorded at start. Podman's
    name: test_podman.py."""
    port = port_alloc.take()
    services = Services().sink(SINK)
    c = containers.new(services.argv(), hook=hook_env, ports=f"127.0.0.1:{port}:{SINK}",
                       annotations={"io.kubernetes.pod.name": "web-7d4b9",
                                    "io.kubernetes.container.name": "nginx"})
    services.wait_ready(c.start())
    assert hook_env.read_state(c.id)["name"] == "web-7d4b9/nginx"
    row = next(line for line in hook_env.run("ps").stdout.decode().splitlines()
               if line.startswith(c.id[:12]))
    assert " web-7d4b9/nginx " in row, row


def _record(cid: str) -> dict:
    return {"container_id": cid, "container_pid": 1, "supervisor_pid": 1,
            "supervisor_start_time": 1, "driver": "builtin", "ports": ["8080:80/tcp"],
            "log": "/dev/null", "created": 0.0}


def test_ps_ids_long_enough_to_tell_apart_and_damaged_files_listed(hook_env):
    """Ids that share 15 characters are shown with 16 (at least 12 in any case); a damaged
    state file is a row with its reason, not silently skipped."""
    hook_env.state_dir.mkdir(mode=0o700, parents=True)
    ids = ["0123456789abcd-one", "0123456789abcd-two", "ffff0000ffff0000ffff"]
    for cid in ids:
        hook_env.state_file(cid).write_text(json.dumps(_record(cid)))
    hook_env.state_file("broken01").write_text('{"container_id": "broken01", "ports": ')
    out = hook_env.run("ps").stdout.decode()
    rows = out.splitlines()
    assert rows[0].startswith("CONTAINER" + " " * 8 + "NAME"), out
    for cid in ids:
        assert any(r.startswith(cid[:16] + " ") for r in rows), out
    broken = next(r for r in rows if r.startswith("broken01 "))
    assert "damaged" in broken and "broken01.json is damaged" in broken, broken


@pytest.mark.parametrize("command", ["ps", "check-config", "prestart", "poststop", "auto"])
def test_every_subcommand_has_help(hook_env, command):
    r = hook_env.run(command, "--help")
    assert r.returncode == 0, r
    out = r.stdout.decode()
    assert out.startswith(f"usage: oci-portfwd-hook {command}"), out
    assert "CONTAINER" not in out and not r.stderr, r


def test_check_config_prints_numbers_as_written(hook_env, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ready_timeout": 2, "udp_idle_timeout": 0.5}))
    out = hook_env.run("check-config", str(path)).stdout.decode()
    assert "  ready_timeout: 2\n" in out and "  udp_idle_timeout: 0.5\n" in out, out
    assert "  max_ports: 1024\n" in out, out  # a default
    path.write_text("{}")
    out = hook_env.run("check-config", str(path)).stdout.decode()
    assert "  ready_timeout: 10\n" in out and "  udp_idle_timeout: 60\n" in out, out


def test_check_config_refuses_a_ready_timeout_no_start_can_meet(hook_env, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ready_timeout": 0.001}))
    r = hook_env.run("check-config", str(path))
    assert r.returncode == 1
    assert r.stderr.decode().strip().endswith("/ready_timeout: must be between 1 and 300 (got 0.001)"), r
