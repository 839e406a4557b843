"""Hostile input and races through a real mount (issue 9, items 1-4): sizes beyond what a blob
can hold (EFBIG, never memory proportional to a hole), attribute changes that must keep the
metadata keys azregfs does not own, a file closed on this mount missing from a listing that
was in flight, and readers of a file that a writer keeps renaming new versions over.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient, ContentSettings
from conftest import Mount, need

from azregfs.fs import control

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 8 * MiB  # the default block_size


def daemon_pid(mount: Mount) -> int:
    return int(control.read(mount.path, "pid"))


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def driver_stats(mount: Mount) -> dict:
    return mount.stats()["driver"]


def blob_props(container: ContainerClient, name: str):
    return container.get_blob_client(name).get_blob_properties()


# -- 1. sizes beyond what a blob can hold; holes cost no memory ------------------------------


def test_huge_truncate_is_efbig_and_costs_nothing(mnt, container):
    path = mnt.path / "f"
    path.write_bytes(b"hello")
    pid = daemon_pid(mnt)
    before = vm_kib(pid, "VmRSS")
    result = subprocess.run(["truncate", "-s", "999999999999999", str(path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "too large" in result.stderr, result
    with pytest.raises(OSError) as caught:
        os.truncate(path, 2**62)
    assert caught.value.errno == errno.EFBIG
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.ftruncate(fd, 50_000 * BLOCK + 1)
        assert caught.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    # Nothing changed, the daemon is alive and did not grow.
    assert path.read_bytes() == b"hello"
    assert container.download_blob("f").readall() == b"hello"
    assert vm_kib(pid, "VmHWM") - before < 64 * 1024
    assert "cannot grow to 999,999,999,999,999 bytes" in mnt.log()
    assert "raise block_size" in mnt.log()


def test_pwrite_beyond_the_limit_is_efbig(mnt, container):
    fd = os.open(mnt.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for offset in (2**50, 50_000 * BLOCK):
            with pytest.raises(OSError) as caught:
                os.pwrite(fd, b"x", offset)
            assert caught.value.errno == errno.EFBIG
        os.pwrite(fd, b"ok", 0)
    finally:
        os.close(fd)
    assert container.download_blob("f").readall() == b"ok"


def test_the_last_byte_a_blob_can_hold(mount_factory, container):
    """With 64 KiB blocks a blob holds 50,000 x 64 KiB: its last byte can be written (one
    zero block referenced 49,999 times), the next one cannot."""
    mnt = mount_factory(container.container_name, "-o", "block_size=64K")
    limit = 50_000 * 64 * 1024
    fd = os.open(mnt.path / "edge", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as caught:
            os.pwrite(fd, b"x", limit)
        assert caught.value.errno == errno.EFBIG
        os.pwrite(fd, b"z", limit - 1)
    finally:
        os.close(fd)
    props = blob_props(container, "edge")
    assert props.size == limit
    assert container.download_blob("edge", offset=limit - 3, length=3).readall() == b"\0\0z"
    blocks, _ = container.get_blob_client("edge").get_block_list("committed")
    assert len(blocks) == 50_000
    assert len({block.id for block in blocks}) == 2  # the zero block, and the last one
    assert driver_stats(mnt)["bytes_up"] <= 3 * 64 * 1024


def test_two_gib_sparse_file_commits_within_the_budget(mnt, container):
    path = mnt.path / "sparse"
    pid = daemon_pid(mnt)
    rss_before = vm_kib(pid, "VmRSS")
    up_before = driver_stats(mnt)["bytes_up"]
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"Z", 2 * GiB - 1)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - started
    stats = mnt.stats()
    hwm = vm_kib(pid, "VmHWM")
    up = stats["driver"]["bytes_up"] - up_before
    print(f"2 GiB sparse: {elapsed:.2f}s, dirty_peak={stats['dirty_peak']}, "
          f"VmRSS before={rss_before} KiB, VmHWM={hwm} KiB, bytes_up={up}, "
          f"requests={stats['driver']['requests']}")
    assert stats["dirty_peak"] <= BLOCK
    assert up <= 2 * BLOCK  # one zero block and the last block, not 256 blocks
    assert hwm - rss_before < 128 * 1024
    assert blob_props(container, "sparse").size == 2 * GiB
    with open(path, "rb") as reader:
        for offset in (0, GiB - 4096, 2 * GiB - MiB):
            reader.seek(offset)
            chunk = reader.read(MiB)
            expected = bytes(MiB) if offset != 2 * GiB - MiB else bytes(MiB - 1) + b"Z"
            assert chunk == expected, offset
    assert os.stat(path).st_size == 2 * GiB


def test_fallocate_is_unsupported_and_posix_fallocate_makes_a_hole(mnt, container):
    need("fallocate")
    path = mnt.path / "alloc"
    path.write_bytes(b"abc")
    # pyfuse3 does not dispatch FALLOCATE: the kernel answers EOPNOTSUPP for every mode.
    result = subprocess.run(["fallocate", "-l", "1G", str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and "not supported" in result.stderr, result
    # glibc then writes a zero byte every 4 KiB: that must stay a hole, not 16,384 segments.
    up_before = driver_stats(mnt)["bytes_up"]
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 16 * MiB)
        with pytest.raises(OSError) as caught:
            os.posix_fallocate(fd, 2**50, 4096)
        assert caught.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 16 * MiB
    data = container.download_blob("alloc").readall()
    assert data == b"abc" + bytes(16 * MiB - 3)
    assert driver_stats(mnt)["bytes_up"] - up_before <= 2 * BLOCK
    assert mnt.stats()["dirty_peak"] <= 64 * 1024


def test_growing_truncate_then_write_reads_back(mnt, container):
    path = mnt.path / "grown"
    path.write_bytes(b"head")
    os.truncate(path, 100 * MiB)
    with open(path, "r+b") as handle:
        handle.seek(50 * MiB)
        handle.write(b"middle")
    assert os.stat(path).st_size == 100 * MiB
    blob = container.get_blob_client("grown")
    assert blob.get_blob_properties().size == 100 * MiB
    assert blob.download_blob(offset=0, length=8).readall() == b"head\0\0\0\0"
    assert blob.download_blob(offset=50 * MiB - 2, length=10).readall() == b"\0\0middle\0\0"
    assert blob.download_blob(offset=100 * MiB - 4, length=4).readall() == bytes(4)


# -- 2. attribute changes keep the metadata keys azregfs does not own ------------------------


def check_dir_attrs(path: Path, mode: int, uid: int, gid: int, mtime: float | None) -> None:
    info = os.stat(path)
    assert stat.S_ISDIR(info.st_mode), f"{path} is not a directory: {oct(info.st_mode)}"
    assert stat.S_IMODE(info.st_mode) == mode, oct(info.st_mode)
    assert (info.st_uid, info.st_gid) == (uid, gid)
    if mtime is not None:
        assert abs(info.st_mtime - mtime) < 1e-3


def sync_dir(path: Path) -> None:
    """fsync a directory: whatever azregfs still holds about it reaches Azure."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def change_attrs(path: Path, mode: int, stamp: float) -> None:
    os.chown(path, 1000, 1000)
    os.chmod(path, mode)
    os.utime(path, (stamp, stamp))


