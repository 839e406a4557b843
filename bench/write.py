#!/usr/bin/env python3
"""Sequential write throughput through the mount next to the SDK's upload, in one run.

    .venv/bin/python bench/write.py [--size 1G] [--bs 1M] [-o block_size=8M,...] [--json out.json]
    .venv/bin/python bench/write.py --size 256M --bs 4k,32k,1M     # the write-size sweep

Starts its own Azurite (in memory) and its own mount (through the CLI). Prepares a local
file of random bytes (read once, so it is page-cached), then:

- mount: ``dd if=SRC of=MNT/f bs=1M conv=fsync`` -- the time until dd exits, i.e. until
  the data is committed in Azure;
- sdk c=4 / c=1: ``BlobClient.upload_blob`` of the same file with max_concurrency 4 and 1
  (the SDK's own block sizes).

It also reports the daemon's peak RSS during the dd (VmHWM, reset through
``/proc/PID/clear_refs`` just before) and its dirty-buffer peak. Azurite is CPU-bound, so
the ratio mount/SDK says more than the absolute MiB/s. Run as root (it mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.storage.blob import BlobServiceClient  # noqa: E402
from common import proc_status_kib, start_mount, stop_mount  # noqa: E402

from azregfs.config import parse_size  # noqa: E402
from azregfs.demo.azurite import Azurite  # noqa: E402
from azregfs.fs import control  # noqa: E402

MiB = 1024 * 1024


class RssSampler(threading.Thread):
    """Samples VmRSS while the write runs (VmHWM gives the peak; this gives a cross-check)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS")["VmRSS"])
            except OSError:
                return


def make_source(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(16 * MiB, remaining))
            out.write(chunk)
            remaining -= len(chunk)
    with open(path, "rb") as warm:  # into the page cache: dd then measures the mount
        while warm.read(16 * MiB):
            pass


def bench_mount(source: Path, mountpoint: Path, size: int, bs: str = "1M") -> dict:
    pid = int(control.read(mountpoint, "pid"))
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    rss_before = proc_status_kib(pid, "VmRSS")["VmRSS"]
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    subprocess.run(["dd", f"if={source}", f"of={mountpoint / 'f'}", f"bs={bs}", "conv=fsync",
                    "status=none"], check=True)
    seconds = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    stats = json.loads(control.read(mountpoint, "stats"))
    if os.stat(mountpoint / "f").st_size != size:
        raise RuntimeError("the file written through the mount has the wrong size")
    return {
        "seconds": seconds,
        "mib_s": size / MiB / seconds,
        "daemon_pid": pid,
        "rss_before_mib": rss_before / 1024,
        "vm_hwm_mib": proc_status_kib(pid, "VmHWM")["VmHWM"] / 1024,
        "rss_sampled_peak_mib": sampler.peak_kib / 1024,
        "dirty_peak_mib": stats["dirty_peak"] / MiB,
        "bytes_up": stats["driver"]["bytes_up"],
        "requests": stats["driver"]["requests"],
    }


