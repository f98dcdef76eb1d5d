"""The engine's name for a container, for `ps`: a container id alone says little to a person.

Engines leave it in the OCI spec's annotations (CRI-O and containerd for Kubernetes, nerdctl);
podman 4 does not (checked: its annotations are io.container.manager=libpod,
io.podman.annotations.* flags and a few io.kubernetes.cri-o.* ones, no name), but its bundle
is <storage>/<driver>-containers/<id>/userdata, next to containers/storage's containers.json,
which holds every container's names.
"""

from __future__ import annotations

import os

from .errors import loads_strict
from .regularfile import read_regular

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# (pod, container) annotation keys, the pod's may be absent.
PAIRS = (
    ("io.kubernetes.pod.name", "io.kubernetes.container.name"),  # CRI-O (Kubernetes)
    ("io.kubernetes.cri.sandbox-name", "io.kubernetes.cri.container-name"),  # containerd CRI
)
SINGLE = ("io.kubernetes.cri-o.ContainerName", "nerdctl/name")
MAX_NAME = 64
MAX_CONTAINERS_JSON = 16 << 20


def container_name(container_id: str, annotations: Mapping[str, str], bundle: str | None) -> str | None:
    for pod_key, container_key in PAIRS:
        container = annotations.get(container_key)
        if container:
            pod = annotations.get(pod_key)
            return printable(f"{pod}/{container}" if pod else container)
    for key in SINGLE:
        if annotations.get(key):
            return printable(annotations[key])
    if annotations.get("io.container.manager") == "libpod" and bundle:
        return podman_name(container_id, bundle)
    return None


def podman_name(container_id: str, bundle: str) -> str | None:
    userdata = os.path.normpath(bundle)
    container_dir = os.path.dirname(userdata)
    if os.path.basename(userdata) != "userdata" or os.path.basename(container_dir) != container_id:
        return None
    path = os.path.join(os.path.dirname(container_dir), "containers.json")
    # loads_strict, json's C scanner: the json package brings re, enum and collections into
    # the supervisor, whose modules every core is forked with (issue 12).
    try:
        entries = loads_strict(read_regular(path, MAX_CONTAINERS_JSON))
    except (OSError, ValueError, RecursionError):
        return None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("id") == container_id:
            names = entry.get("names")
            if isinstance(names, list) and names and isinstance(names[0], str):
                return printable(names[0])
    return None


def printable(name: str) -> str | None:
    """One terminal-safe line: control characters would garble `ps` (or forge its rows)."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in name)[:MAX_NAME]
    return cleaned or None