def test_attributes_of_an_empty_directory_keep_it_a_directory(mount_factory, container):
    name = container.container_name
    mnt = mount_factory(name)
    (mnt.path / "d").mkdir()
    (mnt.path / "t").mkdir()
    stamp = 1_600_000_000.5
    change_attrs(mnt.path / "d", 0o700, stamp)
    subprocess.run(["touch", str(mnt.path / "t")], check=True)
    subprocess.run(["chown", "1000:1000", str(mnt.path / "t")], check=True)
    check_dir_attrs(mnt.path / "d", 0o700, 1000, 1000, stamp)
    time.sleep(1.5)  # past the attribute and listing timeouts
    listing = subprocess.run(["ls", "-la", str(mnt.path)], capture_output=True, text=True,
                             check=True).stdout
    assert [line[0] for line in listing.splitlines() if line.endswith((" d", " t"))] == ["d", "d"]
    check_dir_attrs(mnt.path / "d", 0o700, 1000, 1000, stamp)
    for marker in ("d", "t"):
        sync_dir(mnt.path / marker)
        meta = blob_props(container, marker).metadata
        assert meta["hdi_isfolder"] == "true" and meta["uid"] == "1000", meta
    assert blob_props(container, "d").metadata["mode"] == "700"
    mnt.unmount()
    mnt = mount_factory(name, name="again")
    check_dir_attrs(mnt.path / "d", 0o700, 1000, 1000, stamp)
    assert os.path.isdir(mnt.path / "t") and os.stat(mnt.path / "t").st_uid == 1000
    (mnt.path / "d" / "child").write_bytes(b"x")  # the marker goes, the directory stays
    assert os.listdir(mnt.path / "d") == ["child"]


