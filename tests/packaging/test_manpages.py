"""The hand-written man pages keep up with the schema and the command line."""

import json
import re
import shutil
import subprocess

import pytest
from pkgkit import REPO

MAN = REPO / "packaging" / "man"


def test_config_page_names_every_schema_key():
    schema = json.loads((REPO / "schemas" / "config.schema.json").read_text())
    page = (MAN / "oci-portfwd.json.5").read_text()
    documented = set(re.findall(r"^\.BR? (\$?[a-z_]+)", page, re.M))
    missing = [key for key in schema["properties"] if key not in documented]
    assert not missing, f"oci-portfwd.json.5 does not document {missing}"
    for key, prop in schema["properties"].items():
        for value in prop.get("enum", []):
            assert value.replace("-", "\\-") in page, f"{key} value {value} not in the page"


def test_command_page_names_every_command():
    page = (MAN / "oci-portfwd-hook.1").read_text()
    for command in ("prestart", "createRuntime", "poststop", "auto", "check\\-config", "ps",
                    "\\-\\-version", "OCI_PORTFWD_CONFIG", "OCI_PORTFWD_DEBUG",
                    "XDG_RUNTIME_DIR", "EXIT STATUS"):
        assert command in page, command


def test_runtime_page_names_the_engines_and_the_requests():
    page = (MAN / "oci-portfwd-runtime.1").read_text()
    for word in ("runtimes", "\\-\\-runtime portfwd", "BinaryName", "pod_annotations",
                 "container_annotations", "nerdctl", "CRI\\-O", "OCI_PORTFWD_PORTS",
                 "io.oci\\-portfwd.ports", "rootlesskit", "EXIT STATUS"):
        assert word in page, word


@pytest.mark.parametrize("page", ["oci-portfwd-hook.1", "oci-portfwd-runtime.1", "oci-portfwd.json.5"])
def test_page_renders_without_warnings(page):
    if shutil.which("man") is None:
        pytest.skip("missing tool: man (package man-db)")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                        str(MAN / page)], capture_output=True, text=True, timeout=30,
                       env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_command_page_says_how_to_name_a_hooks_directory():
    page = (MAN / "oci-portfwd-hook.1").read_text()
    for words in ("\\-\\-hooks\\-dir", "hooks_dir", "[engine]", "CONTAINERS_CONF",
                  "[crio.runtime]", "containers.conf (5)", "whitespace"):
        assert words in page, words
