#!/usr/bin/env python3
"""The floor under the daemon's CPU: what pyfuse3 and trio cost a request when the file
system does nothing at all, next to azregfs doing the same writes and reads.

    .venv/bin/python bench/fuse_floor.py [--size 256M] [--bs 4k,32k,1M]

Mounts, in a child process, a file system of one file whose WRITEs are counted and
dropped and whose READs answer from one preallocated buffer (no Azure, no cache, no
bookkeeping), and writes ``--size`` through it with ``dd bs=BS``, then reads it back. Then
it does the same through azregfs on its own Azurite (the read through a fresh mount: cold).
For each it prints the file system process's CPU seconds (user + system), its CPU per
WRITE, and azregfs / null; and the CPU this process spends to upload and read back the
same bytes with the SDK alone (Put Blocks and ranged GETs of 8 MiB), the other share of the
daemon's work that no FUSE design removes.

Why: a registry push reaches the daemon as one FUSE WRITE per write(2) of the registry
(32 KiB for distribution); without the writeback cache the kernel does not merge them. The
null file system's CPU per WRITE is what any pyfuse3 daemon pays before doing anything, so
it bounds what cutting our own code can give (issue 18). Run as root (it mounts).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient  # noqa: E402
from common import cpu_seconds, start_mount, stop_mount  # noqa: E402

from azregfs.config import parse_size  # noqa: E402
from azregfs.demo.azurite import Azurite  # noqa: E402
from azregfs.fs import control  # noqa: E402

MiB = 1024 * 1024
FILE_INODE = 2


LINK = b"sha256:" + b"0" * 64  # a registry link file: 71 bytes
TREE_INODE = 3  # "w", the tree a walk goes through: w/dNNNNNN/link


def serve_null(mountpoint: str, size: int, dirs: int, counts_path: str) -> None:
    """The null file system (runs in the child process): the file "f" of `size` bytes,
    and "w", a tree of `dirs` directories holding a link file each. Its count of requests
    by operation lands in counts_path when it is unmounted."""
    import pyfuse3
    import trio

    zeros = bytes(1 << 20)
    counts: dict[str, int] = {}

    def counted(handler):  # type: ignore[no-untyped-def]
        async def wrapper(*args):  # type: ignore[no-untyped-def]
            counts[handler.__name__] = counts.get(handler.__name__, 0) + 1
            return await handler(*args)
        return wrapper

    class Null(pyfuse3.Operations):
        # Directory i of the tree is inode 10 + 2i, its link 11 + 2i.
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = inode
            directory = inode in (pyfuse3.ROOT_INODE, TREE_INODE) or \
                (inode >= 10 and inode % 2 == 0)
            entry.st_mode = (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | 0o644)
            entry.st_size = 0 if directory else size if inode == FILE_INODE else len(LINK)
            entry.st_nlink = 1
            # azregfs's defaults: entry_timeout and attr_timeout 1 s
            entry.attr_timeout = entry.entry_timeout = 1.0
            return entry

        def _children(self, inode: int) -> list[tuple[bytes, int]]:
            if inode == pyfuse3.ROOT_INODE:
                return [(b"f", FILE_INODE), (b"w", TREE_INODE)]
            if inode == TREE_INODE:
                return [(b"d%06d" % i, 10 + 2 * i) for i in range(dirs)]
            return [(b"link", inode + 1)]

        @counted
        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            return self._attr(inode)

        @counted
        async def lookup(self, parent, name, ctx=None):  # type: ignore[no-untyped-def]
            for child, inode in self._children(parent) if parent != FILE_INODE else ():
                if child == name:
                    return self._attr(inode)
            raise pyfuse3.FUSEError(errno.ENOENT)

        @counted
        async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
            return inode

        @counted
        async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
            children = self._children(fh)
            for index in range(start_id, len(children)):
                name, inode = children[index]
                if not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                    return

        @counted
        async def releasedir(self, fh):  # type: ignore[no-untyped-def]
            pass

        @counted
        async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
            return self._attr(inode)

        @counted
        async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
            return pyfuse3.FileInfo(fh=inode)

        @counted
        async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
            return len(buf)

        @counted
        async def read(self, fh, off, length):  # type: ignore[no-untyped-def]
            if fh != FILE_INODE:
                return LINK[off:off + length]
            return zeros[:max(0, min(length, size - off))]

        @counted
        async def flush(self, fh):  # type: ignore[no-untyped-def]
            pass

        @counted
        async def release(self, fh):  # type: ignore[no-untyped-def]
            pass

    pyfuse3.init(Null(), mountpoint, ["fsname=null", "default_permissions"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        Path(counts_path).write_text(json.dumps(counts))


WALK = """
import os, sys
def walk(path):
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path)
            else:
                with open(entry.path, "rb") as f:
                    f.read()
