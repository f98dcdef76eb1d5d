"""Helpers of the packaging tests (a module of its own: `conftest` is ambiguous when the whole
suite runs, tests/e2e has one too)."""

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACKAGE = "oci-portfwd-hook"
BUILD_TIMEOUT = 100


def version() -> str:
    text = (REPO / "hook" / "oci_portfwd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, "no __version__ in hook/oci_portfwd/__init__.py"
    return match.group(1)


def deb_arch() -> str:
    """The packages are built for the machine (the native dialer is compiled)."""
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def rpm_arch() -> str:
    return subprocess.run(["rpm", "--eval", "%{_arch}"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def missing_apt_packages(names: list[str]) -> list[str]:
    if shutil.which("dpkg-query") is None:
        return names
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *names],
                         capture_output=True, text=True, timeout=30).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]}
    return [n for n in names if n not in installed]


def need_apt_packages(*names: str) -> None:
    missing = missing_apt_packages(list(names))
    if missing:
        pytest.skip(f"missing Debian packages: {', '.join(missing)} (make pkg-deps installs them)")


def python_modules(tree: Path = REPO) -> list[str]:
    """The package's modules as paths relative to hook/ (what both packages must ship)."""
    root = tree / "hook"
    return sorted(str(p.relative_to(root)) for p in (root / "oci_portfwd").rglob("*.py")
                  if "__pycache__" not in p.parts)


def schema_files(tree: Path = REPO) -> list[str]:
    return sorted(p.name for p in (tree / "schemas").glob("*.json"))


@dataclass(frozen=True)
class Built:
    path: Path
    version: str
    # The copy of the tree it was built from (the tree itself may change meanwhile).
    source: Path


def make_package(target: str, out: Path) -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target,
         f"DIST_DIR={out / 'dist'}", f"PKG_BUILD_DIR={out / 'build'}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        pytest.fail(f"make {target} failed (exit {result.returncode}):\n{tail}")
