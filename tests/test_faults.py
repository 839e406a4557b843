"""Faults between the daemon and Azure (issue 9): every test mounts through the fault proxy
(azregfs/faultproxy.py) in front of the session's Azurite and drives a real FUSE mount.

- 5% random faults on every request type (503, 500, 408, resets before and after the
  request reached Azure, bodies cut short, stalls: past the request timeout for the 1 GiB
  file): a 1 GiB file, file operations from 8 threads, and a registry push, pull and chunked
  upload come through whole; no call returns short or wrong bytes; a read whose connection
  is lost is retried for the same range of the same version (If-Match), so it never mixes
  two versions.
- A 30 s total outage (black hole, then refused connections): every call returns, EIO,
  within timeout x (retries + 1) plus backoff; the FUSE queue drains; the dirty data of an
  open file survives and its fsync succeeds afterwards; the mount serves again.
- Sustained throttling: Retry-After is honoured, requests in flight are halved and grow back
  (AIMD), and a push under 50% throttling completes.
- SIGKILL of the daemon during a push, then ``azregfs mount`` on the dead mountpoint.
  (test_registry.py kills the daemon in a push and remounts elsewhere; test_service.py
  restarts the systemd unit over the dead mountpoint: not repeated here.)
- A failure that reaches an application is one ERROR line with the operation, the blob, the
  HTTP status, the service error code and the x-ms-request-id.

Timing checks are generous upper bounds (no call may hang) or one-sided lower bounds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob import ContainerClient
from conftest import Mount, azregfs_command, blob_names, mount_through, need
from registry_util import REGISTRY_PREFIX, chunked_upload, get_blob, torn_blobs, upload_files

from azregfs.demo.azurite import Azurite
from azregfs.demo.oci import Image, Registry, build_image, read_image, skopeo_copy, verify_layout
from azregfs.fs import control
from azregfs.storage.throttle import MAX_BACKOFF, THROTTLE_RETRIES, RetryAfterRetry
from testkit import faultproxy
from testkit.faultproxy import FaultProxy, Rule

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 8 * MiB
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
FAST = "retries=3,timeout=5"  # faults cost a 5 s timeout at most, not the default 30 s


def random_faults(rate: float, stall: float = 8.0) -> list[Rule]:
    """Seven kinds of fault on every operation, `rate` of all requests in total (the proxy
    checks rules in order and the first that fires decides: each gets the same share)."""
    each = 1 - (1 - rate) ** (1 / 7)
    return [
        Rule("error", p=each, status=503),  # ServerBusy, Retry-After: 1
        Rule("error", p=each, status=500),  # InternalError
        Rule("error", p=each, status=408),  # RequestTimeout
        Rule("reset_request", p=each),  # Azure never saw it
        Rule("reset_response", p=each),  # Azure did it, the answer is lost (mid-body too)
        Rule("truncate", p=each),  # a body cut short, then FIN
        Rule("stall", p=each, seconds=stall),  # no answer: the client's timeout ends it
    ]


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with FaultProxy(azurite.port, seed=9) as server:
        yield server


@dataclass
class Seen:
    at: float
    op: str
    path: str
    range: str | None
    if_match: str | None


class Recorder:
    """Every request the proxy classifies, with the headers a resumed read is judged by."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def wrap(self, classify: Callable[[str, str, Any], str]) -> Callable[[str, str, Any], str]:
        def recording(method: str, target: str, headers: Any) -> str:
            op = classify(method, target, headers)
            with self.lock:
                self.seen.append(Seen(time.monotonic(), op, target.split("?", 1)[0],
                                      headers.get("x-ms-range") or headers.get("Range"),
                                      headers.get("If-Match")))
            return op
        return recording

    def ops(self, op: str, blob: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.op == op and s.path.endswith("/" + blob)]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    found = Recorder()
    monkeypatch.setattr(faultproxy, "classify", found.wrap(faultproxy.classify))
    return found


def chunk(index: int) -> bytes:
    """Block `index` of the big file: random, different for every block, reproducible."""
    return random.Random(index).randbytes(CHUNK)


def error_lines(mount: Mount, since: int = 0) -> list[str]:
    return [line for line in mount.log().splitlines()[since:] if " ERROR " in line]


def log_length(mount: Mount) -> int:
    return len(mount.log().splitlines())


def range_of(header: str | None) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
    assert match, header
    return int(match.group(1)), int(match.group(2))


def timed(call: Callable[[], Any]) -> tuple[float, int | None]:
    """(seconds, errno or None) of one call."""
    started = time.monotonic()
    try:
        call()
        code = None
    except OSError as exc:
        code = exc.errno
    return time.monotonic() - started, code


