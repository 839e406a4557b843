#!/usr/bin/env python3
"""Benchmark azregfs against the raw azure-storage-blob SDK on the same Azurite, in one run.

Run by hand, as root (it mounts and drops the page cache):

    .venv/bin/python bench/bench.py                 # the full run (1 GiB; several minutes)
    .venv/bin/python bench/bench.py --write-size 128M --random-size 64M --tree-files 1000

It starts its own Azurite and its own mount (through the CLI, as an operator would), and
prints a table of each figure for the mount next to the SDK's, with the ratio and the target,
then the same as JSON. Azurite is CPU-bound, so absolute figures say little: the ratios do.
The SDK side runs single calls with the same concurrency the mount uses for big transfers
(``--sdk-concurrency``), one request at a time for small ones (as one process would).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.storage.blob import BlobServiceClient, ContainerClient  # noqa: E402

from azregfs.config import parse_size  # noqa: E402
from azregfs.demo.azurite import Azurite  # noqa: E402
from azregfs.fs import control  # noqa: E402

MiB = 1024 * 1024
CHUNK = MiB  # application read/write size


@dataclass
class Row:
    name: str
    mount: float  # the figure for the mount
    unit: str
    sdk: float | None = None  # the same for the SDK, when there is one
    target: str = ""
    ratio: float | None = None
    ok: bool | None = None
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.name}: mount {row.mount:.2f} {row.unit}"
              + (f", SDK {row.sdk:.2f} {row.unit}" if row.sdk is not None else "")
              + (f" (ratio {row.ratio:.2f}, target {row.target})" if row.ratio is not None
                 else ""), flush=True)
        return row


def rate(size: int, seconds: float) -> float:
    return size / MiB / seconds


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def wait_visible(path: Path, timeout: float = 5.0) -> None:
    """A blob written through the SDK shows on the mount within dir_timeout (1 s by
    default: another client's change, by the consistency contract), not at once."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not visible after {timeout} s")
        time.sleep(0.05)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as exc:
        print(f"  (cannot drop the page cache: {exc.strerror}; cold figures are warm)")
        return False


# -- the mount -----------------------------------------------------------------------------


class Mount:
    """One azregfs daemon started through the CLI, in the foreground, in a subprocess."""

    def __init__(self, azurite: Azurite, container: str, path: Path, options: str,
                 log_path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
        args = [sys.executable, "-m", "azregfs", "mount", "--foreground", "--log-level", "INFO"]
        if options:
            args += ["-o", options]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([*args, container, str(path)], env=env, cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"mount failed; see {log_path}")
            time.sleep(0.05)
        self.pid = int(control.read(path, "pid"))

    def stats(self) -> dict:
        return json.loads(control.read(self.path, "stats"))

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def unmount(self) -> int:
        peak = self.peak_rss()
        subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        try:
            self.process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            subprocess.run(["fusermount3", "-uz", str(self.path)], check=False)
        return peak


# -- workloads -----------------------------------------------------------------------------


def payload(size: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes (a 64 MiB random pattern, each MiB tagged)."""
    rng = random.Random(seed)
    pattern = rng.randbytes(min(size, 64 * MiB) + MiB)
    parts = []
    for offset in range(0, size, MiB):
        shift = (offset // MiB * 4099) % MiB
        parts.append(pattern[shift:shift + min(MiB, size - offset)])
    return b"".join(parts)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as handle:
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            handle.write(view[offset:offset + CHUNK])
        os.fsync(handle.fileno())


def read_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.digest()


def read_size(path: Path) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            total += count
    return total


def random_offsets(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]


def small_paths(count: int) -> list[str]:
    return [f"d{i % 10:02d}/e{i // 10 % 10:02d}/f{i:05d}" for i in range(count)]


def tree_names(count: int) -> list[str]:
    return [f"tree/a{i % 50:02d}/b{i // 50 % 10}/file{i:06d}" for i in range(count)]


def parallel(fn: Callable, items: list, workers: int = 16) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, items):
            pass


# -- the run -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-size", default="1G", help="sequential write/read size")
    parser.add_argument("--random-size", default="256M", help="file for random reads")
    parser.add_argument("--random-reads", type=int, default=2000)
    parser.add_argument("--small-files", type=int, default=1000)
    parser.add_argument("--tree-files", type=int, default=5000)
    parser.add_argument("--rename-size", default="256M")
    parser.add_argument("--options", default="", help="extra -o options for the mount")
    parser.add_argument("--sdk-concurrency", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of write and cold read (best of, mount and SDK alternating)")
    parser.add_argument("--workdir", help="where to mount (default: a temporary directory)")
    parser.add_argument("--json", dest="json_path", help="also write the JSON here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.py: run as root (it drops the page cache)", file=sys.stderr)

    write_size = parse_size(args.write_size)
    random_size = parse_size(args.random_size)
    rename_size = parse_size(args.rename_size)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="azregfs-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = Results()
    peaks: list[int] = []

    with Azurite() as azurite:
        service = BlobServiceClient.from_connection_string(
            azurite.connection_string, max_single_put_size=64 * MiB,
            max_block_size=8 * MiB, max_single_get_size=32 * MiB, max_chunk_get_size=8 * MiB)
        name = "bench"
        container = service.get_container_client(name)
        container.create_container()

        def mount() -> Mount:
            return Mount(azurite, name, workdir / "mnt", args.options, workdir / "mount.log")

        with mounted(mount, peaks) as holder:
            cfg_note = holder.mount.stats()
            results.extra["stats_at_start"] = cfg_note
            run_sequential(results, container, holder, mount, peaks, write_size, args)
            run_random(results, container, holder, random_size, args)
            run_small(results, container, holder, args.small_files)
            run_tree(results, container, holder, mount, peaks, args.tree_files)
            run_rename(results, container, holder, rename_size, random_size)
            results.extra["stats_at_end"] = holder.mount.stats()
        results.extra["peak_rss_mib_per_mount"] = [round(p / MiB) for p in peaks]
        cache_budget, dirty_budget = budgets(args.options)
        peak = max(peaks)
        limit = cache_budget + dirty_budget + 150 * MiB
        results.add(Row("daemon peak RSS (VmHWM)", peak / MiB, "MiB", target=(
            f"<= cache {cache_budget // MiB} + dirty {dirty_budget // MiB} + 150 MiB"),
            ok=peak <= limit))
    print_table(results)
    document = {
        "rows": [row.__dict__ for row in results.rows],
        "extra": results.extra,
        "parameters": vars(args),
    }
    text = json.dumps(document, indent=1, default=str)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


class Holder:
    mount: Mount


@contextmanager
def mounted(make: Callable[[], Mount], peaks: list[int]) -> Iterator[Holder]:
    holder = Holder()
    holder.mount = make()
    try:
        yield holder
    finally:
        peaks.append(holder.mount.unmount())


def remount(holder: Holder, make: Callable[[], Mount], peaks: list[int]) -> None:
    peaks.append(holder.mount.unmount())
    holder.mount = make()


def budgets(options: str) -> tuple[int, int]:
    from azregfs.config import Config

    cfg = Config()
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key in ("cache_size", "dirty_budget"):
            setattr(cfg, key, parse_size(value))
    return cfg.cache_size, cfg.dirty_budget


def ratio_row(results: Results, name: str, mount: float, sdk: float, unit: str,
              minimum: float, note: str = "") -> None:
    ratio = mount / sdk if sdk else 0.0
    results.add(Row(name, mount, unit, sdk, f">= {minimum}x SDK", ratio, ratio >= minimum, note))


def run_sequential(results: Results, container: ContainerClient, holder: Holder,
                   make: Callable[[], Mount], peaks: list[int], size: int,
                   args: argparse.Namespace) -> None:
    """Write, cold read, warm re-read. With --repeat, mount and SDK alternate and each
    keeps its best time (other load on the machine only ever slows a run down)."""
    print(f"sequential {size // MiB} MiB", flush=True)
    data = payload(size, seed=1)
    expected = hashlib.sha256(data).digest()
    os.makedirs(holder.mount.path / "seq", exist_ok=True)
    path = holder.mount.path / "seq" / "big.bin"
    blob = container.get_blob_client("sdk/big.bin")
    mount_write = sdk_write = float("inf")
    for _ in range(args.repeat):
        mount_write = min(mount_write, timed(lambda: write_file(path, data)))
        sdk_write = min(sdk_write, timed(lambda: blob.upload_blob(
            data, overwrite=True, max_concurrency=args.sdk_concurrency)))
    ratio_row(results, f"sequential write {size // MiB} MiB (+fsync)", rate(size, mount_write),
              rate(size, sdk_write), "MiB/s", 0.8)
    data = b""  # 1 GiB less to hold during the reads

    digest: list = []
    source = container.get_blob_client("seq/big.bin")

    def sdk_read() -> None:
        content = source.download_blob(max_concurrency=args.sdk_concurrency).readall()
        digest.append(hashlib.sha256(content).digest())

    cold = sdk_cold = float("inf")
    for _ in range(args.repeat):
        drop_caches()
        sdk_cold = min(sdk_cold, timed(sdk_read))
        assert digest[-1] == expected, "SDK read: wrong content"
        remount(holder, make, peaks)
        drop_caches()
        cold = min(cold, timed(lambda: digest.append(read_digest(holder.mount.path / "seq"
                                                                 / "big.bin"))))
        assert digest[-1] == expected, "cold read: wrong content"
    ratio_row(results, f"cold sequential read {size // MiB} MiB (+sha256)", rate(size, cold),
              rate(size, sdk_cold), "MiB/s", 0.8)
    results.extra["stats_after_cold_read"] = holder.mount.stats()
    # No hash here: at page-cache speed SHA-256 would be all that is measured.
    warm = timed(lambda: digest.append(read_size(holder.mount.path / "seq" / "big.bin")))
    assert digest[-1] == size, "warm read: wrong size"
    ratio = rate(size, warm) / rate(size, cold)
    results.add(Row("warm re-read", rate(size, warm), "MiB/s", None, ">= 5x cold read", ratio,
                    ratio >= 5, "ratio is warm/cold"))


def run_random(results: Results, container: ContainerClient, holder: Holder, size: int,
               args: argparse.Namespace) -> None:
    count = args.random_reads
    print(f"random reads: {count} x 4 KiB in {size // MiB} MiB", flush=True)
    data = payload(size, seed=2)
    container.get_blob_client("rand.bin").upload_blob(data, overwrite=True, max_concurrency=4)
    offsets = random_offsets(size, count, seed=3)
    wait_visible(holder.mount.path / "rand.bin")
    drop_caches()
    fd = os.open(holder.mount.path / "rand.bin", os.O_RDONLY)
    wrong = 0
    try:
        start = time.perf_counter()
        for offset in offsets:
            if os.pread(fd, 4096, offset) != data[offset:offset + 4096]:
                wrong += 1
        mount_time = time.perf_counter() - start
    finally:
        os.close(fd)
    blob = container.get_blob_client("rand.bin")
    start = time.perf_counter()
    for offset in offsets:
        if blob.download_blob(offset=offset, length=4096).readall() != data[offset:offset + 4096]:
            wrong += 1
    sdk_time = time.perf_counter() - start
    assert wrong == 0, f"random reads: {wrong} wrong"
    ratio_row(results, "random 4 KiB reads", count / mount_time, count / sdk_time, "reads/s", 0.5)


def run_small(results: Results, container: ContainerClient, holder: Holder, count: int) -> None:
    print(f"{count} creates of 4 KiB files", flush=True)
    data = os.urandom(4096)
    paths = small_paths(count)
    root = holder.mount.path / "small"

    def create_all() -> None:
        for path in paths:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)

    mount_time = timed(create_all)

    def upload_all() -> None:
        for path in paths:
            container.get_blob_client(f"sdk-small/{path}").upload_blob(data, overwrite=True)

    sdk_time = timed(upload_all)
    ratio_row(results, "creates of 4 KiB files", count / mount_time, count / sdk_time,
              "files/s", 0.5, "mount includes mkdir -p of 100 nested dirs")


def run_tree(results: Results, container: ContainerClient, holder: Holder,
             make: Callable[[], Mount], peaks: list[int], count: int) -> None:
    print(f"find + stat over {count} files", flush=True)
    names = tree_names(count)
    parallel(lambda n: container.get_blob_client(n).upload_blob(b"x" * 100, overwrite=True),
             names)
    remount(holder, make, peaks)
    drop_caches()

    def find() -> None:
        out = subprocess.run(["find", str(holder.mount.path / "tree"), "-type", "f",
                              "-printf", "%s %T@\n"], check=True, capture_output=True)
        found = out.stdout.count(b"\n")
        assert found == count, f"find saw {found} files, not {count}"

    cold = timed(find)
    warm = timed(find)
    sdk = timed(lambda: sum(1 for _ in container.list_blobs(name_starts_with="tree/")))
    results.add(Row(f"find+stat {count} files, cold", cold, "s", sdk, "", cold / sdk,
                    note="SDK: list_blobs of the prefix; ratio is time (lower is better)"))
    results.add(Row(f"find+stat {count} files, warm", warm, "s", sdk, "", warm / sdk))


def run_rename(results: Results, container: ContainerClient, holder: Holder, size: int,
               random_size: int) -> None:
    print(f"rename of a {size // MiB} MiB file", flush=True)
    source = "rand.bin"
    if size != random_size:
        source = "rename-src.bin"
        container.get_blob_client(source).upload_blob(payload(size, seed=4), overwrite=True,
                                                      max_concurrency=4)
        wait_visible(holder.mount.path / source)
    os.makedirs(holder.mount.path / "moved", exist_ok=True)
    mount_time = timed(lambda: os.rename(holder.mount.path / source,
                                         holder.mount.path / "moved" / "renamed.bin"))
    assert os.path.getsize(holder.mount.path / "moved" / "renamed.bin") == size
    source_blob = container.get_blob_client("moved/renamed.bin")
    target = container.get_blob_client("sdk-renamed.bin")

    def sdk_move() -> None:
        target.start_copy_from_url(source_blob.url)
        source_blob.delete_blob()

    sdk_time = timed(sdk_move)
    results.add(Row(f"rename {size // MiB} MiB file", mount_time, "s", sdk_time, "",
                    mount_time / sdk_time, note="SDK: copy + delete; ratio is time"))


def print_table(results: Results) -> None:
    header = f"{'measure':44} {'mount':>12} {'SDK':>12} {'unit':>8} {'ratio':>7}  target"
    print()
    print(header)
    print("-" * len(header))
    for row in results.rows:
        sdk = f"{row.sdk:12.2f}" if row.sdk is not None else f"{'':12}"
        ratio = f"{row.ratio:7.2f}" if row.ratio is not None else f"{'':7}"
        verdict = "" if row.ok is None else (" ok" if row.ok else " MISSED")
        print(f"{row.name:44} {row.mount:12.2f} {sdk} {row.unit:>8} {ratio}  "
              f"{row.target}{verdict}")
    print()


if __name__ == "__main__":
    sys.exit(main())