def bench_sdk(service: BlobServiceClient, container: str, source: Path, size: int,
              concurrency: int) -> dict:
    blob = service.get_blob_client(container, f"sdk-c{concurrency}")
    started = time.monotonic()
    with open(source, "rb") as data:
        blob.upload_blob(data, length=size, overwrite=True, max_concurrency=concurrency)
    seconds = time.monotonic() - started
    if blob.get_blob_properties().size != size:
        raise RuntimeError("the SDK's blob has the wrong size")
    blob.delete_blob()
    return {"seconds": seconds, "mib_s": size / MiB / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="bytes to write (default 1G)")
    parser.add_argument("-o", dest="options", default="", help="mount options, e.g. block_size=8M")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, the order of the three rotating (default 3); the "
                        "table shows medians")
    parser.add_argument("--bs", default="1M", help="dd block size of the mount's writes; "
                        "several (4k,32k,1M) make a sweep, each compared to the last")
    parser.add_argument("--json", help="also write the JSON to this file")
    parser.add_argument("--workdir", help="where the source file and mount go (default: a "
                        "temporary directory under /var/tmp)")
    args = parser.parse_args()
    size = parse_size(args.size)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="azregfs-bench-write-",
                                                    dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "source.bin"
    print(f"preparing {size / MiB:.0f} MiB of random data in {source} ...", file=sys.stderr)
    make_source(source, size)

    sizes = args.bs.split(",")
    mounts = ["mount"] + [f"mount bs={bs}" for bs in sizes[:-1]]  # "mount" is the last size
    results: dict = {"size_mib": size / MiB, "mount_options": args.options, "bs": sizes,
                     "rounds": {key: [] for key in (*mounts, "sdk_c4", "sdk_c1")}}
    rounds = results["rounds"]

    def measure(what: str) -> dict:
        # A fresh Azurite for every figure: its in-memory store slows down as it fills and
        # frees, which would otherwise favour whatever runs first.
        with Azurite() as azurite:
            service = BlobServiceClient.from_connection_string(azurite.connection_string,
                                                               max_single_put_size=64 * MiB)
            service.create_container("bench")
            bench_sdk(service, "bench", source, min(size, 64 * MiB), 4)  # warm-up, unmeasured
            if not what.startswith("mount"):
                return bench_sdk(service, "bench", source, size, int(what[-1]))
            mountpoint = workdir / "mnt"
            process = start_mount(azurite, "bench", mountpoint, args.options,
                                  workdir / "mnt.log")
            try:
                bs = what.partition("bs=")[2] or sizes[-1]
                return bench_mount(source, mountpoint, size, bs)
            finally:
                stop_mount(mountpoint, process)

    order = [*mounts, "sdk_c4", "sdk_c1"]
    for number in range(args.repeat):
        turn = number % len(order)
        for what in order[turn:] + order[:turn]:
            print(f"round {number + 1}: {what} ...", file=sys.stderr)
            rounds[what].append(measure(what))
    source.unlink()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)

    def median_row(rows: list[dict]) -> dict:
        row = dict(sorted(rows, key=lambda r: r["mib_s"])[len(rows) // 2])
        if "vm_hwm_mib" in row:
            row["vm_hwm_mib"] = max(r["vm_hwm_mib"] for r in rows)  # the worst round
        return row

    mount, c4, c1 = (median_row(rounds[key]) for key in ("mount", "sdk_c4", "sdk_c1"))
    results.update(mount=mount, sdk_c4=c4, sdk_c1=c1)
    results["ratio_mount_to_sdk_c4"] = mount["mib_s"] / c4["mib_s"]
    results["ratio_mount_to_sdk_c1"] = mount["mib_s"] / c1["mib_s"]
    print(f"\nsequential write of {size / MiB:.0f} MiB, median of {args.repeat} rounds "
          f"(mount options: {args.options or 'defaults'})")
    print(f"{'what':<34}{'seconds':>10}{'MiB/s':>10}{'vs SDK c=4':>12}")
    for label, row in ((f"mount: dd bs={sizes[-1]} conv=fsync", mount),
                       ("SDK upload_blob max_concurrency=4", c4),
                       ("SDK upload_blob max_concurrency=1", c1)):
        print(f"{label:<34}{row['seconds']:>10.1f}{row['mib_s']:>10.1f}"
              f"{row['mib_s'] / c4['mib_s']:>12.2f}")
    if len(sizes) > 1:
        print(f"write-size sweep (ratio to dd bs={sizes[-1]}):")
        for key in mounts[1:] + ["mount"]:
            row = median_row(rounds[key])
            results[f"median {key}"] = row
            print(f"  {key if key != 'mount' else 'mount bs=' + sizes[-1]:<24}"
                  f"{row['seconds']:>8.2f} s{row['mib_s']:>9.1f} MiB/s"
                  f"{row['mib_s'] / mount['mib_s']:>8.2f}")
    print("all rounds, MiB/s: " + "; ".join(
        f"{key} " + " ".join(f"{r['mib_s']:.0f}" for r in rows) for key, rows in rounds.items()))
    print(f"daemon peak RSS during the writes (VmHWM): {mount['vm_hwm_mib']:.0f} MiB "
          f"(before: {mount['rss_before_mib']:.0f} MiB); dirty peak "
          f"{mount['dirty_peak_mib']:.0f} MiB")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
