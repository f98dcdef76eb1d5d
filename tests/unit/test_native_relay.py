"""The relay threads in C (hook/native/portfwd_relay.c, native_relay.py) between real loopback
TCP sockets, in a process of their own (native_relay_scenarios.py): small messages, half-close
each way with every byte, a reader that pauses (held bytes), resets both ways, bytes waiting
before the hand-over, 200 pairs over two threads, 2,000 pairs that end before they are armed
(their memory reused), a pair the threads cannot take; the traffic page exact. Listeners
given to the threads (native_relay.listen): an empty pool, a refused dial and an address taken
go to the loop as records; 50 clients accepted, dialled and relayed by the threads; two
connections opened together go to both threads; bound to the client's address; paused when
out of descriptors, and resumed; stopped (the core ending), the backlog keeps a new connection. With the threads'
seccomp filter (seccomp_filter.RELAY_SYSCALLS) and without: a call missing from the list
kills the process (SIGSYS), which fails here. The containers' view: tests/e2e/test_relay_threads.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oci_portfwd.native_relay import NATIVE_RELAY

SCRIPT = Path(__file__).with_name("native_relay_scenarios.py")
SCENARIOS = ["small_messages", "half_close_both_ways", "slow_reader", "reset_both_ways",
             "service_speaks_first", "many_pairs", "ended_before_hand_over", "add_refused",
             "threads_pool_empty", "threads_relay", "threads_spread", "threads_refused", "threads_bind_client",
             "threads_pool_grows", "threads_paused", "threads_stopped"]


@pytest.mark.parametrize("filtered", [False, True], ids=["no-filter", "relay-filter"])
def test_scenarios(filtered):
    if not os.path.exists(NATIVE_RELAY):
        pytest.fail(f"{NATIVE_RELAY} is missing: run `make venv`")
    argv = [sys.executable, str(SCRIPT), *(["--filter"] if filtered else []), *SCENARIOS]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.splitlines() == [*(f"{name} ok" for name in SCENARIOS), "stopped: the core closed its pipe"]