def request_bound(retries: int, timeout: float) -> float:
    """The longest one call may take against a storage that never answers: every attempt
    times out, plus the most the retry policy sleeps between them without Retry-After
    (the driver's RetryAfterRetry: initial 1 s, base 2, jitter 3 s)."""
    backoff = sum(min(1 + 2 ** count + 3, MAX_BACKOFF) for count in range(1, retries + 1))
    return timeout * (retries + 1) + backoff


# -- 5% random faults -----------------------------------------------------------------------

def test_one_gib_written_and_read_back_under_5_percent_faults(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient) -> None:
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST)
    # Random faults, and one sure fault of each direction (so the checks below never
    # depend on the dice): a block's answer lost, a read cut short.
    proxy.set_rules([Rule("reset_response", op="stage_block", times=1),
                     Rule("truncate", op="read", times=1), *random_faults(0.05)])
    count = GiB // CHUNK
    written = hashlib.sha256()
    with open(mount.path / "big", "wb") as out:
        for index in range(count):
            data = chunk(index)
            written.update(data)
            out.write(data)
    stored = container.get_blob_client("big").get_blob_properties()
    assert stored.size == GiB

    read = hashlib.sha256()
    with open(mount.path / "big", "rb") as source:
        while piece := source.read(4 * MiB):
            read.update(piece)
    assert read.hexdigest() == written.hexdigest()

    # Random reads on a fresh descriptor: every one exact, none short.
    rng = random.Random(3)
    fd = os.open(mount.path / "big", os.O_RDONLY)
    try:
        for _ in range(60):
            offset = rng.randrange(GiB - 2 * MiB)
            length = rng.choice([1, 4096, 100_000, 1 * MiB + 3])
            got = os.pread(fd, length, offset)
            index, within = divmod(offset, CHUNK)
            expected = (chunk(index) + chunk(index + 1))[within:within + length]
            assert got == expected, f"pread({length}, {offset})"
    finally:
        os.close(fd)

    faults = proxy.faults()
    assert faults["reset_response:stage_block"] >= 1 and faults["truncate:read"] >= 1, faults
    assert mount.stats()["driver"]["retries"] > 0
    assert error_lines(mount) == []  # nothing reached the application


def test_file_operations_under_5_percent_faults(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient) -> None:
    """create, write, rename, stat, read, list, unlink from 8 threads: each call succeeds as
    if Azure never failed (a Delete or a Copy whose answer was lost is simply repeated)."""
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", "retries=3,timeout=3")
    root = mount.path / "ops"
    root.mkdir()
    files = {f"f{i:02d}": random.Random(i).randbytes(random.Random(i).choice([10, 5000,
                                                                              300_000]))
             for i in range(24)}
    kept = sorted(name for index, name in enumerate(files) if index % 2)
    proxy.set_rules(random_faults(0.05, stall=1))

    def life(name: str) -> None:
        data = files[name]
        (root / name).write_bytes(data)
        (root / name).rename(root / f"{name}.moved")
        assert (root / f"{name}.moved").stat().st_size == len(data)
        assert (root / f"{name}.moved").read_bytes() == data
        if name not in kept:
            (root / f"{name}.moved").unlink()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(life, files))
    assert sorted(os.listdir(root)) == [f"{name}.moved" for name in kept]
    proxy.clear_rules()

    # Each kind of write once more, its first answer lost after Azure acted on it.
    for op, call in [("put", lambda: (root / "last").write_bytes(b"last")),
                     ("copy", lambda: (root / "last").rename(root / "last.moved")),
                     ("delete", lambda: (root / f"{kept[0]}.moved").unlink())]:
        with proxy.rule("reset_response", op=op, times=1) as lost:
            call()
        assert lost.fired == 1, op
    assert sorted(os.listdir(root)) == sorted([*(f"{n}.moved" for n in kept[1:]), "last.moved"])
    assert blob_names(container) == sorted([*(f"ops/{n}.moved" for n in kept[1:]),
                                            "ops/last.moved"])
    assert error_lines(mount) == []


