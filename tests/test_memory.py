"""The daemon's memory stays within its budgets (issue 9): RSS <= cache_size + dirty_budget +
150 MiB at every sample of a concurrent workload (a stream written and read back, writers
with mixed write sizes, sequential and random readers, small files held open together),
and after it, at rest. Small budgets make the bound tight: without an allocator that gives
freed memory back, this workload took the daemon to 592 MiB against a bound of 278 MiB.
bench/memory.py runs the same kind of workload at full size, with a 5 GiB stream.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from azregfs.fs import control

MiB = 1024 * 1024
CACHE_SIZE = 64 * MiB
DIRTY_BUDGET = 64 * MiB
SLACK = 150 * MiB
BOUND = CACHE_SIZE + DIRTY_BUDGET + SLACK
POOL = 8 * MiB
PIECE = MiB  # the largest write or read


class Pattern:
    """Byte i of a file with shift s is pool[(i + s) % POOL]: any range can be checked."""

    def __init__(self) -> None:
        data = random.Random(9).randbytes(POOL)
        self.pool = memoryview(data + data[:PIECE])

    def piece(self, shift: int, offset: int, length: int) -> memoryview:
        start = (offset + shift) % POOL
        return self.pool[start:start + length]

    def matches(self, shift: int, offset: int, data: bytes) -> bool:
        view = memoryview(data)
        return all(view[at:at + PIECE] == self.piece(shift, offset + at, len(view[at:at + PIECE]))
                   for at in range(0, len(view), PIECE))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def write(path: Path, pattern: Pattern, shift: int, size: int, sizes: tuple[int, ...],
          rng: random.Random) -> str:
    """size bytes, the write size changing every 4 MiB; fsync, close; their SHA-256."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            write_size, run_end = rng.choice(sizes), min(size, offset + 4 * MiB)
            while offset < run_end:
                data = pattern.piece(shift, offset, min(write_size, run_end - offset))
                offset += os.write(fd, data)
                digest.update(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_hash(path: Path, read_size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # reads reach the daemon
        while data := os.read(fd, read_size):
            digest.update(data)
    finally:
        os.close(fd)
    return digest.hexdigest()


def test_rss_stays_within_cache_and_dirty_budgets(mount_factory, container) -> None:
    mnt = mount_factory(container.container_name, "-o",
                        f"cache_size={CACHE_SIZE},dirty_budget={DIRTY_BUDGET}")
    pid = int(control.read(mnt.path, "pid"))
    pattern = Pattern()
    done, stop = threading.Event(), threading.Event()
    errors: list[str] = []
    samples: list[int] = []

    def sample() -> None:
        while not done.wait(0.05):
            samples.append(rss(pid))

    def worker(fn: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(f"{fn.__name__}: {exc!r}")
                stop.set()

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    shared = mnt.path / "shared"
    shared_size = 48 * MiB
    write(shared, pattern, 0, shared_size, (MiB,), random.Random(1))

    def stream() -> None:
        path = mnt.path / "stream"
        written = write(path, pattern, 77, 256 * MiB, (128 * 1024,), random.Random(2))
        assert read_hash(path, MiB) == written, "the stream read back differs"
        path.unlink()

    def writer(number: int) -> Callable[[], None]:
        def write_and_check() -> None:
            rng = random.Random(10 + number)
            while not stop.is_set():
                path = mnt.path / f"w{number}"
                size = rng.choice((32, 64)) * MiB
                written = write(path, pattern, rng.randrange(POOL), size,
                                (4096, 64 * 1024, MiB), rng)
                assert read_hash(path, rng.choice((128 * 1024, MiB))) == written, path
                path.unlink()
        return write_and_check

    def sequential_reader() -> None:
        while not stop.is_set():
            fd = os.open(shared, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                offset = 0
                while (data := os.read(fd, MiB)) and not stop.is_set():
                    assert pattern.matches(0, offset, data), f"shared at {offset}"
                    offset += len(data)
            finally:
                os.close(fd)

    def random_reader() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            fd = os.open(shared, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                for _ in range(100):
                    length = rng.choice((4096, 64 * 1024, 256 * 1024))
                    offset = rng.randrange(shared_size - length)
                    data = os.pread(fd, length, offset)
                    assert len(data) == length and pattern.matches(0, offset, data), offset
            finally:
                os.close(fd)

    def small_files() -> None:
        rng = random.Random(4)
        (mnt.path / "small").mkdir()
        while not stop.is_set():
            files = [(mnt.path / "small" / f"s{i}", rng.randrange(POOL),
                      rng.choice((4096, 256 * 1024, MiB, 3 * MiB))) for i in range(12)]
            for path, shift, size in files:
                write(path, pattern, shift, size, (MiB,), rng)
            fds = [os.open(path, os.O_RDONLY) for path, _, _ in files]  # all held at once
            try:
                for fd, (path, shift, size) in zip(fds, files, strict=True):
                    data = os.pread(fd, size + 1, 0)
                    assert len(data) == size and pattern.matches(shift, 0, data), path
            finally:
                for fd in fds:
                    os.close(fd)
            for path, _, _ in files:
                path.unlink()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    streamer = worker(stream)
    others = [worker(writer(0)), worker(writer(1)), worker(sequential_reader),
              worker(random_reader), worker(small_files)]
    streamer.join(timeout=120)
    stop.set()
    for thread in others:
        thread.join(timeout=60)
    busy = time.monotonic() - started
    peak = max(samples)

    # At rest: the daemon gives back what it freed within a few seconds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and rss(pid) > 120 * MiB:
        time.sleep(0.5)
    done.set()
    sampler.join()
    idle = rss(pid)
    stats = mnt.stats()

    print(f"peak RSS {peak / MiB:.0f} MiB, idle {idle / MiB:.0f} MiB with "
          f"{stats['cache_bytes'] / MiB:.0f} MiB cached; bound {BOUND / MiB:.0f} MiB; "
          f"{busy:.0f} s of work")
    assert not errors, errors
    assert busy > 3 and len(samples) > 50, "the workload did not run"
    assert peak <= BOUND, (f"peak RSS {peak / MiB:.0f} MiB > {BOUND / MiB:.0f} MiB "
                           f"(cache_size + dirty_budget + 150 MiB)")
    assert stats["dirty_bytes"] == 0
    assert idle <= stats["cache_bytes"] + SLACK, (
        f"idle RSS {idle / MiB:.0f} MiB with {stats['cache_bytes'] / MiB:.0f} MiB cached "
        "and nothing dirty")
