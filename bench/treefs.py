#!/usr/bin/env python3
"""The floor under a walk: a read-only pyfuse3 file system of a fixed tree held in memory.

    .venv/bin/python bench/treefs.py NAMES MOUNTPOINT    # NAMES: "size name" lines

It does what azregfs does for a walk -- readdirplus with every entry's attributes, a
directory handle per opendir -- and nothing else: no Azure, no listing cache, no
consistency contract. `find` and `du` over it cost what any pyfuse3 daemon pays for the
FUSE requests of the walk (opendir, two readdirs and releasedir a directory: pyfuse3 3.5
cannot let the kernel cache a directory's entries), which bounds what azregfs can reach
on the same tree. bench/gc.py runs it as its `floor` step, over the registry it wrote.
Run as root (it mounts); it unmounts on SIGTERM or SIGINT.
"""

from __future__ import annotations

import errno
import stat
import sys
from typing import Any

import pyfuse3
import trio


class TreeFS(pyfuse3.Operations):
    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.children: dict[int, list[tuple[bytes, int]]] = {pyfuse3.ROOT_INODE: []}
        self.by_name: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self.size: dict[int, int] = {}  # files only
        self.handles: dict[int, list[tuple[bytes, int]]] = {}
        inodes: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        for name in sorted(sizes):
            parent = ""
            parts = name.split("/")
            for depth, part in enumerate(parts):
                path = "/".join(parts[:depth + 1])
                inode = inodes.get(path)
                if inode is None:
                    inode = inodes[path] = len(inodes) + 1
                    self.children[inodes[parent]].append((part.encode(), inode))
                    self.by_name[inodes[parent]][part.encode()] = inode
                    if depth < len(parts) - 1:
                        self.children[inode], self.by_name[inode] = [], {}
                    else:
                        self.size[inode] = sizes[name]
                parent = path

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 10.0
        if inode in self.size:
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o644, 1
            attr.st_size = self.size[inode]
        else:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        attr.st_blksize = 1 << 20
        attr.st_blocks = (attr.st_size + 511) // 512
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        inode = self.by_name.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        fh = len(self.handles) + 1
        while fh in self.handles:
            fh += 1
        self.handles[fh] = self.children[inode]
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.handles[fh]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        del self.handles[fh]


async def serve(names: str, mountpoint: str) -> None:
    sizes = {}
    with open(names) as lines:
        for line in lines:
            size, name = line.rstrip("\n").split(" ", 1)
            sizes[name] = int(size)
    pyfuse3.init(TreeFS(sizes), mountpoint, {"fsname=treefs", "ro"})
    print("mounted", flush=True)
    try:
        with trio.open_signal_receiver(2, 15) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], sys.argv[2])
