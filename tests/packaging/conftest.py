"""Fixtures for the packaging tests: `make deb` / `make rpm` into this session's temporary
directories (the tree's own dist/ and build/ are left alone), and what the checks need.

Every test here is marked `packaging`. Building and inspecting need no root; installing the .deb
(test_deb_install.py) does, and is also marked `root` and `e2e`.
"""

from pathlib import Path

import pytest
from pkgkit import PACKAGE, Built, deb_arch, make_package, need_apt_packages, rpm_arch, version

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.packaging)


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory) -> Built:
    need_apt_packages("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all",
                      "python3-setuptools", "gcc", "libc6-dev")
    out = tmp_path_factory.mktemp("deb")
    make_package("deb", out)
    v = version()
    deb = out / "dist" / f"{PACKAGE}_{v}_{deb_arch()}.deb"
    assert deb.is_file(), f"make deb did not produce {deb}"
    return Built(deb, v, out / "build" / "deb" / "src")


@pytest.fixture(scope="session")
def built_rpm(tmp_path_factory) -> Built:
    need_apt_packages("rpm", "pybuild-plugin-pyproject", "gcc", "libc6-dev")
    out = tmp_path_factory.mktemp("rpm")
    make_package("rpm", out)
    v = version()
    rpms = sorted((out / "dist").glob(f"{PACKAGE}-{v}-*.{rpm_arch()}.rpm"))
    assert len(rpms) == 1, f"make rpm produced {rpms} in {out / 'dist'}"
    return Built(rpms[0], v, out / "build" / "rpm" / "src" / f"{PACKAGE}-{v}")