@pytest.mark.registry
def test_registry_push_pull_and_chunked_upload_under_5_percent_faults(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
        tmp_path: Path) -> None:
    need("docker-registry")
    need("skopeo")
    image = build_image(tmp_path / "image", [16 * MiB, 1 * MiB, 20 * 1024],
                        tag="v1", seed=95, compress_below=4 * MiB)
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST)
    registry = Registry(mount.path, tmp_path / "registry").start()
    try:
        proxy.set_rules([Rule("reset_response", op="put", times=1),
                         Rule("truncate", op="read", times=1), *random_faults(0.05, stall=1)])
        skopeo_copy(f"oci:{image.layout}:v1", f"docker://{registry.address}/faults/app:v1")
        pulled = tmp_path / "pulled"
        skopeo_copy(f"docker://{registry.address}/faults/app:v1", f"oci:{pulled}:v1")
        assert read_image(pulled, "v1").digests == image.digests
        assert verify_layout(read_image(pulled, "v1")) == []

        data = random.Random(96).randbytes(3 * MiB + 4321)
        digest = chunked_upload(registry, "faults/chunks", data, chunk_size=1 * MiB + 7)
        assert get_blob(registry, "faults/chunks", digest) == data
        faults = proxy.faults()
    finally:
        registry.stop()
        proxy.clear_rules()
    assert faults["reset_response:put"] >= 1 and faults["truncate:read"] >= 1, faults
    assert torn_blobs(container) == []
    hexdigest = digest.split(":", 1)[1]
    stored = f"{REGISTRY_PREFIX}blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"
    assert container.download_blob(stored).readall() == data
    assert error_lines(mount) == []


def test_lost_connection_read_asks_the_same_version_again(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
        recorder: Recorder) -> None:
    """A read whose response is reset or cut mid-body is asked again for the range it still
    needs, with If-Match on the same ETag; the application gets exact bytes. If the blob is
    replaced meanwhile, the retry fails (ESTALE) rather than mixing two versions."""
    old = random.Random(40).randbytes(24 * MiB)
    container.upload_blob("blob", old)
    etag = container.get_blob_client("blob").get_blob_properties().etag
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST)
    assert (mount.path / "blob").stat().st_size == len(old)

    proxy.add_rule("reset_response", op="read", after_bytes=3 * MiB + 12345, times=2)
    proxy.add_rule("truncate", op="read", after_bytes=777_777, times=1)
    with open(mount.path / "blob", "rb") as handle:
        assert hashlib.sha256(handle.read()).digest() == hashlib.sha256(old).digest()
    reads = recorder.ops("read", "blob")
    assert sum(rule.fired for rule in proxy.rules()) == 3
    # (A listing gives the ETag without its quotes; Azure compares it either way.)
    assert {(seen.if_match or "").strip('"') for seen in reads} == {etag.strip('"')}
    ranges = [range_of(seen.range) for seen in reads]
    # Each lost response is followed by a request for the rest of its range: the same
    # range again, or (resuming) one that starts further on and ends at the same byte.
    lost = 0
    for index, (start, end) in enumerate(ranges):
        later = ranges[index + 1:]
        if any(s >= start and e == end for s, e in later):
            lost += 1
    assert lost >= 3, ranges
    covered = sorted(ranges)
    assert covered[0][0] == 0 and max(end for _, end in covered) == len(old) - 1

    # The blob is replaced while a read of it hangs with half its answer: its retry must
    # not splice the new version onto the old one.
    proxy.clear_rules()
    new = random.Random(41).randbytes(24 * MiB)
    mount.unmount()
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST, name="again")
    assert (mount.path / "blob").stat().st_size == len(old)
    proxy.add_rule("stall", op="read", after_bytes=2 * MiB, seconds=3, times=1)
    outcome: dict[str, Any] = {}

    def reader() -> None:
        try:
            with open(mount.path / "blob", "rb") as handle:
                outcome["data"] = handle.read()
        except OSError as exc:
            outcome["errno"] = exc.errno

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 30
    while not proxy.faults().get("stall:read") and time.monotonic() < deadline:
        time.sleep(0.01)
    container.upload_blob("blob", new, overwrite=True)  # directly, not through the proxy
    thread.join(60)
    assert not thread.is_alive()
    # Never bytes: the old version is gone, and the new one must not be spliced on.
    assert outcome == {"errno": errno.ESTALE}, {k: v if k == "errno" else len(v)
                                                for k, v in outcome.items()}
    with open(mount.path / "blob", "rb") as handle:  # a new open reads the new version
        assert handle.read() == new


@pytest.mark.parametrize("how", ["put", "commit_block_list", "append_block"])
def test_a_conditional_write_whose_answer_was_lost_succeeds_once(
        how: str, proxy: FaultProxy, azurite: Azurite, mount_factory,
        container: ContainerClient) -> None:
    """Azure did the write, the answer was lost, and the retry meets the write's own
    condition: O_EXCL (409 BlobAlreadyExists) or an append position (412). The daemon
    checks what Azure holds before calling it a failure; the data lands once."""
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST)
    data = random.Random(7).randbytes(100_000)
    if how == "append_block":
        blob = container.get_blob_client("log")
        blob.create_append_blob()
        blob.append_block(b"first line\n")
        os.stat(mount.path / "log")
        expected = b"first line\n" + data
        with proxy.rule("reset_response", op=how, times=1) as rule, \
                open(mount.path / "log", "ab") as handle:
            handle.write(data)
            handle.close()  # the commit: one Append Block, then its retry
            assert rule.fired == 1
        assert blob.download_blob().readall() == expected
        assert blob.get_blob_properties().blob_type == "AppendBlob"
        assert (mount.path / "log").read_bytes() == expected
        return
    # A sparse file whose hole exceeds one block is committed by Put Block List.
    offset = 20 * MiB if how == "commit_block_list" else 0
    expected = bytes(offset) + data
    with proxy.rule("reset_response", op=how, times=1) as rule:
        fd = os.open(mount.path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)  # the commit, create-only: its retry meets 409
        assert rule.fired == 1
    assert container.download_blob("new").readall() == expected
    assert (mount.path / "new").read_bytes() == expected
    with pytest.raises(FileExistsError):  # O_EXCL still means what it says
        os.open(mount.path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)


