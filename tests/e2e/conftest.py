"""Fixtures for the end-to-end tests: real runc/crun containers with the hook registered.

Everything here needs root (rootful runtimes, nsenter, ip netns). A missing runtime or tool is
a skip that names it; the hook itself missing is an error, because `make test` builds it.
"""

import os
import shutil
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest
from e2ekit.container import ContainerFactory
from e2ekit.hookenv import HookEnv
from e2ekit.netns import Netns
from e2ekit.ports import PortAllocator
from e2ekit.rootfs import build_rootfs
from e2ekit.runtimes import RuntimeUnavailable, make_rootless_runtime, make_runtime
from e2ekit.tools import need_tools
from e2ekit.users import TestUser, fresh_test_user

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


@pytest.fixture(scope="module")
def runc(e2e_tmp):
    try:
        return make_runtime("runc", e2e_tmp)
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def runc_containers(runc, rootfs, tmp_path):
    """Rootful runc only: for what one runtime shows as well as both (e.g. a spec that joins
    another container's netns by path)."""
    f = ContainerFactory(runc, rootfs, tmp_path / "bundles")
    yield f
    f.cleanup()


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


# --- rootless: the test user, a directory it owns, its runtimes -------------------------------

@pytest.fixture(scope="session")
def test_user(e2e_host) -> TestUser:
    """The unprivileged user of the rootless tests (created if absent, removed again then)."""
    with fresh_test_user() as user:
        yield user


@pytest.fixture(scope="session")
def user_area(test_user) -> Path:
    """A session directory the test user owns: pytest's own tmp dir (/tmp/pytest-of-root) is
    not traversable by the user, and bundles, rootfs, runtime roots and hook configs of rootless
    containers must be readable by it."""
    area = Path(tempfile.mkdtemp(prefix="oci-portfwd-e2e-", dir="/tmp"))
    test_user.make_dir(area)
    yield area
    shutil.rmtree(area, ignore_errors=True)


@pytest.fixture
def user_tmp(test_user, user_area, request) -> Path:
    """A directory of this test's own, owned by the test user."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return test_user.make_dir(user_area / f"{name}-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="session")
def user_rootfs(test_user, user_area) -> Path:
    return test_user.give(build_rootfs(user_area / "rootfs", HERE / "servers.py"))


@pytest.fixture(scope="session")
def rootless_hook_command(hook_command, test_user) -> Path:
    """The venv's hook, which the rootless runtime runs as the test user."""
    r = test_user.run([str(hook_command), "--version"])
    if r.returncode != 0:
        pytest.skip(f"the test user {test_user.name} cannot run {hook_command} "
                    f"(is every parent dir traversable by others?): "
                    f"{r.stderr.decode(errors='replace').strip()}")
    return hook_command


@pytest.fixture(scope="session", params=RUNTIMES, ids=[f"rootless-{r}" for r in RUNTIMES])
def rootless_runtime(request, e2e_tmp, user_area, test_user):
    try:
        return make_rootless_runtime(request.param, e2e_tmp, user_area, test_user)
    except RuntimeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def rootless_hook_env(rootless_hook_command, test_user, user_tmp) -> HookEnv:
    """A hook setup of this test's own in a directory of the user's: the hook, running as the
    user, reads the config and makes its state dir there."""
    return HookEnv(rootless_hook_command, test_user.make_dir(user_tmp / "hook"))


@pytest.fixture
def rootless_containers(rootless_runtime, user_rootfs, user_tmp, test_user):
    factory = ContainerFactory(rootless_runtime, user_rootfs,
                               test_user.make_dir(user_tmp / "bundles"))
    yield factory
    for note in factory.cleanup():
        warnings.warn(note, stacklevel=2)


@pytest.fixture
def netns_pid(e2e_host):
    """A process in a netns of its own: a pid the hook can be pointed at without a container."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "120"], stdin=subprocess.DEVNULL)
    yield proc.pid
    proc.kill()
    proc.wait(timeout=10)