def test_attributes_of_directories_with_children(mount_factory, container):
    name = container.container_name
    # A directory another tool made with a marker it keeps, and keys of its own.
    container.upload_blob("tool", b"", metadata={"hdi_isfolder": "true", "owner": "tool"})
    container.upload_blob("tool/child", b"c")
    mnt = mount_factory(name)
    (mnt.path / "mine").mkdir()
    (mnt.path / "mine" / "child").write_bytes(b"m")  # the marker is removed
    stamp = 1_600_000_123.25
    for directory in ("tool", "mine"):
        change_attrs(mnt.path / directory, 0o750, stamp)
        check_dir_attrs(mnt.path / directory, 0o750, 1000, 1000, stamp)
    time.sleep(1.5)
    for directory in ("tool", "mine"):
        check_dir_attrs(mnt.path / directory, 0o750, 1000, 1000, stamp)
        assert os.listdir(mnt.path / directory) == ["child"]
    meta = blob_props(container, "tool").metadata
    assert meta["hdi_isfolder"] == "true" and meta["owner"] == "tool" and meta["mode"] == "750"
    assert not container.get_blob_client("mine").exists()  # implicit: no blob for its attributes
    mnt.unmount()
    mnt = mount_factory(name, name="again")
    check_dir_attrs(mnt.path / "tool", 0o750, 1000, 1000, stamp)
    assert os.listdir(mnt.path / "tool") == ["child"]
    # An implicit directory's attributes lived in memory only (README): defaults again.
    check_dir_attrs(mnt.path / "mine", 0o755, os.getuid(), os.getgid(), None)
    assert os.listdir(mnt.path / "mine") == ["child"]


def test_mkdir_mode_and_an_emptied_directory_keep_their_attributes(mnt, container):
    os.mkdir(mnt.path / "private", 0o700)
    sync_dir(mnt.path / "private")
    assert blob_props(container, "private").metadata["mode"] == "700"
    (mnt.path / "busy").mkdir()
    (mnt.path / "busy" / "f").write_bytes(b"x")
    os.chmod(mnt.path / "busy", 0o711)
    os.unlink(mnt.path / "busy" / "f")  # the last child goes: a marker keeps it, and its mode
    sync_dir(mnt.path / "busy")
    meta = blob_props(container, "busy").metadata
    assert meta["hdi_isfolder"] == "true" and meta["mode"] == "711", meta
    check_dir_attrs(mnt.path / "busy", 0o711, os.getuid(), os.getgid(), None)


def test_attributes_of_files_written_by_other_tools(mount_factory, container):
    name = container.container_name
    settings = ContentSettings(content_type="application/x-tool")
    container.upload_blob("block", b"block data", metadata={"tool": "k1"},
                          content_settings=settings)
    appended = container.get_blob_client("append")
    appended.create_append_blob(metadata={"tool": "k2"}, content_settings=settings)
    appended.append_block(b"append data")
    mnt = mount_factory(name)
    stamp = 1_600_000_456.75
    for file in ("block", "append"):
        change_attrs(mnt.path / file, 0o640, stamp)

    def check(file: str, size: int, key: str, *, mtime: bool = True) -> None:
        info = os.stat(mnt.path / file)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o640
        assert (info.st_uid, info.st_gid, info.st_size) == (1000, 1000, size)
        if mtime:
            assert abs(info.st_mtime - stamp) < 1e-3
        props = blob_props(container, file)
        assert props.metadata["tool"] == key and props.metadata["mode"] == "640", props.metadata
        assert props.content_settings.content_type == "application/x-tool"

    check("block", 10, "k1")
    check("append", 11, "k2")
    mnt.unmount()
    mnt = mount_factory(name, name="again")
    check("block", 10, "k1")
    check("append", 11, "k2")
    # Commits and rewrites keep them too: an append, a rewrite (O_TRUNC), a truncate.
    with open(mnt.path / "block", "ab") as handle:
        handle.write(b"+more")
    check("block", 15, "k1", mtime=False)
    with open(mnt.path / "append", "ab") as handle:
        handle.write(b"+more")
    check("append", 16, "k2", mtime=False)
    assert blob_props(container, "append").blob_type == "AppendBlob"
    (mnt.path / "append").write_bytes(b"rewritten")  # becomes a block blob
    check("append", 9, "k2", mtime=False)
    os.truncate(mnt.path / "block", 3)
    check("block", 3, "k1", mtime=False)
    os.rename(mnt.path / "block", mnt.path / "moved")
    check("moved", 3, "k1", mtime=False)


# -- 3. a file closed on this mount is in the next listing here ------------------------------

WRITERS = 4
FILES_EACH = 40


def create_and_list(directory: str, index: int, barrier, results) -> None:
    try:
        for number in range(FILES_EACH):
            with open(os.path.join(directory, f"p{index}-{number:03d}"), "wb") as handle:
                handle.write(b"%d" % number)
        barrier.wait(timeout=120)
        results.put((index, sorted(os.listdir(directory))))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((index, repr(exc)))


