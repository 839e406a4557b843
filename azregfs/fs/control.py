"""The control directory: ``.azregfs`` in the mount's root, the operator's window on a
running daemon. ``azregfs stats``, ``check`` and ``unmount`` read it; so can ``cat``.

    MNT/.azregfs/stats   the daemon's counters as JSON (Metrics.snapshot)
    MNT/.azregfs/pid     the daemon's process ID
    MNT/.azregfs/probe   opening it makes one cheap request to Azure now: {"ok": ...}

Why files and not extended attributes: unless a filesystem answers getxattr with ENOSYS
(which turns extended attributes off for the whole mount), the kernel asks it for
``security.capability`` before every write(2), to know whether the write must drop file
capabilities. That was one GETXATTR request per WRITE: half the throughput of 32 KiB
writes, three quarters of 4 KiB ones with the writeback cache. So azregfs answers ENOSYS,
and the window is this directory.

Invariants:
- It is never listed (readdir of the root leaves it out), so ``find``, ``du``, ``rsync``
  and a registry's walk never meet it; a lookup of ``.azregfs`` in the root finds it. The
  name is reserved: blobs under ``.azregfs/`` at the top of the container are not shown, and
  nothing may be created, removed or renamed there (EACCES).
- Its inodes are fixed numbers far above any the namespace hands out; forgets of them are
  ignored.
- Read-only. A file's content is made at open, once per handle, and served with direct I/O,
  so each open is a fresh snapshot and the page cache never keeps an old one.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable

import pyfuse3

CONTROL_NAME = ".azregfs"
DIR_INODE = 1 << 62
FILES = ("stats", "pid", "probe")
_FILE_INODES = {name: DIR_INODE + 1 + index for index, name in enumerate(FILES)}
_FILE_NAMES = {inode: name for name, inode in _FILE_INODES.items()}

Source = Callable[[], Awaitable[bytes]]


def path(mountpoint: str | os.PathLike[str], name: str) -> str:
    """Where a control file of the mount at `mountpoint` is read."""
    return os.path.join(mountpoint, CONTROL_NAME, name)


def read(mountpoint: str | os.PathLike[str], name: str) -> bytes:
    with open(path(mountpoint, name), "rb") as handle:
        return handle.read()


def is_control(inode: int) -> bool:
    return DIR_INODE <= inode <= DIR_INODE + len(FILES)


def is_reserved(parent_inode: int, name: bytes) -> bool:
    """The control directory's own name in the root, or anything inside it."""
    return (parent_inode == pyfuse3.ROOT_INODE and name == CONTROL_NAME.encode()) \
        or is_control(parent_inode)


class Control:
    def __init__(self, sources: dict[str, Source]) -> None:
        assert set(sources) == set(FILES)
        self.sources = sources
        self.started = time.time()
        self.handles: dict[int, bytes] = {}  # fh -> the content made at open

    def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The control entry `name` in `parent_inode`; None if it is not one."""
        if parent_inode == pyfuse3.ROOT_INODE and name == CONTROL_NAME.encode():
            return self.attributes(DIR_INODE)
        if parent_inode == DIR_INODE:
            inode = _FILE_INODES.get(name.decode("utf-8", "replace"))
            return self.attributes(inode) if inode is not None else None
        return None

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = attrs.attr_timeout = 3600.0  # it never changes
        if inode == DIR_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o555, 2
        else:
            # Its size is unknown until it is opened; direct I/O reads to the end anyway.
            attrs.st_mode, attrs.st_nlink = stat.S_IFREG | 0o444, 1
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = 4096
        stamp = int(self.started * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = stamp
        return attrs

    def entries(self) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        return [(name.encode(), self.attributes(_FILE_INODES[name])) for name in FILES]

    async def open(self, inode: int, fh: int) -> pyfuse3.FileInfo:
        self.handles[fh] = await self.sources[_FILE_NAMES[inode]]()
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self.handles[fh][offset:offset + size]