walk(sys.argv[1])
"""


def walk(pid: int, path: Path) -> float:
    """CPU of `pid` while a walk lists every directory under `path` and reads every file
    (as garbage-collect does with link files)."""
    before = cpu_seconds(pid)
    subprocess.run([sys.executable, "-c", WALK, str(path)], check=True)
    return cpu_seconds(pid) - before


def write(pid: int, path: Path, size: int, bs: int) -> float:
    """CPU of `pid` while `size` bytes are written to `path` in writes of `bs`."""
    before = cpu_seconds(pid)
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={size // bs}",
                    "conv=fsync", "status=none"], check=True)
    return cpu_seconds(pid) - before


def read(pid: int, path: Path) -> float:
    """CPU of `pid` while `path` is read to its end."""
    before = cpu_seconds(pid)
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    return cpu_seconds(pid) - before


def sdk_cpu(container: ContainerClient, size: int) -> tuple[float, float]:
    """This process's CPU to upload `size` bytes in Put Blocks of 8 MiB, one at a time, and
    to read them back in ranged GETs of 8 MiB: the SDK's share of the daemon's work."""
    blob = container.get_blob_client("sdk")
    block = os.urandom(8 * MiB)
    before = time.process_time()
    ids = []
    for index in range(size // len(block)):
        ids.append(BlobBlock(f"{index:08d}"))
        blob.stage_block(ids[-1].id, block, length=len(block))
    blob.commit_block_list(ids)
    uploaded = time.process_time()
    for offset in range(0, size, 8 * MiB):
        blob.download_blob(offset, 8 * MiB).readall()
    return uploaded - before, time.process_time() - uploaded


def wait_mounted(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not mount")
        time.sleep(0.05)


class NullMount:
    """The null file system, mounted by a child process, while the block runs."""

    def __init__(self, path: Path, size: int, dirs: int) -> None:
        self.path, self.size, self.dirs = path, size, dirs
        self.counts_path = path.with_suffix(".counts.json")
        self.counts: dict[str, int] = {}

    def __enter__(self) -> NullMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.child = subprocess.Popen([sys.executable, __file__, "--serve-null", str(self.path),
                                       str(self.size), str(self.dirs), str(self.counts_path)])
        wait_mounted(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_mount(self.path, self.child, timeout=30)
        self.counts = json.loads(self.counts_path.read_text())


def upload_tree(container: ContainerClient, dirs: int) -> None:
    """w/dNNNNNN/link for each directory, as the null file system shows them."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: container.upload_blob(f"w/d{i:06d}/link", LINK),
                      range(dirs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--bs", default="4k,32k,1M")
    parser.add_argument("--dirs", type=int, default=1000,
                        help="directories of the walk, each holding one 71-byte file")
    args = parser.parse_args()
    size = parse_size(args.size)
    sizes = [parse_size(b) for b in args.bs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fuse-floor-"))
    rows: dict[int, dict[str, tuple[float, float]]] = {bs: {} for bs in sizes}
    walks: dict[str, tuple[float, int]] = {}  # CPU seconds, FUSE requests

    with NullMount(work / "null", size, args.dirs) as null:
        for bs in sizes:
            rows[bs]["null"] = (write(null.child.pid, null.path / "f", size, bs),
                                read(null.child.pid, null.path / "f"))
    with NullMount(work / "null-walk", size, args.dirs) as null:
        cpu = walk(null.child.pid, null.path / "w")
    walks["null"] = (cpu, sum(null.counts.values()))

    with Azurite() as azurite:
        container = BlobServiceClient.from_connection_string(azurite.connection_string) \
            .create_container("floor")
        sdk = sdk_cpu(container, size)
        for bs in sizes:
            path = work / f"azregfs-{bs}"
            written = read_back = 0.0
            for step in ("write", "read"):  # a fresh mount to read: a cold read
                daemon = start_mount(azurite, "floor", path, "", work / f"{bs}-{step}.log")
                try:
                    if step == "write":
                        written = write(daemon.pid, path / f"f{bs}", size, bs)
                    else:
                        read_back = read(daemon.pid, path / f"f{bs}")
                finally:
                    stop_mount(path, daemon)
            rows[bs]["azregfs"] = (written, read_back)
        upload_tree(container, args.dirs)
        path = work / "azregfs-walk"
        daemon = start_mount(azurite, "floor", path, "", work / "walk.log")
        try:
            for label in ("azregfs cold", "azregfs warm"):
                before = json.loads(control.read(path, "stats"))["fuse"]["operations"]
                cpu = walk(daemon.pid, path / "w")
                after = json.loads(control.read(path, "stats"))["fuse"]["operations"]
                walks[label] = (cpu, sum(after.values()) - sum(before.values()))
        finally:
            stop_mount(path, daemon)

    print(f"{size // MiB} MiB written with dd bs=BS (conv=fsync), then read with bs=1M; "
          "(the read through a fresh mount); CPU seconds of the file system's process")
    print(f"the SDK alone, 8 MiB blocks, one at a time: upload {sdk[0]:.2f}, "
          f"ranged GETs {sdk[1]:.2f}")
    print(f"{'bs':>6} {'writes':>8} {'null':>7} {'azregfs':>8} {'ratio':>6}   "
          f"{'µs/WRITE null':>14} {'azregfs':>8}   {'read null':>9} {'azregfs':>8}")
    for bs in sizes:
        writes = size // bs
        (null_w, null_r), (az_w, az_r) = rows[bs]["null"], rows[bs]["azregfs"]
        print(f"{bs // 1024:>5}k {writes:>8} {null_w:>7.2f} {az_w:>8.2f} "
              f"{az_w / max(null_w, 0.01):>6.1f}   {null_w / writes * 1e6:>14.0f} "
              f"{az_w / writes * 1e6:>8.0f}   {null_r:>9.2f} {az_r:>8.2f}")
    print(f"\nwalk of {args.dirs} directories, each with one 71-byte file read "
          "(the shape of a registry's link files); the cold walk on a fresh mount, the warm "
          "one right after it")
    print(f"{'':14s} {'CPU s':>7} {'requests':>9} {'µs/request':>11} {'ms/directory':>13}")
    for label, (cpu, requests) in walks.items():
        print(f"{label:14s} {cpu:>7.2f} {requests:>9} {cpu / max(requests, 1) * 1e6:>11.0f} "
              f"{cpu / args.dirs * 1e3:>13.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve-null":
        serve_null(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