def test_files_closed_by_other_processes_are_listed_at_once(mnt, container):
    context = multiprocessing.get_context("fork")
    expected = sorted(["seed"] + [f"p{i}-{n:03d}" for i in range(WRITERS)
                                  for n in range(FILES_EACH)])
    for attempt in range(6):
        # Made by another client: this mount knows nothing of it and lists it from Azure.
        container.upload_blob(f"dir{attempt}/seed", b"s")
        directory = mnt.path / f"dir{attempt}"
        barrier = context.Barrier(WRITERS)
        results = context.Queue()
        workers = [context.Process(target=create_and_list,
                                   args=(str(directory), i, barrier, results))
                   for i in range(WRITERS)]
        for worker in workers:
            worker.start()
        answers = [results.get(timeout=180) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
        for index, names in answers:
            assert names == expected, (attempt, index, sorted(set(expected) - set(names))
                                       if isinstance(names, list) else names)


# -- 4. readers of a file that a writer keeps replacing --------------------------------------

SIZES = (100, 70_000, 1 * MiB, 3 * MiB)


def version_bytes(version: int, size: int) -> bytes:
    unit = b"<%08d>" % version
    return (unit * (size // len(unit) + 1))[:size]


def check_version(data: bytes, size: int) -> int:
    assert len(data) == size, (len(data), size)
    version = int(data[1:9])
    assert data == version_bytes(version, size), f"torn read of a {size}-byte file"
    return version


def mixed_size(version: int) -> int:
    return SIZES[version % len(SIZES)]


def test_readers_see_whole_versions_while_a_writer_renames_over(mnt):
    """One file per size, each replaced by versions of its size, and one file whose versions
    change size every time: every read is one whole version, never ESTALE."""
    targets = {f"v{size}": (lambda version, size=size: size) for size in SIZES}
    targets["mixed"] = mixed_size
    for target, size_of in targets.items():
        (mnt.path / target).write_bytes(version_bytes(0, size_of(0)))
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]
    versions = [0]

    def writer() -> None:
        version = 0
        try:
            while not stop.is_set():
                version += 1
                for target, size_of in targets.items():
                    tmp = mnt.path / f"{target}.{version}.tmp"
                    tmp.write_bytes(version_bytes(version, size_of(version)))
                    os.rename(tmp, mnt.path / target)
                versions[0] = version
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader(seed: int) -> None:
        # Pauses after open and after the first read leave the writer time to replace the
        # file under the descriptor (a plain read() is usually done before it can).
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                for target, size_of in targets.items():
                    with open(mnt.path / target, "rb", buffering=0) as handle:
                        time.sleep(rng.uniform(0, 0.01))
                        parts = [handle.read(4096)]
                        time.sleep(rng.uniform(0, 0.02))
                        while part := handle.read(256 * 1024):
                            parts.append(part)
                    data = b"".join(parts)
                    check_version(data, size_of(int(data[1:9])))
                    reads[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,))
                                                   for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not errors:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    print(f"{reads[0]} whole reads, {versions[0]} versions of each file")
    assert not errors, errors[0]
    assert versions[0] >= 5 and reads[0] >= 50


def test_an_open_descriptor_keeps_its_version(mnt):
    """Opened before a rename over it (same mount), read after: the old version, whole; a
    file larger than the whole-read bound replaced mid-read gives ESTALE (README)."""
    small = mnt.path / "small"
    small.write_bytes(version_bytes(1, 70_000))
    with open(small, "rb") as opened:
        (mnt.path / "new.tmp").write_bytes(version_bytes(2, 70_000))
        os.rename(mnt.path / "new.tmp", small)
        assert check_version(opened.read(), 70_000) == 1
    with open(small, "rb") as reopened:
        assert check_version(reopened.read(), 70_000) == 2
    with open(small, "rb") as opened:
        os.unlink(small)
        assert check_version(opened.read(), 70_000) == 2  # as a local filesystem would

    large = mnt.path / "large"
    size = 64 * MiB  # beyond what read-ahead fetches after the first MiB (8 + 16 MiB)
    large.write_bytes(version_bytes(1, size))
    with open(large, "rb", buffering=0) as opened:
        first = opened.read(MiB)
        assert first == version_bytes(1, size)[:MiB]
        (mnt.path / "large.tmp").write_bytes(version_bytes(2, size))
        os.rename(mnt.path / "large.tmp", large)
        with pytest.raises(OSError) as caught:
            opened.seek(60 * MiB)
            opened.read(MiB)
        assert caught.value.errno == errno.ESTALE


def test_a_writer_renamed_over_does_not_clobber_the_new_file(mnt, container):
    target = mnt.path / "target"
    with open(target, "wb") as late_writer:
        late_writer.write(b"old data, still open")
        late_writer.flush()
        (mnt.path / "new").write_bytes(b"new data")
        os.rename(mnt.path / "new", target)
        late_writer.write(b" and more")
    assert target.read_bytes() == b"new data"
    assert container.download_blob("target").readall() == b"new data"
