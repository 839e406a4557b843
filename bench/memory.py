#!/usr/bin/env python3
"""The daemon's memory against its budget: peak and idle RSS during concurrent streams.

    .venv/bin/python bench/memory.py [-o cache_size=256M,dirty_budget=256M] [--stream 5G]
                                     [--writers 4] [--idle 15] [--json out.json]

The bound checked (issue 9): RSS <= cache_size + dirty_budget + 150 MiB at every sample,
during the workload and after it (idle). Starts its own Azurite (in memory) and its own mount
(through the CLI, ``-o`` passed on), then runs, all at once:

- one stream of ``--stream`` bytes (5 GiB) written in 1 MiB writes, closed, read back in
  1 MiB reads, its SHA-256 compared with the one computed while writing, then deleted;
- ``--writers`` writers, each writing files of 64, 128, 256 or 512 MiB (seeded choice) with
  write sizes changing every 8 MiB (4 KiB to 4 MiB), fsync + close, reading each back
  (hash checked) and deleting it, until the stream is done;
- two sequential readers (128 KiB and 1 MiB reads) and two random readers (pread of 4 KiB
  to 1 MiB) of two 256 MiB files written before; each read is compared with the bytes
  written (the page cache is dropped for the file before each pass, so reads reach the
  daemon);
- a small-file worker: 24 files of 4 KiB to 6 MiB written, all opened at once (each
  handle holds its small file whole), read, checked, closed and deleted, in a loop.

Files are deleted as the workload goes: at most the stream, the two shared files and one
file per writer exist at a time. Azurite stores its blobs in files under the workdir
(``--azurite-in-memory`` for its memory store, which keeps deleted blobs until its GC runs,
every 10 minutes: a run writes well over 10 GiB).

The daemon's VmRSS (``/proc/PID/status``, PID from ``MNT/.azregfs/pid``) is sampled every
100 ms; ``MNT/.azregfs/stats`` every second. After the workload the mount stays idle
for ``--idle`` seconds; the idle RSS is the last sample of that wait. Run as root (it
mounts). The daemon is the checkout this file is in (its directory goes first on the
mount's PYTHONPATH), so ``python /other/checkout/bench/memory.py`` measures that one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from azure.storage.blob import BlobServiceClient  # noqa: E402
from common import proc_status_kib, start_mount, stop_mount  # noqa: E402

from azregfs.config import Config, apply, parse_mount_options, parse_size  # noqa: E402
from azregfs.demo.azurite import Azurite  # noqa: E402
from azregfs.fs import control  # noqa: E402

MiB = 1024 * 1024
SLACK = 150 * MiB  # what the daemon may hold beyond its two budgets (issue 9)
POOL_SIZE = 32 * MiB
MAX_IO = 4 * MiB
WRITE_SIZES = (4096, 32 * 1024, 128 * 1024, MiB, 4 * MiB)


# -- what the files hold: a rotating window on one random pool -------------------------------


class Pattern:
    """File contents derived from one random pool: byte i of a file with shift s is
    pool[(i + s) % POOL_SIZE], so any range of any file can be checked without keeping it."""

    def __init__(self, seed: int) -> None:
        data = random.Random(seed).randbytes(POOL_SIZE)
        self.pool = memoryview(data + data[:MAX_IO])

    def chunk(self, shift: int, offset: int, length: int) -> memoryview:
        assert length <= MAX_IO
        start = (offset + shift) % POOL_SIZE
        return self.pool[start:start + length]

    def matches(self, shift: int, offset: int, data: bytes) -> bool:
        """Is data what the file holds at offset?"""
        view = memoryview(data)
        for at in range(0, len(view), MAX_IO):
            piece = view[at:at + MAX_IO]
            if piece != self.chunk(shift, offset + at, len(piece)):
                return False
        return True


def write_file(path: Path, pattern: Pattern, shift: int, size: int, rng: random.Random,
               sizes: tuple[int, ...] = WRITE_SIZES, fsync: bool = True,
               stop: threading.Event | None = None) -> str:
    """Write size bytes, the write size changing every 8 MiB; the SHA-256 of the content."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            if stop is not None and stop.is_set():
                break
            write_size = rng.choice(sizes)
            run_end = min(size, offset + 8 * MiB)
            while offset < run_end:
                data = pattern.chunk(shift, offset, min(write_size, run_end - offset))
                written = os.write(fd, data)
                digest.update(data[:written])
                offset += written
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def drop_page_cache(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_hash(path: Path, read_size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        while data := os.read(fd, read_size):
            digest.update(data)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_and_compare(path: Path, pattern: Pattern, shift: int, size: int, read_size: int,
                     stop: threading.Event) -> int:
    """A sequential pass; every read compared with the pattern. Returns bytes read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        offset = 0
        while offset < size and not stop.is_set():
            data = os.read(fd, read_size)
            if not data:
                raise AssertionError(f"{path}: short read at {offset} of {size}")
            if not pattern.matches(shift, offset, data):
                raise AssertionError(f"{path}: wrong bytes at {offset}")
            offset += len(data)
        return offset
    finally:
        os.close(fd)


# -- sampling --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Samples:
    """VmRSS every interval (and the phase it fell in), in a thread of its own."""

    pid: int
    interval: float = 0.1
    rows: list[tuple[float, str, int, int]] = field(default_factory=list)  # t, phase, rss, anon
    phase: str = "start"
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                values = proc_status_kib(self.pid, "VmRSS", "RssAnon")
            except OSError:
                return
            self.rows.append((time.monotonic() - self.started, self.phase,
                              values.get("VmRSS", 0) * 1024, values.get("RssAnon", 0) * 1024))
            self.done.wait(self.interval)

    def peak(self, phase: str | None = None) -> int:
        return max((r[2] for r in self.rows if phase is None or r[1] == phase), default=0)


@dataclass
class StatsSamples:
    """The stats control file every second, with the RSS of that moment: what the
    budgets account for (cached blocks, dirty data) and what they do not."""

    mountpoint: Path
    pid: int
    rows: list[dict] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                row = json.loads(control.read(self.mountpoint, "stats"))
                row["rss"] = proc_status_kib(self.pid, "VmRSS")["VmRSS"] * 1024
            except (OSError, KeyError):
                return
            row["unaccounted"] = row["rss"] - row["cache_bytes"] - row["dirty_bytes"]
            self.rows.append(row)


# -- the workload ----------------------------------------------------------------------------


@dataclass
class Workload:
    mountpoint: Path
    pattern: Pattern
    stream_size: int
    writers: int
    sizes_mib: tuple[int, ...] = (64, 128, 256, 512)
    shared_size: int = 256 * MiB
    readers: bool = True
    small_files: int = 24  # 0: no small-file worker
    seed: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)  # bytes by worker kind
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, amount: int) -> None:
        with self.lock:
            self.moved[what] = self.moved.get(what, 0) + amount

    def guarded(self, name: str, fn, *args) -> threading.Thread:  # noqa: ANN001
        def body() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported, and the run stops
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.stop.set()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    def prepare(self) -> None:
        rng = random.Random(self.seed)
        for number in range(2):
            write_file(self.mountpoint / f"shared-{number}", self.pattern, number * 7919,
                       self.shared_size, rng, sizes=(MiB,))
            self.count("shared write", self.shared_size)

    def stream(self) -> None:
        path = self.mountpoint / "stream"
        rng = random.Random(self.seed + 1)
        written = write_file(path, self.pattern, 12345, self.stream_size, rng, sizes=(MiB,),
                             stop=self.stop)
        self.count("stream write", self.stream_size)
        if self.stop.is_set():
            return
        if read_hash(path, MiB) != written:
            raise AssertionError("the stream read back differs from what was written")
        self.count("stream read", self.stream_size)
        path.unlink()

    def writer(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        round_ = 0
        while not self.stop.is_set():
            path = self.mountpoint / f"w{number}-{round_}"
            size = rng.choice(self.sizes_mib) * MiB
            written = write_file(path, self.pattern, rng.randrange(POOL_SIZE), size, rng,
                                 stop=self.stop)
            self.count("writers write", size)
            if not self.stop.is_set():
                if read_hash(path, rng.choice((128 * 1024, MiB))) != written:
                    raise AssertionError(f"{path} read back differs from what was written")
                self.count("writers read", size)
            path.unlink()
            round_ += 1

    def sequential_reader(self, number: int, read_size: int) -> None:
        while not self.stop.is_set():
            shift = number * 7919
            got = read_and_compare(self.mountpoint / f"shared-{number}", self.pattern, shift,
                                   self.shared_size, read_size, self.stop)
            self.count("sequential read", got)

    def random_reader(self, number: int) -> None:
        rng = random.Random(self.seed * 77 + number)
        path = self.mountpoint / f"shared-{number}"
        shift = number * 7919
        while not self.stop.is_set():
            fd = os.open(path, os.O_RDONLY)
            try:
                drop_page_cache(fd)
                for _ in range(200):
                    if self.stop.is_set():
                        break
                    length = rng.choice((4096, 16384, 128 * 1024, MiB))
                    offset = rng.randrange(self.shared_size - length)
                    data = os.pread(fd, length, offset)
                    if len(data) != length or not self.pattern.matches(shift, offset, data):
                        raise AssertionError(f"{path}: wrong bytes at {offset}+{length}")
                    self.count("random read", length)
            finally:
                os.close(fd)

    def small_files_worker(self) -> None:
        rng = random.Random(self.seed * 31)
        folder = self.mountpoint / "small"
        folder.mkdir(exist_ok=True)
        round_ = 0
        while not self.stop.is_set():
            files = []
            for index in range(self.small_files):
                size = rng.choice((4096, 65536, MiB, 3 * MiB, 6 * MiB))
                shift = rng.randrange(POOL_SIZE)
                path = folder / f"s{round_}-{index}"
                write_file(path, self.pattern, shift, size, rng, sizes=(4 * MiB,), fsync=False)
                files.append((path, shift, size))
                self.count("small write", size)
            fds = [os.open(path, os.O_RDONLY) for path, _, _ in files]  # all open at once
            try:
                for fd, (path, shift, size) in zip(fds, files, strict=True):
                    data = os.pread(fd, size + 1, 0)
                    if len(data) != size or not self.pattern.matches(shift, 0, data):
                        raise AssertionError(f"{path}: wrong content")
                    self.count("small read", size)
            finally:
                for fd in fds:
                    os.close(fd)
            for path, _, _ in files:
                path.unlink()
            round_ += 1

    def run(self, samples: Samples) -> float:
        """The concurrent phase; returns its seconds."""
        started = time.monotonic()
        samples.phase = "concurrent"
        stream = self.guarded("stream", self.stream)
        others = [self.guarded(f"writer{n}", self.writer, n) for n in range(self.writers)]
        if self.readers:
            others += [self.guarded("seq0", self.sequential_reader, 0, 128 * 1024),
                       self.guarded("seq1", self.sequential_reader, 1, MiB),
                       self.guarded("rand0", self.random_reader, 0),
                       self.guarded("rand1", self.random_reader, 1)]
        if self.small_files:
            others.append(self.guarded("small", self.small_files_worker))
        stream.join()
        self.stop.set()
        for thread in others:
            thread.join()
        return time.monotonic() - started

    def clean(self) -> None:
        for number in range(2):
            (self.mountpoint / f"shared-{number}").unlink(missing_ok=True)
        for path in self.mountpoint.iterdir():
            if path.is_file():
                path.unlink()
        shutil.rmtree(self.mountpoint / "small", ignore_errors=True)


# -- the mount -------------------------------------------------------------------------------


def budgets(options: str) -> tuple[int, int]:
    cfg = Config()
    values, _ = parse_mount_options(options) if options else ({}, set())
    apply(cfg, {k: v for k, v in values.items() if k in ("cache_size", "dirty_budget")}, "-o")
    return cfg.cache_size, cfg.dirty_budget


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    cache_size, dirty_budget = budgets(args.options)
    bound = cache_size + dirty_budget + SLACK
    pattern = Pattern(args.seed)
    # On disk by default: in memory, Azurite keeps even deleted blobs until its GC, every
    # 10 minutes, and a run writes well over 10 GiB.
    store = None if args.azurite_in_memory else str(workdir / "azurite")
    with Azurite(persist_dir=store) as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        service.create_container("memory")
        mountpoint = workdir / "mnt"
        process = start_mount(azurite, "memory", mountpoint, args.options, workdir / "mnt.log",
                              args.log_level)
        try:
            pid = int(control.read(mountpoint, "pid"))
            samples = Samples(pid)
            stats = StatsSamples(mountpoint, pid)
            azurite_rss = Samples(azurite.process.pid, interval=1.0)  # type: ignore[union-attr]
            threads = [threading.Thread(target=s.run, daemon=True)
                       for s in (samples, stats, azurite_rss)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            rss_at_start = samples.rows[-1][2]
            workload = Workload(mountpoint, pattern, parse_size(args.stream), args.writers,
                                readers=not args.no_readers,
                                small_files=0 if args.no_small_files else 24, seed=args.seed)
            samples.phase = "prepare"
            print("writing the shared files ...", file=sys.stderr)
            workload.prepare()
            print("concurrent phase ...", file=sys.stderr)
            cpu_before = cpu_seconds(pid)
            moved_before = sum(workload.moved.values())
            seconds = workload.run(samples)
            cpu = cpu_seconds(pid) - cpu_before
            moved = sum(workload.moved.values()) - moved_before
            samples.phase = "cleanup"
            workload.clean()
            samples.phase = "idle"
            print(f"idle for {args.idle:.0f} s ...", file=sys.stderr)
            idle_started = len(samples.rows)
            time.sleep(args.idle)
            final = json.loads(control.read(mountpoint, "stats"))
            for sampler in (samples, stats, azurite_rss):
                sampler.done.set()
            for thread in threads:
                thread.join()
        finally:
            stop_mount(mountpoint, process)
    idle_rows = samples.rows[idle_started:]
    peak_row = max(samples.rows, key=lambda r: r[2])
    peak_cache = max((row["cache_bytes"] for row in stats.rows), default=0)
    unaccounted = max(stats.rows, key=lambda row: row["unaccounted"], default=None)
    result = {
        "options": args.options or "defaults",
        "cache_size": cache_size,
        "dirty_budget": dirty_budget,
        "bound": bound,
        "stream_bytes": parse_size(args.stream),
        "writers": args.writers,
        "concurrent_seconds": round(seconds, 1),
        "concurrent_mib": round(moved / MiB),
        # The daemon's CPU per MiB written or read in the concurrent phase: what copies,
        # page faults and trims cost, whatever the machine's other load did to the timing.
        "daemon_cpu_seconds": round(cpu, 1),
        "daemon_cpu_ms_per_mib": round(cpu * 1000 / (moved / MiB), 2) if moved else 0.0,
        "moved_mib": {k: round(v / MiB) for k, v in workload.moved.items()},
        "errors": workload.errors,
        "rss_at_start": rss_at_start,
        "peak_rss": peak_row[2],
        "peak_rss_anon": peak_row[3],
        "peak_at_seconds": round(peak_row[0], 1),
        "peak_phase": peak_row[1],
        "peak_by_phase": {phase: samples.peak(phase)
                          for phase in dict.fromkeys(r[1] for r in samples.rows)},
        "idle_rss": idle_rows[-1][2] if idle_rows else 0,
        "idle_rss_first": idle_rows[0][2] if idle_rows else 0,
        "idle_rss_min": min((r[2] for r in idle_rows), default=0),
        "cache_bytes_peak": peak_cache,
        # The most RSS held beyond cached blocks and dirty data (at a once-a-second sample).
        "unaccounted_peak": unaccounted["unaccounted"] if unaccounted else 0,
        "unaccounted_peak_at": ({k: unaccounted[k] for k in ("rss", "cache_bytes", "dirty_bytes")}
                                if unaccounted else {}),
        "cache_bytes_idle": final["cache_bytes"],
        "dirty_peak": final["dirty_peak"],
        "dirty_bytes_idle": final["dirty_bytes"],
        "azurite_peak_rss": azurite_rss.peak(),
        "samples": len(samples.rows),
    }
    result["peak_ok"] = result["peak_rss"] <= bound
    result["idle_ok"] = result["idle_rss"] <= bound
    if args.trace:
        result["trace"] = [(round(t, 1), phase, rss // MiB) for t, phase, rss, _ in samples.rows]
        result["stats_trace"] = [(row["rss"] // MiB, row["cache_bytes"] // MiB,
                                  row["dirty_bytes"] // MiB) for row in stats.rows]
    return result


def report(result: dict) -> None:
    def mib(value: int) -> str:
        return f"{value / MiB:,.0f} MiB"

    verdict = {True: "ok", False: "MISSED"}
    print(f"\nmemory budget, mount options: {result['options']}; "
          f"{result['stream_bytes'] / MiB / 1024:.1f} GiB stream, {result['writers']} writers, "
          f"{result['concurrent_seconds']:.0f} s concurrent")
    print("  moved (MiB): " + ", ".join(f"{k} {v:,}" for k, v in result["moved_mib"].items()))
    print(f"  daemon CPU            {result['daemon_cpu_seconds']:>6.1f} s    "
          f"({result['daemon_cpu_ms_per_mib']:.2f} ms per MiB moved, "
          f"{result['concurrent_mib']:,} MiB in {result['concurrent_seconds']:.0f} s)")
    print(f"  RSS at start          {mib(result['rss_at_start']):>10}")
    print(f"  peak RSS              {mib(result['peak_rss']):>10}  (anon "
          f"{mib(result['peak_rss_anon'])}, {result['peak_phase']} phase, "
          f"t={result['peak_at_seconds']} s)  {verdict[result['peak_ok']]}")
    print(f"  idle RSS              {mib(result['idle_rss']):>10}  (first idle sample "
          f"{mib(result['idle_rss_first'])})  {verdict[result['idle_ok']]}")
    print(f"  cache bytes peak/idle {mib(result['cache_bytes_peak']):>10} / "
          f"{mib(result['cache_bytes_idle'])}")
    print(f"  dirty peak            {mib(result['dirty_peak']):>10}")
    print(f"  unaccounted peak      {mib(result['unaccounted_peak']):>10}  (RSS beyond cached "
          "and dirty bytes, sampled once a second)")
    print(f"  bound                 {mib(result['bound']):>10}  = cache_size "
          f"{mib(result['cache_size'])} + dirty_budget {mib(result['dirty_budget'])} + 150 MiB")
    print("  peak by phase: " + ", ".join(f"{k} {mib(v)}"
                                          for k, v in result["peak_by_phase"].items()))
    print(f"  Azurite peak RSS {mib(result['azurite_peak_rss'])}")
    for error in result["errors"]:
        print(f"  ERROR {error}")
    ok = result["peak_ok"] and result["idle_ok"] and not result["errors"]
    print(f"budget: {verdict[ok]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", dest="options", default="",
                        help="mount options, e.g. cache_size=256M,dirty_budget=256M")
    parser.add_argument("--stream", default="5G", help="size of the one long stream (5G)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (4)")
    parser.add_argument("--idle", type=float, default=15.0,
                        help="seconds of idle after the workload (15)")
    parser.add_argument("--no-readers", action="store_true",
                        help="leave out the readers of the shared files (to tell sides apart)")
    parser.add_argument("--no-small-files", action="store_true",
                        help="leave out the small-file worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--azurite-in-memory", action="store_true",
                        help="Azurite's in-memory store instead of files in the workdir")
    parser.add_argument("--trace", action="store_true", help="keep every RSS sample in the JSON")
    parser.add_argument("--log-level", default="INFO", help="the daemon's (its log is mnt.log "
                        "in the workdir)")
    parser.add_argument("--json", help="also write the JSON to this file")
    parser.add_argument("--workdir", help="where the mount and its log go (default: a "
                        "temporary directory under /var/tmp, removed afterwards)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="azregfs-bench-memory-",
                                                    dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = measure(args, workdir)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = result["peak_ok"] and result["idle_ok"] and not result["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
