"""The container image: an almost empty rootfs that borrows the host's /usr read-only.

busybox-static has no UDP server and no way to run our test services, so instead of a real image
the host's /usr (busybox, python3, socat) is bind-mounted into the container; the rootfs only
holds mount points, the merged-/usr symlinks, the web root and servers.py.
"""

import shutil
from pathlib import Path

# Every container's /usr: see bundle.py.
USR_MOUNT = {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}

MERGED_USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

# Large enough that a truncated HTTP body is noticed, small enough to be instant.
INDEX_HTML = b"".join(b"<p>oci-portfwd line %05d</p>\n" % i for i in range(4000))


def build_rootfs(dest: Path, servers_py: Path) -> Path:
    """Create the rootfs under dest (a real directory: runc rejects a symlinked rootfs)."""
    for name in ("proc", "sys", "dev", "tmp", "etc", "run", "usr", "www", "srv"):
        (dest / name).mkdir(parents=True, exist_ok=True)
    for name, target in MERGED_USR_LINKS.items():
        (dest / name).symlink_to(target)
    (dest / "www" / "index.html").write_bytes(INDEX_HTML)
    (dest / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    shutil.copy(servers_py, dest / "srv" / "servers.py")
    return dest
