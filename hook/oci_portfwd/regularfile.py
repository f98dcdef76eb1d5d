"""Reading a file the hook is pointed at (config, bundle config.json, state files): only a
regular file, never more than a bound, and never blocking.

O_NONBLOCK: open(2) of a FIFO with no writer waits for one (forever: the runtime kills the
hook at its timeout, or waits as long). A directory opens fine and a device reads without
end; fstat tells them apart before anything is read.
"""

from __future__ import annotations

import errno
import os
import stat

KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


class NotARegularFile(OSError):
    """strerror says what it is instead, e.g. "a FIFO, not a regular file"."""


class FileTooLarge(OSError):
    pass


def read_regular(path: str | os.PathLike[str], limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The whole file; raises OSError (FileNotFoundError, NotARegularFile, FileTooLarge, …)
    whose strerror completes "cannot read FILE: …"."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "not a plain file")
            raise NotARegularFile(errno.EINVAL, f"it is {kind}, not a regular file", str(path))
        chunks = []
        size = 0
        # /proc files report size 0: read until EOF, one byte past the limit at most.
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileTooLarge(errno.EFBIG, f"it is larger than {limit} bytes", str(path))
    return b"".join(chunks)