# -- what an application's failure leaves in the log ----------------------------------------

@pytest.fixture
def logged_mount(proxy: FaultProxy, azurite: Azurite, mount_factory,
                 container: ContainerClient) -> Mount:
    container.upload_blob("dir/readme", b"r" * 100_000)
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", "retries=1,timeout=5")
    assert sorted(os.listdir(mount.path / "dir")) == ["readme"]
    return mount


def test_a_failed_read_is_one_error_line(proxy: FaultProxy, logged_mount: Mount) -> None:
    mount = logged_mount
    since = log_length(mount)
    fuse_reads = mount.stats()["fuse"]["operations"].get("read", 0)
    fd = os.open(mount.path / "dir" / "readme", os.O_RDONLY)
    try:
        with proxy.rule("error", op="read", status=500), pytest.raises(OSError) as failed:
            os.read(fd, 100_000)  # one system call
    finally:
        os.close(fd)
    assert failed.value.errno == errno.EIO
    lines = error_lines(mount, since)
    assert re.search(rf"read: .*dir/readme.*HTTP 500 InternalError, request-id {UUID}",
                     lines[0]), lines[0]
    assert len(lines) == 1, (lines, mount.stats()["fuse"]["operations"]["read"] - fuse_reads)


def test_each_failure_is_one_error_line_with_status_code_and_request_id(
        proxy: FaultProxy, logged_mount: Mount, container: ContainerClient) -> None:
    mount = logged_mount
    target = mount.path / "dir"

    # A write: its commit at close gets 408 RequestTimeout on every attempt.
    since = log_length(mount)
    with proxy.rule("error", op="put", status=408), pytest.raises(OSError) as failed:
        (target / "new").write_bytes(b"n" * 1000)
    assert failed.value.errno == errno.EIO
    lines = error_lines(mount, since)
    assert len(lines) == 1, lines
    assert re.search(rf"flush: .*dir/new.*HTTP 408 RequestTimeout, request-id {UUID}",
                     lines[0]), lines[0]

    # No answer at all: there is no status to quote, the line says so.
    since = log_length(mount)
    proxy.set_outage(True)
    try:
        with pytest.raises(OSError) as failed:
            os.stat(target / "missing")
    finally:
        proxy.set_outage(False)
    assert failed.value.errno == errno.EIO
    lines = error_lines(mount, since)
    assert len(lines) == 1, lines
    assert re.search(r"lookup: .*dir/.*cannot reach the storage service", lines[0]), lines[0]


# -- a total outage -------------------------------------------------------------------------

@pytest.fixture
def fuse_connections() -> Iterator[Path]:
    """/sys/fs/fuse/connections (fusectl), mounted for the test if it was not."""
    path = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not os.path.ismount(path):
        result = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(path)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount fusectl: {result.stderr.strip()}")
        mounted_here = True
    yield path
    if mounted_here:
        subprocess.run(["umount", str(path)], check=False)


def application_call(root: Path, kind: str, worker: int, unique: int) -> None:
    """One call of an application during the outage, on names no cache holds, and no two
    threads on one name (see test_concurrent_lookups_of_one_name_during_an_outage)."""
    if kind == "stat":
        os.stat(root / "cold" / f"x{unique}")
    elif kind == "read":
        (root / "cold" / f"f{worker}").read_bytes()
    elif kind == "create":
        (root / "new" / f"w{unique}").write_bytes(b"x" * 1000)
    else:
        os.listdir(root / f"d{unique}")


def waiting_requests(connections: Path, mount: Mount) -> int:
    """Requests the kernel holds for this mount: queued for the daemon or being served."""
    return int((connections / str(os.minor(os.stat(mount.path).st_dev)) / "waiting")
               .read_text())


