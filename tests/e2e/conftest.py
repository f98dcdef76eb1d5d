"""Fixtures for the end-to-end tests: real runc/crun containers with the hook registered.

Everything here needs root (rootful runtimes, nsenter, ip netns). A missing runtime or tool is
a skip that names it; the hook itself missing is an error, because `make test` builds it.
"""

import os
import shutil
import warnings
from pathlib import Path

import pytest
from e2ekit.container import ContainerFactory
from e2ekit.hookenv import HookEnv
from e2ekit.netns import Netns
from e2ekit.ports import PortAllocator
from e2ekit.rootfs import build_rootfs
from e2ekit.runtimes import RuntimeUnavailable, make_runtime

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_HOOK = REPO / ".venv" / "bin" / "oci-portfwd-hook"
RUNTIMES = ["crun", "runc"]
# Tools the fixtures themselves use; tests ask for their clients with need_tools().
BASE_TOOLS = ["nsenter", "unshare", "ss", "ip", "busybox"]


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.root)


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (make deps installs them)")


@pytest.fixture(scope="session")
def e2e_host():
    """Preconditions of every e2e test."""
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (rootful runc/crun, nsenter, ip netns)")
    need_tools(*BASE_TOOLS)
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("/usr/bin/python3 is needed inside the test containers")


@pytest.fixture(scope="session")
def e2e_tmp(tmp_path_factory, e2e_host) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def rootfs(e2e_tmp) -> Path:
    return build_rootfs(e2e_tmp / "rootfs", HERE / "servers.py")


@pytest.fixture(scope="session", params=RUNTIMES)
def runtime(request, e2e_tmp):
    try:
        return make_runtime(request.param, e2e_tmp)
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def port_alloc() -> PortAllocator:
    return PortAllocator()


@pytest.fixture(scope="session")
def hook_command(e2e_host) -> Path:
    if not os.access(VENV_HOOK, os.X_OK):
        pytest.fail(f"{VENV_HOOK} is missing: run `make venv`")
    return VENV_HOOK


@pytest.fixture
def hook_env(hook_command, tmp_path):
    """A hook setup of this test's own: config file and state dir under tmp_path. Leftovers
    are reaped by whoever started the hook (`containers`, or the test's own fixture), after the
    runtime's delete, never before it."""
    return HookEnv(hook_command, tmp_path / "hook")


@pytest.fixture
def containers(runtime, rootfs, tmp_path):
    factory = ContainerFactory(runtime, rootfs, tmp_path / "bundles")
    yield factory
    for note in factory.cleanup():
        warnings.warn(note, stacklevel=2)


@pytest.fixture
def netns_factory(e2e_host):
    """Makes test netns and deletes them after the test. Containers started in one are still
    stopped properly whatever the teardown order: kill/delete do not enter the netns."""
    made: list[Netns] = []

    def make(ipv6: bool = True) -> Netns:
        ns = Netns(ipv6=ipv6)
        made.append(ns)
        return ns.__enter__()

    yield make
    for ns in made:
        ns.delete()
