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
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient  # noqa: E402
from common import cpu_seconds, start_mount, stop_mount  # noqa: E402

from azregfs.config import parse_size  # noqa: E402
from azregfs.demo.azurite import Azurite  # noqa: E402

MiB = 1024 * 1024
FILE_INODE = 2


def serve_null(mountpoint: str, size: int) -> None:
    """The null file system (runs in the child process)."""
    import pyfuse3
    import trio

    zeros = bytes(1 << 20)

    class Null(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.size = size

        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = inode
            entry.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE \
                else (stat.S_IFREG | 0o644)
            entry.st_size = 0 if inode == pyfuse3.ROOT_INODE else self.size
            entry.st_nlink = 1
            entry.attr_timeout = entry.entry_timeout = 300
            return entry

        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            return self._attr(inode)

        async def lookup(self, parent, name, ctx=None):  # type: ignore[no-untyped-def]
            if parent != pyfuse3.ROOT_INODE or name != b"f":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(FILE_INODE)

        async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
            return self._attr(inode)

        async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
            return pyfuse3.FileInfo(fh=1)

        async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
            return len(buf)

        async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
            return zeros[:max(0, min(size, self.size - off))]

        async def flush(self, fh):  # type: ignore[no-untyped-def]
            pass

        async def release(self, fh):  # type: ignore[no-untyped-def]
            pass

    pyfuse3.init(Null(), mountpoint, ["fsname=null", "default_permissions"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--bs", default="4k,32k,1M")
    args = parser.parse_args()
    size = parse_size(args.size)
    sizes = [parse_size(b) for b in args.bs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fuse-floor-"))
    rows: dict[int, dict[str, tuple[float, float]]] = {bs: {} for bs in sizes}

    null_mnt = work / "null"
    null_mnt.mkdir()
    child = subprocess.Popen([sys.executable, __file__, "--serve-null", str(null_mnt), str(size)])
    try:
        wait_mounted(null_mnt)
        for bs in sizes:
            rows[bs]["null"] = (write(child.pid, null_mnt / "f", size, bs),
                                read(child.pid, null_mnt / "f"))
    finally:
        subprocess.run(["fusermount3", "-u", str(null_mnt)], check=False)
        child.wait(timeout=30)

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
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-null":
        serve_null(sys.argv[2], int(sys.argv[3]))
    else:
        main()
