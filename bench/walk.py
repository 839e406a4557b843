#!/usr/bin/env python3
"""Benchmark: walking a large tree through azregfs, next to the SDK listing the same container.

Run by hand (root, /dev/fuse), from the repository:

    .venv/bin/python bench/walk.py                      # 20,000 blobs, 2-level fan-out
    .venv/bin/python bench/walk.py --walk 100000        # 100,000 blobs
    .venv/bin/python bench/walk.py --layout registry    # blobs/sha256/<2 hex>/<hex>/data

It starts its own Azurite, creates the blobs with the SDK (thread pool), times the SDK's own
flat listing and a per-directory listing (what any walker of a hierarchy must do), mounts
through the CLI, times `find MNT | wc -l` cold then warm, and reports the daemon's peak RSS
(VmHWM) and its inode table before and after the kernel is made to forget
(`echo 2 > /proc/sys/vm/drop_caches`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobPrefix, BlobServiceClient, ContainerClient
from common import proc_status_kib, start_mount, stop_mount

from azregfs.demo.azurite import Azurite
from azregfs.fs import control  # noqa: E402

CONTAINER = "walkbench"


def fanout_names(count: int) -> Iterator[str]:
    """Two levels of 16 directories each, files spread evenly over the 256 leaves."""
    for index in range(count):
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        yield f"{digest[0]}/{digest[1]}/blob-{index:07d}"


def registry_names(count: int) -> Iterator[str]:
    """The registry's own layout: one directory per blob under a 2-hex-digit fan-out."""
    for index in range(count):
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        yield f"docker/registry/v2/blobs/sha256/{digest[:2]}/{digest}/data"


LAYOUTS: dict[str, Callable[[int], Iterator[str]]] = {
    "fanout": fanout_names, "registry": registry_names,
}


def timed(label: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    elapsed = time.monotonic() - start
    print(f"  {label}: {elapsed:.2f} s", flush=True)
    return result, elapsed


def create_blobs(container: ContainerClient, names: list[str], threads: int) -> None:
    def upload(name: str) -> None:
        container.upload_blob(name, b"0123456789abcdef", overwrite=True)

    with ThreadPoolExecutor(threads) as pool:
        for done, _ in enumerate(pool.map(upload, names), 1):
            if done % 10000 == 0:
                print(f"    {done} created", flush=True)


def sdk_walk(container: ContainerClient, prefix: str = "") -> tuple[int, int]:
    """List one directory level at a time, depth first: returns (files, directories)."""
    files = directories = 0
    pending = [prefix]
    while pending:
        current = pending.pop()
        for item in container.walk_blobs(name_starts_with=current or None, delimiter="/"):
            if isinstance(item, BlobPrefix):
                directories += 1
                pending.append(item.name)
            else:
                files += 1
    return files, directories


def find_count(mountpoint: Path) -> int:
    result = subprocess.run(f"find '{mountpoint}' | wc -l", shell=True, check=True,
                            capture_output=True, text=True)
    return int(result.stdout.strip())


def stats(mountpoint: Path) -> dict[str, Any]:
    return json.loads(control.read(mountpoint, "stats"))


def status_mib(pid: int, field: str) -> float:
    return proc_status_kib(pid, field)[field] / 1024


def forget_everything(mountpoint: Path, settle: float = 10.0) -> int:
    """Drop the kernel's dentries and inodes, then wait for the daemon's table to settle."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    previous, deadline = -1, time.monotonic() + settle
    while time.monotonic() < deadline:
        current = stats(mountpoint)["inodes"]
        if current == previous:
            return current
        previous = current
        time.sleep(0.5)
    return stats(mountpoint)["inodes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=20000, help="blobs to create (20000)")
    parser.add_argument("--walk", type=int, metavar="N", help="the same with N blobs")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="fanout")
    parser.add_argument("--threads", type=int, default=32, help="SDK upload threads (32)")
    parser.add_argument("-o", dest="options", default="",
                        help="mount options for the daemon, e.g. dir_timeout=60")
    args = parser.parse_args()
    count = args.walk or args.blobs
    if os.geteuid() != 0:
        print("needs root (FUSE mount and /proc/sys/vm/drop_caches)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="azregfs-walk-"))
    mountpoint = work / "mnt"
    mountpoint.mkdir()
    figures: dict[str, Any] = {"blobs": count, "layout": args.layout, "options": args.options}
    with Azurite() as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.create_container(CONTAINER)
        names = list(LAYOUTS[args.layout](count))
        print(f"creating {count} blobs ({args.layout}, {args.threads} threads)", flush=True)
        _, figures["create_s"] = timed("create", lambda: create_blobs(container, names,
                                                                         args.threads))
        print("SDK", flush=True)
        listed, figures["sdk_list_all_s"] = timed(
            "list_blobs (flat, all)", lambda: sum(1 for _ in container.list_blobs()))
        assert listed == count, listed
        (files, directories), figures["sdk_walk_s"] = timed(
            "walk_blobs per directory", lambda: sdk_walk(container))
        assert files == count, files
        figures["directories"] = directories

        print("azregfs", flush=True)
        process = start_mount(azurite, CONTAINER, mountpoint, args.options, work / "daemon.log")
        try:
            pid = int(control.read(mountpoint, "pid"))
            entries, figures["find_cold_s"] = timed("find | wc -l (cold)",
                                                    lambda: find_count(mountpoint))
            assert entries == 1 + directories + count, (entries, directories, count)
            _, figures["find_warm_s"] = timed("find | wc -l (warm)",
                                              lambda: find_count(mountpoint))
            after_walk = stats(mountpoint)
            figures["list_requests"] = after_walk["driver"]["requests"].get("list", 0)
            figures["head_requests"] = after_walk["driver"]["requests"].get("head", 0)
            figures["inodes_after_walk"] = after_walk["inodes"]
            figures["rss_after_walk_mib"] = round(status_mib(pid, "VmRSS"), 1)
            figures["inodes_after_drop_caches"] = forget_everything(mountpoint)
            figures["rss_after_drop_caches_mib"] = round(status_mib(pid, "VmRSS"), 1)
            figures["peak_rss_mib"] = round(status_mib(pid, "VmHWM"), 1)
        finally:
            stop_mount(mountpoint, process, timeout=60)
    for key in ("create_s", "sdk_list_all_s", "sdk_walk_s", "find_cold_s", "find_warm_s"):
        figures[key] = round(figures[key], 2)
    figures["find_cold_vs_sdk_walk"] = round(figures["find_cold_s"] / figures["sdk_walk_s"], 2)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