def test_total_outage_of_30_seconds(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
        fuse_connections: Path) -> None:
    retries, timeout = 2, 5
    # One request's worst case, and some for the kernel, the event loop and a busy machine.
    bound = request_bound(retries, timeout) + 10
    for i in range(8):
        container.upload_blob(f"cold/f{i}", random.Random(i).randbytes(300_000))
    # Directory entries trusted for the whole test: lookups of "cold" itself never wait.
    mount = mount_through(proxy, azurite, mount_factory, container, "-o",
                          f"retries={retries},timeout={timeout},dir_entry_timeout=120")
    connection = fuse_connections / str(os.minor(os.stat(mount.path).st_dev))
    assert connection.is_dir()
    assert len(os.listdir(mount.path / "cold")) == 8
    pid = mount.process.pid

    # An open file with data staged before the outage and more written during it.
    dirty = mount.path / "dirty"
    before = random.Random(1).randbytes(12 * MiB)
    during = random.Random(2).randbytes(12 * MiB)
    writer = os.open(dirty, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(writer, before)
        outage_checks(proxy, mount, container, fuse_connections, writer, before, during,
                      bound, pid)
    finally:
        with contextlib.suppress(OSError):
            os.close(writer)  # an open file would keep the mount busy at its unmount


def outage_checks(proxy: FaultProxy, mount: Mount, container: ContainerClient,
                  fuse_connections: Path, writer: int, before: bytes, during: bytes,
                  bound: float, pid: int) -> None:

    results: list[tuple[str, float, float, int | None]] = []  # kind, ended, seconds, errno
    lock = threading.Lock()
    stop = threading.Event()

    def worker(number: int) -> None:
        rng = random.Random(number)
        while not stop.is_set():
            kind = rng.choice(["stat", "read", "create", "list"])
            seconds, code = timed(partial(application_call, mount.path, kind, number,
                                          rng.randrange(10**9)))
            with lock:
                results.append((kind, time.monotonic(), seconds, code))

    (mount.path / "new").mkdir()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    try:
        outage_started = time.monotonic()
        # First half: a black hole (requests are taken and never answered) ...
        black_hole = proxy.add_rule("stall", seconds=120)
        for thread in threads:
            thread.start()
        os.write(writer, during)  # lands in memory; its staging fails in the background
        fsync_seconds, fsync_errno = timed(lambda: os.fsync(writer))
        peak = 0
        while time.monotonic() - outage_started < 12:
            peak = max(peak, waiting_requests(fuse_connections, mount))
            time.sleep(0.2)
        # ... then refused: every connection reset as soon as a request arrives.
        proxy.set_outage(True)
        proxy.remove_rule(black_hole)
        while time.monotonic() - outage_started < 30:
            peak = max(peak, waiting_requests(fuse_connections, mount))
            time.sleep(0.2)
    finally:
        stop.set()
        proxy.clear_rules()
        proxy.set_outage(False)
        outage_ended = time.monotonic()
        for thread in threads:
            thread.join(max(0.0, outage_ended + 2 * bound + 10 - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a call hung"
    while waiting_requests(fuse_connections, mount) and \
            time.monotonic() - outage_ended < bound:
        time.sleep(0.1)
    assert waiting_requests(fuse_connections, mount) == 0
    # Each caller has one request at a time (and the kernel a few of its own: RELEASE...).
    assert peak <= 2 * len(threads) + 4, f"{peak} requests waiting for {len(threads)} callers"

    assert fsync_errno == errno.EIO
    assert fsync_seconds < 2 * bound  # the staging that failed, then the commit
    # A read(2) that fails is two FUSE READs, each failing after the bound: the kernel asks
    # again for the page (see test_a_failed_read_is_one_error_line).
    slow = [(kind, round(seconds, 1), code) for kind, _, seconds, code in results
            if seconds > (2 * bound if kind == "read" else bound)]
    assert slow == [], f"calls over {bound} s: {slow} of {results} (outage {outage_ended})"
    # Whatever returned while Azure was gone is EIO: never ENOENT for a name it cannot see.
    during_outage = [(kind, code) for kind, ended, _, code in results if ended < outage_ended]
    assert len(during_outage) >= 2, results
    assert {code for _, code in during_outage} == {errno.EIO}, during_outage

    # The mount serves again, same daemon, and the dirty data of the open file is whole.
    os.fsync(writer)
    os.close(writer)
    assert container.download_blob("dirty").readall() == before + during
    assert mount.process.poll() is None and mount.process.pid == pid
    assert (mount.path / "cold" / "f3").read_bytes() == random.Random(3).randbytes(300_000)
    (mount.path / "new" / "after").write_bytes(b"back")
    assert container.download_blob("new/after").readall() == b"back"
    print(f"outage: {len(during_outage)} calls failed, slowest "
          f"{max(seconds for _, _, seconds, _ in results):.1f} s (bound {bound} s), "
          f"fsync {fsync_seconds:.1f} s, at most {peak} FUSE requests waiting")


def test_concurrent_lookups_of_one_name_during_an_outage(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient) -> None:
    retries, timeout = 0, 1
    bound = request_bound(retries, timeout) + 1
    mount = mount_through(proxy, azurite, mount_factory, container, "-o",
                          f"retries={retries},timeout={timeout}")
    (mount.path / "dir").mkdir()
    os.listdir(mount.path)
    time.sleep(1.5)  # the listings and entries cached above expire
    seconds: list[float] = []
    with proxy.rule("stall", seconds=30):  # a black hole: each attempt waits its timeout
        threads = [threading.Thread(target=lambda: seconds.append(
            timed(lambda: os.stat(mount.path / "same"))[0])) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(seconds) == 3
    assert max(seconds) <= bound, sorted(round(s, 1) for s in seconds)


# -- throttling -----------------------------------------------------------------------------

def test_retry_policy_outlasts_throttling_but_not_errors() -> None:
    """The driver's retry policy, without Azure: a throttled answer (503, 500
    OperationTimedOut) does not spend the `retries` budget, up to THROTTLE_RETRIES more;
    other errors do; the sleep is what Retry-After asks, else a capped exponential."""
    policy = RetryAfterRetry(initial_backoff=1, increment_base=2, retry_total=1)
    request = HttpRequest("GET", "http://127.0.0.1/account/container/blob")

    def retries_until_given_up(status: int, code: str) -> int:
        settings = policy.configure_retries(PipelineRequest(request, PipelineContext(None)))
        answer = SimpleNamespace(status_code=status, headers={"x-ms-error-code": code})
        count = 0
        while policy.increment(settings, request=request, response=answer):
            count += 1
        return count

    assert retries_until_given_up(503, "ServerBusy") == THROTTLE_RETRIES + 1
    assert retries_until_given_up(500, "OperationTimedOut") == THROTTLE_RETRIES + 1
    assert retries_until_given_up(500, "InternalError") == 1
    assert retries_until_given_up(408, "RequestTimeout") == 1
    asked = SimpleNamespace(http_response=SimpleNamespace(headers={"Retry-After": "2"}))
    assert policy.get_backoff_time({"count": 9, "history": [asked]}) == 2.0
    assert policy.get_backoff_time({"count": 9, "history": []}) <= MAX_BACKOFF


def test_throttling_honours_retry_after_and_halves_concurrency(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
        recorder: Recorder) -> None:
    container.upload_blob("one", b"1" * 1000)
    mount = mount_through(proxy, azurite, mount_factory, container, "-o",
                          "retries=1,timeout=5,max_concurrency=16,block_size=1M")
    assert mount.stats()["azure_concurrency"] == 16

    # Retry-After: 2, three times in a row: more than `retries`, and waited each time.
    with proxy.rule("error", op="read", status=503, retry_after=2, times=3):
        assert (mount.path / "one").read_bytes() == b"1" * 1000
    reads = recorder.ops("read", "one")
    assert len(reads) == 4
    gaps = [later.at - earlier.at for earlier, later in zip(reads, reads[1:], strict=False)]
    assert min(gaps) >= 2.0, gaps

    # Sustained throttling while a 48 MiB file is staged 16 blocks at a time: the requests
    # in flight are cut (multiplicative decrease), then grow back one at a time.
    data = random.Random(5).randbytes(48 * MiB)
    proxy.reset_counts()
    with proxy.rule("error", op="stage_block", p=0.5, status=503, retry_after=0.2):
        (mount.path / "big").write_bytes(data)
        lowered = mount.stats()["azure_concurrency"]
    assert lowered < 16
    cuts = [(int(a), int(b)) for a, b in re.findall(
        r"WARNING azregfs.storage.driver: Azure is throttling \(503 ServerBusy\): requests in "
        r"flight (\d+) -> (\d+)", mount.log())]
    assert cuts and all(new < old for old, new in cuts), cuts
    assert container.download_blob("big").readall() == data
    stats = mount.stats()["driver"]
    assert stats["throttled"] >= proxy.faults()["error:stage_block"] > 0
    for _ in range(300):
        (mount.path / "small").write_bytes(b"s")  # one successful Put each
        if mount.stats()["azure_concurrency"] > lowered:
            break
    assert mount.stats()["azure_concurrency"] > lowered  # additive increase


@pytest.mark.registry
def test_push_under_50_percent_throttling_completes(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
        tmp_path: Path) -> None:
    need("docker-registry")
    need("skopeo")
    image = build_image(tmp_path / "image", [4 * MiB, 1 * MiB, 30 * 1024], tag="v1", seed=50,
                        compress_below=2 * MiB)
    mount = mount_through(proxy, azurite, mount_factory, container, "-o", FAST)
    registry = Registry(mount.path, tmp_path / "registry").start()
    try:
        # Retry-After is short here only to keep CI quick; it is honoured as asked.
        proxy.add_rule("error", p=0.5, status=503, retry_after=0.1)
        started = time.monotonic()
        skopeo_copy(f"oci:{image.layout}:v1", f"docker://{registry.address}/slow/app:v1")
        took = time.monotonic() - started
        print(f"push under 50% throttling: {took:.1f} s")
        throttled = proxy.faults()
        proxy.clear_rules()
        pulled = tmp_path / "pulled"
        skopeo_copy(f"docker://{registry.address}/slow/app:v1", f"oci:{pulled}:v1")
    finally:
        registry.stop()
        proxy.clear_rules()
    assert read_image(pulled, "v1").digests == image.digests
    assert sum(throttled.values()) >= 20, throttled
    assert mount.stats()["driver"]["throttled"] >= sum(throttled.values())
    assert "Azure is throttling" in mount.log()
    assert error_lines(mount) == []  # slowed down, never failed
    assert torn_blobs(container) == []


# -- the daemon killed during a push --------------------------------------------------------

@pytest.fixture
def own_mountpoint(tmp_path: Path) -> Iterator[Path]:
    """A mountpoint for mounts made by `azregfs mount` itself (a daemon of its own, as an
    operator starts it), detached after the test whatever state it is in."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted(path):
        subprocess.run([*azregfs_command(), "unmount", str(path)], check=False, timeout=120)
    if mounted(path):  # a dead daemon's mount, or one that would not go
        subprocess.run(["fusermount3", "-uz", str(path)], check=False)


def mounted(path: Path) -> bool:
    """In the mount table (os.path.ismount can be wrong about a dead FUSE mount)."""
    with open("/proc/self/mounts") as table:
        return any(line.split()[1] == str(path) for line in table)


def wait_until_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def wait_for_enotconn(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(path)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
            return
        assert time.monotonic() < deadline, "os.stat still answers on a dead mount"
        time.sleep(0.1)


def mount_command(proxy: FaultProxy, azurite: Azurite, container: ContainerClient,
                  mountpoint: Path, *options: str) -> Callable[[], str]:
    """`azregfs mount` (a daemon of its own); returns its stderr, once the mount is live."""
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": proxy.connection_string(azurite)}
    command = [*azregfs_command(), "mount", "--log-level", "DEBUG", *options,
               container.container_name, str(mountpoint)]

    def mount() -> str:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mountpoint)
        return result.stderr

    return mount


def test_mount_at_once_over_a_just_killed_daemon(
        proxy: FaultProxy, azurite: Azurite, container: ContainerClient,
        own_mountpoint: Path) -> None:
    mount = mount_command(proxy, azurite, container, own_mountpoint, "-o", "attr_timeout=60")
    mount()
    (own_mountpoint / "kept").write_bytes(b"k")
    os.stat(own_mountpoint)
    pid = int(control.read(own_mountpoint, "pid"))
    os.kill(pid, 9)
    wait_until_dead(pid)
    assert "detaching a stale mount" in mount()
    assert os.listdir(own_mountpoint) == ["kept"]


@pytest.mark.registry
def test_sigkill_during_push_then_mount_on_the_dead_mountpoint(
        proxy: FaultProxy, azurite: Azurite, container: ContainerClient, tmp_path: Path,
        own_mountpoint: Path) -> None:
    need("docker-registry")
    need("skopeo")
    image: Image = build_image(tmp_path / "image", [40 * MiB, 1 * MiB, 10 * 1024], tag="v1",
                               seed=9, compress_below=2 * MiB)
    mountpoint = own_mountpoint
    # A small dirty budget and slow Put Blocks: the upload grows slowly enough to catch.
    mount = mount_command(proxy, azurite, container, mountpoint, "-o",
                          f"{FAST},dirty_budget=16M,log_file={tmp_path / 'azregfs.log'}")
    mount()
    pid = int(control.read(mountpoint, "pid"))
    registry = Registry(mountpoint, tmp_path / "registry").start()
    push = None
    try:
        # The push goes through faults: the kill lands among requests and their retries.
        proxy.set_rules([Rule("latency", op="stage_block", ms=500),
                         *random_faults(0.05, stall=1)])
        push = subprocess.Popen(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
             "--dest-tls-verify=false", f"oci:{image.layout}:v1",
             f"docker://{registry.address}/killed/app:v1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not any(size >= 16 * MiB for _, size in upload_files(mountpoint)):
            assert push.poll() is None, push.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the upload never reached 16 MiB"
            time.sleep(0.05)
        os.kill(pid, 9)
        wait_until_dead(pid)
    finally:
        registry.stop()
        if push is not None:
            push.kill()
            push.wait()
        proxy.clear_rules()
    with pytest.raises(OSError) as dead:
        os.listdir(mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    assert torn_blobs(container) == []

    # `azregfs mount` tells a dead mount by os.stat, which the kernel answers from cached
    # attributes until they expire (see test_mount_at_once_over_a_just_killed_daemon).
    wait_for_enotconn(mountpoint)
    said = mount()  # over the dead mount: detached, then mounted again
    assert "detaching a stale mount" in said
    registry = Registry(mountpoint, tmp_path / "registry-2").start()
    try:
        skopeo_copy(f"oci:{image.layout}:v1", f"docker://{registry.address}/killed/app:v1")
        pulled = tmp_path / "pulled"
        skopeo_copy(f"docker://{registry.address}/killed/app:v1", f"oci:{pulled}:v1")
    finally:
        registry.stop()
    assert read_image(pulled, "v1").digests == image.digests
    assert torn_blobs(container) == []
    result = subprocess.run([*azregfs_command(), "unmount", str(mountpoint)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)


# -- stopping during an outage --------------------------------------------------------------

def files_left_open(mount: Mount, count: int) -> list:
    """Files with 3 MiB each in the daemon's write buffer, never committed."""
    files = [open(mount.path / f"open-{i}", "wb") for i in range(count)]  # noqa: SIM115
    for handle in files:
        handle.write(os.urandom(3 * MiB))
        handle.flush()
    return files


def close_all(files: list) -> None:
    for handle in files:
        with contextlib.suppress(OSError):
            handle.close()


def test_sigterm_during_an_outage_exits_within_one_commit_bound(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient) -> None:
    retries, timeout = 1, 2
    bound = request_bound(retries, timeout) + 1
    mount = mount_through(proxy, azurite, mount_factory, container, "-o",
                          f"retries={retries},timeout={timeout}")
    files = files_left_open(mount, 4)
    try:
        with proxy.rule("stall", seconds=120):
            started = time.monotonic()
            mount.process.terminate()
            status = mount.process.wait(timeout=20 * bound)
            took = time.monotonic() - started
    finally:
        close_all(files)
    assert status == 1  # files were lost: the exit status says so
    # Each file is tried once (not once per file in turn, not again after the loop ends).
    assert took <= 2 * bound, took
    lost = [line for line in error_lines(mount) if "could not commit" in line]
    assert sorted(line.split("could not commit ")[1].split()[0] for line in lost) == [
        f"open-{i}" for i in range(4)], lost
    assert blob_names(container) == []  # nothing torn, nothing half-written


def test_a_second_sigterm_stops_waiting_for_an_unreachable_storage(
        proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient) -> None:
    mount = mount_through(proxy, azurite, mount_factory, container, "-o",
                          "retries=3,timeout=20")  # one commit could take minutes
    files = files_left_open(mount, 2)
    try:
        with proxy.rule("stall", seconds=300):
            mount.process.terminate()
            time.sleep(1)
            assert mount.process.poll() is None  # saving, and waiting on Azure
            started = time.monotonic()
            mount.process.terminate()
            status = mount.process.wait(timeout=30)
            took = time.monotonic() - started
    finally:
        close_all(files)
    assert status == 1
    assert took <= 5, took
    assert "SIGTERM again: unmounting now; 2 files with unsaved data lost" in mount.log()
    assert not mounted(mount.path)
    assert blob_names(container) == []


def test_a_directory_stays_listed_while_its_marker_is_put(proxy: FaultProxy, azurite: Azurite,
                                                          mount_factory,
                                                          container: ContainerClient) -> None:
    """x/y's last file is renamed away, so x/y's marker is put marker_delay later. While
    that put is under way Azure shows neither x nor x/y: the mount must. It dropped them
    when the put began, and CI's root listing showed no x (test_namespace.py's
    test_a_directory_whose_last_file_was_renamed_away_keeps_its_parents, under load)."""
    mnt = mount_through(proxy, azurite, mount_factory, container, "-o", "marker_delay=0.3")
    os.makedirs(mnt.path / "x" / "y")
    (mnt.path / "x" / "y" / "f").write_bytes(b"1")
    os.rename(mnt.path / "x" / "y" / "f", mnt.path / "moved")
    slow_puts = proxy.add_rule("latency", op="put", ms=6000)
    deadline = time.monotonic() + 10
    while not slow_puts.fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_puts.fired == 1, "the marker's put should be under way"
    time.sleep(1.2)  # past dir_timeout: no listing from before the put answers
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    assert sorted(os.listdir(mnt.path)) == ["moved", "x"]
    assert os.listdir(mnt.path / "x") == ["y"]
    deadline = time.monotonic() + 20
    while blob_names(container) != ["moved", "x/y"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert blob_names(container) == ["moved", "x/y"]
    assert sorted(os.listdir(mnt.path)) == ["moved", "x"]
