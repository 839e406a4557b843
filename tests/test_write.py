"""The write path through a real mount: open flags, offsets, truncation, commit semantics,
read-your-writes, block reuse when changing existing blobs, append blobs, failures, and
metadata (mode, owner, times). The container is always checked with the SDK.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient
from conftest import Mount, blob_names, need, start_mount

from azregfs.demo.azurite import Azurite

MiB = 1024 * 1024
KiB = 1024


def blob_bytes(container: ContainerClient, name: str) -> bytes:
    return container.download_blob(name).readall()


def blob_exists(container: ContainerClient, name: str) -> bool:
    return container.get_blob_client(name).exists()


def blob_type(container: ContainerClient, name: str) -> str:
    kind = container.get_blob_client(name).get_blob_properties().blob_type
    return getattr(kind, "value", str(kind))


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def bytes_up(mount: Mount) -> int:
    return mount.stats()["driver"]["bytes_up"]


def requests_of(mount: Mount, op: str) -> int:
    return mount.stats()["driver"]["requests"].get(op, 0)


def write_file(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               offset: int | None = None) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        if offset is not None:
            os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 4 * MiB]):]
    finally:
        os.close(fd)


# -- open flags, offsets, truncation ---------------------------------------------------------


def test_create_and_close_commits(mnt, container):
    (mnt.path / "a.txt").write_bytes(b"hello world")
    assert blob_bytes(container, "a.txt") == b"hello world"
    assert os.stat(mnt.path / "a.txt").st_size == 11


def test_create_empty_file(mnt, container):
    (mnt.path / "empty").touch()
    assert blob_names(container) == ["empty"]
    assert blob_bytes(container, "empty") == b""


def test_o_excl(mnt, container):
    container.upload_blob("exists", b"v1")
    with pytest.raises(FileExistsError):
        os.open(mnt.path / "exists", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert blob_bytes(container, "exists") == b"v1"
    fd = os.open(mnt.path / "fresh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"new")
    os.close(fd)
    assert blob_bytes(container, "fresh") == b"new"
    with pytest.raises(FileExistsError):
        os.open(mnt.path / "fresh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def test_o_trunc_replaces(mnt, container):
    container.upload_blob("f", b"a much longer first version")
    write_file(mnt.path / "f", b"short", os.O_WRONLY | os.O_TRUNC)
    assert blob_bytes(container, "f") == b"short"
    assert (mnt.path / "f").read_bytes() == b"short"


def test_o_append(mnt, container):
    container.upload_blob("log", b"line1\n")
    fd = os.open(mnt.path / "log", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"line2\n")
    os.write(fd, b"line3\n")
    os.close(fd)
    assert blob_bytes(container, "log") == b"line1\nline2\nline3\n"
    with open(mnt.path / "log", "ab") as handle:
        handle.write(b"line4\n")
    assert blob_bytes(container, "log") == b"line1\nline2\nline3\nline4\n"


def test_o_rdwr(mnt, container):
    container.upload_blob("rw", b"0123456789")
    fd = os.open(mnt.path / "rw", os.O_RDWR)
    try:
        assert os.pread(fd, 4, 2) == b"2345"
        os.pwrite(fd, b"AB", 4)
        assert os.pread(fd, 10, 0) == b"0123AB6789"
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"XY")
        assert os.pread(fd, 100, 8) == b"89XY"
    finally:
        os.close(fd)
    assert blob_bytes(container, "rw") == b"0123AB6789XY"


def test_o_wronly_without_trunc_keeps_the_rest(mnt, container):
    container.upload_blob("w", b"abcdefghij")
    fd = os.open(mnt.path / "w", os.O_WRONLY)
    os.write(fd, b"XYZ")
    os.close(fd)
    assert blob_bytes(container, "w") == b"XYZdefghij"


def test_sparse_write_reads_zeros(mnt, container):
    fd = os.open(mnt.path / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"head")
    os.lseek(fd, 3 * MiB, os.SEEK_SET)
    os.write(fd, b"tail")
    os.close(fd)
    expected = b"head" + bytes(3 * MiB - 4) + b"tail"
    assert blob_bytes(container, "sparse") == expected
    assert (mnt.path / "sparse").read_bytes() == expected
    assert os.stat(mnt.path / "sparse").st_size == 3 * MiB + 4


def test_sparse_write_into_existing_blob(mnt, container):
    container.upload_blob("s2", b"abc")
    fd = os.open(mnt.path / "s2", os.O_WRONLY)
    os.pwrite(fd, b"z", 100)
    os.close(fd)
    assert blob_bytes(container, "s2") == b"abc" + bytes(97) + b"z"


def test_overwrite_middle(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=1M")
    data = bytearray(pattern(5 * MiB + 123, 1))
    write_file(mount.path / "m", bytes(data))
    fd = os.open(mount.path / "m", os.O_WRONLY)
    for offset in (10, MiB - 2, 3 * MiB + 7, 5 * MiB + 100):
        os.pwrite(fd, b"!" * 50, offset)
        data[offset:offset + 50] = b"!" * 50
    os.close(fd)
    assert blob_bytes(container, "m") == bytes(data)
    assert (mount.path / "m").read_bytes() == bytes(data)


def test_truncate_shrink_and_grow(mnt, container):
    container.upload_blob("t", b"0123456789")
    os.truncate(mnt.path / "t", 4)
    assert blob_bytes(container, "t") == b"0123"
    assert os.stat(mnt.path / "t").st_size == 4
    os.truncate(mnt.path / "t", 8)
    assert blob_bytes(container, "t") == b"0123" + bytes(4)
    assert (mnt.path / "t").read_bytes() == b"0123" + bytes(4)


def test_ftruncate_on_open_fd(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=1M")
    data = pattern(3 * MiB, 2)
    container.upload_blob("ft", b"old content")
    fd = os.open(mount.path / "ft", os.O_RDWR)
    try:
        os.ftruncate(fd, 0)  # what Distribution 3.1+ does instead of O_TRUNC
        os.write(fd, data)
        os.ftruncate(fd, 2 * MiB + 5)  # shrink into a block that may already be staged
        assert os.fstat(fd).st_size == 2 * MiB + 5
        os.ftruncate(fd, 2 * MiB + 10)  # grow: zeros
        assert os.pread(fd, 20, 2 * MiB) == data[2 * MiB:2 * MiB + 5] + bytes(5)
        assert blob_bytes(container, "ft") == b"old content"
    finally:
        os.close(fd)
    assert blob_bytes(container, "ft") == data[: 2 * MiB + 5] + bytes(5)


# -- commit semantics and read-your-writes ---------------------------------------------------


def test_nothing_visible_before_fsync_then_all(mnt, container):
    container.upload_blob("c", b"previous")
    fd = os.open(mnt.path / "c", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"new content, first part. ")
        assert blob_bytes(container, "c") == b"previous"
        os.fsync(fd)
        assert blob_bytes(container, "c") == b"new content, first part. "
        os.write(fd, b"second part.")
        assert blob_bytes(container, "c") == b"new content, first part. "
    finally:
        os.close(fd)
    assert blob_bytes(container, "c") == b"new content, first part. second part."


def test_new_file_absent_until_fsync(mnt, container):
    fd = os.open(mnt.path / "n", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"x" * 1000)
        assert not blob_exists(container, "n")
        assert os.listdir(mnt.path) == ["n"]  # the mount already shows it
        os.fdatasync(fd)
        assert blob_bytes(container, "n") == b"x" * 1000
    finally:
        os.close(fd)
    assert blob_bytes(container, "n") == b"x" * 1000


def test_read_your_writes_beyond_one_block(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=1M")
    data = pattern(3 * MiB + 12345, 3)
    path = mount.path / "ryw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        assert os.stat(path).st_size == len(data)
        assert os.fstat(fd).st_size == len(data)
        deadline = time.monotonic() + 60
        while requests_of(mount, "stage_block") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the three full blocks are staged in the background
        assert requests_of(mount, "commit_block_list") == 0
        # Their data is only in Azure's uncommitted list: reading it commits first.
        assert os.pread(fd, 100, 0) == data[:100]
        assert requests_of(mount, "commit_block_list") == 1
        assert os.pread(fd, 2 * MiB, MiB - 10) == data[MiB - 10:3 * MiB - 10]
        assert os.pread(fd, MiB, 3 * MiB) == data[3 * MiB:]
        os.pwrite(fd, b"patched", MiB + 1)  # a partial overwrite of a committed block
        assert os.pread(fd, 9, MiB) == data[MiB:MiB + 1] + b"patched" + data[MiB + 8:MiB + 9]
    finally:
        os.close(fd)
    expected = data[:MiB + 1] + b"patched" + data[MiB + 8:]
    assert blob_bytes(container, "ryw") == expected
    with open(path, "rb") as handle:  # another descriptor sees the same
        assert handle.read() == expected


def test_reader_on_other_fd_sees_unflushed_data(mnt, container):
    fd = os.open(mnt.path / "o", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"unflushed")
        with open(mnt.path / "o", "rb") as reader:
            assert reader.read() == b"unflushed"
    finally:
        os.close(fd)


def test_two_descriptors_share_one_session(mnt, container):
    first = os.open(mnt.path / "shared", os.O_WRONLY | os.O_CREAT, 0o644)
    second = os.open(mnt.path / "shared", os.O_RDWR)
    try:
        os.pwrite(first, b"AAAA", 0)
        os.pwrite(second, b"BB", 2)
        assert os.pread(second, 10, 0) == b"AABB"
    finally:
        os.close(first)  # commits what both wrote so far
    try:
        assert blob_bytes(container, "shared") == b"AABB"
        os.pwrite(second, b"CC", 4)
    finally:
        os.close(second)
    assert blob_bytes(container, "shared") == b"AABBCC"


def test_unlink_while_open_for_writing(mnt, container):
    """Distribution's Cancel: the upload is removed; nothing may come back at close."""
    fd = os.open(mnt.path / "upload", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 1000)
        os.fsync(fd)
        os.unlink(mnt.path / "upload")
        os.write(fd, b"more")
    finally:
        os.close(fd)
    assert blob_names(container) == []
    assert os.listdir(mnt.path) == []


@pytest.mark.slow
def test_2gib_file_md5_and_dirty_budget(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "dirty_budget=64M,block_size=8M")
    size, chunk = 2048 * MiB, MiB
    rng = random.Random(2026)
    digest = hashlib.md5()
    fd = os.open(mount.path / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // chunk):
            block = rng.randbytes(chunk)
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    stats = mount.stats()
    assert stats["dirty_peak"] <= 64 * MiB + 8 * MiB, stats
    assert stats["dirty_bytes"] == 0
    assert os.stat(mount.path / "big").st_size == size
    remote = hashlib.md5()
    for piece in container.download_blob("big", max_concurrency=2).chunks():
        remote.update(piece)
    assert remote.hexdigest() == digest.hexdigest()


# -- changing existing blobs without re-uploading them ---------------------------------------


def test_append_reuses_committed_blocks(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=4M")
    data = bytearray(pattern(24 * MiB, 4))
    write_file(mount.path / "b", bytes(data))
    assert blob_bytes(container, "b") == bytes(data)

    before = bytes_up(mount)
    extra = pattern(MiB, 5)
    write_file(mount.path / "b", extra, os.O_WRONLY | os.O_APPEND)
    data += extra
    sent = bytes_up(mount) - before
    assert MiB <= sent < 1.5 * MiB
    assert blob_bytes(container, "b") == bytes(data)

    before = bytes_up(mount)
    write_file(mount.path / "b", b"#" * (4 * KiB), os.O_WRONLY, offset=10 * MiB + 100)
    data[10 * MiB + 100:10 * MiB + 100 + 4 * KiB] = b"#" * (4 * KiB)
    sent = bytes_up(mount) - before
    assert 4 * KiB <= sent <= 4 * MiB + 1.5 * MiB  # one block (plus the short tail at most)
    assert blob_bytes(container, "b") == bytes(data)
    assert (mount.path / "b").read_bytes() == bytes(data)


def test_append_to_single_put_blob(mnt, container):
    original = pattern(3 * MiB, 6)
    container.upload_blob("p", original)  # one Put Blob: no block list to reuse
    before = bytes_up(mnt)
    write_file(mnt.path / "p", b"appended", os.O_WRONLY | os.O_APPEND)
    assert blob_bytes(container, "p") == original + b"appended"
    assert bytes_up(mnt) - before >= len(original)  # restaged, and counted


def test_append_to_blob_with_other_block_id_length(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=1M")
    blob = container.get_blob_client("ids")
    parts = [pattern(MiB, 10 + i) for i in range(3)]
    ids = [base64.b64encode(f"blk-{i:06d}".encode()).decode() for i in range(3)]
    assert all(len(i) != 32 for i in ids)
    for block_id, part in zip(ids, parts, strict=True):
        blob.stage_block(block_id, part)
    blob.commit_block_list([BlobBlock(block_id) for block_id in ids])
    short_ids = "0123456789"
    for i, part in enumerate(parts):  # and a blob with 10-character IDs
        container.get_blob_client("ten").stage_block(short_ids[:9] + str(i), part)
    container.get_blob_client("ten").commit_block_list(
        [BlobBlock(short_ids[:9] + str(i)) for i in range(3)])
    for name in ("ids", "ten"):
        write_file(mount.path / name, b"more", os.O_WRONLY | os.O_APPEND)
        assert blob_bytes(container, name) == b"".join(parts) + b"more"
        fd = os.open(mount.path / name, os.O_WRONLY)
        os.pwrite(fd, b"mid", MiB + 5)
        os.close(fd)
        expected = bytearray(b"".join(parts) + b"more")
        expected[MiB + 5:MiB + 8] = b"mid"
        assert blob_bytes(container, name) == bytes(expected)


# -- append blobs ----------------------------------------------------------------------------


def make_append_blob(container: ContainerClient, name: str, data: bytes) -> None:
    blob = container.get_blob_client(name)
    blob.create_append_blob()
    blob.append_block(data)


def test_append_blob_stays_append_blob(mnt, container):
    make_append_blob(container, "ab", b"first;")
    appends = requests_of(mnt, "append_block")
    with open(mnt.path / "ab", "ab") as handle:
        handle.write(b"second;")
    assert blob_bytes(container, "ab") == b"first;second;"
    assert blob_type(container, "ab") == "AppendBlob"
    assert requests_of(mnt, "append_block") > appends
    fd = os.open(mnt.path / "ab", os.O_WRONLY)  # Distribution's resumed upload: seek to end
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, b"third" * 300_000)
    os.close(fd)
    assert blob_bytes(container, "ab") == b"first;second;" + b"third" * 300_000
    assert blob_type(container, "ab") == "AppendBlob"


def test_append_blob_overwritten_in_middle_becomes_block_blob(mnt, container):
    make_append_blob(container, "ab", b"0123456789")
    fd = os.open(mnt.path / "ab", os.O_WRONLY)
    os.pwrite(fd, b"XX", 3)
    os.close(fd)
    assert blob_bytes(container, "ab") == b"012XX56789"
    assert blob_type(container, "ab") == "BlockBlob"


def test_append_blob_truncated_becomes_block_blob(mnt, container):
    make_append_blob(container, "link", b"sha256:" + b"a" * 64)
    write_file(mnt.path / "link", b"sha256:" + b"b" * 64, os.O_WRONLY | os.O_TRUNC)
    assert blob_bytes(container, "link") == b"sha256:" + b"b" * 64
    assert blob_type(container, "link") == "BlockBlob"


# -- failures --------------------------------------------------------------------------------


@pytest.fixture
def private_azurite(tmp_path: Path):
    server = Azurite(persist_dir=str(tmp_path / "azurite-data")).start()
    yield server
    server.stop()


@pytest.mark.parametrize(("failing_call", "block_size"),
                         [("close", "8M"), ("fsync", "8M"), ("close", "1M")])
def test_commit_failure_reports_eio_and_keeps_old_blob(private_azurite, tmp_path, failing_call,
                                                       block_size):
    """Azurite stops before the commit (with 1M blocks, some were staged before): EIO, and
    after a restart the old blob is intact; the release after the EIO does not retry."""
    service = BlobServiceClient.from_connection_string(private_azurite.connection_string)
    container = service.create_container("failing")
    v1 = pattern(2 * MiB, 7)
    container.upload_blob("victim", v1)
    mount = start_mount(private_azurite, "failing", tmp_path / "mnt",
                        "-o", f"timeout=5,retries=1,block_size={block_size}")
    try:
        fd = os.open(mount.path / "victim", os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, pattern(6 * MiB, 8))
            private_azurite.stop()
            if failing_call == "fsync":
                with pytest.raises(OSError) as raised:
                    os.fsync(fd)
                assert raised.value.errno == errno.EIO
        finally:
            with pytest.raises(OSError) as raised:
                os.close(fd)
        assert raised.value.errno == errno.EIO
        private_azurite.start()
        assert container.download_blob("victim").readall() == v1
        errors = [line for line in mount.log().splitlines()
                  if " ERROR " in line and "victim" in line]
        expected = 2 if failing_call == "fsync" else 1  # one per failed call, no more
        assert len(errors) == expected, "\n".join(errors)
    finally:
        mount.unmount()
    assert container.download_blob("victim").readall() == v1


# -- metadata: mode, owner, times ------------------------------------------------------------


def test_chmod_chown_utime_survive_remount(mount_factory, container):
    mount = mount_factory(container.container_name)
    path = mount.path / "meta"
    path.write_bytes(b"data")
    os.chmod(path, 0o640)
    os.chown(path, 1234, 5678)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (mount.path / "d").mkdir()
    os.chmod(mount.path / "d", 0o750)
    metadata = container.get_blob_client("meta").get_blob_properties().metadata
    assert metadata["mode"] == "640"
    assert metadata["uid"] == "1234" and metadata["gid"] == "5678"
    mount.unmount()
    again = mount_factory(container.container_name, name="mnt2")
    st = os.stat(again.path / "meta")
    assert st.st_mode & 0o7777 == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert abs(st.st_mtime_ns - 1_600_000_000_123_456_789) < 1000
    assert os.stat(again.path / "d").st_mode & 0o7777 == 0o750
    assert (again.path / "meta").read_bytes() == b"data"


def test_write_after_utime_sets_mtime_to_now(mnt, container):
    fd = os.open(mnt.path / "w", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a")
        os.utime(fd, (1_000_000_000, 1_000_000_000))
        os.write(fd, b"b")
    finally:
        os.close(fd)
    metadata = container.get_blob_client("w").get_blob_properties().metadata
    assert "mtime" not in metadata  # Last-Modified, the commit's time, is the mtime
    assert os.stat(mnt.path / "w").st_mtime > 1_700_000_000


def test_cp_p_and_tar_keep_modes_and_times(mount_factory, container, tmp_path):
    need("cp")
    need("tar")
    mount = mount_factory(container.container_name)
    source = tmp_path / "src"
    source.mkdir()
    (source / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(source / "script.sh", 0o755)
    os.utime(source / "script.sh", (1_500_000_000, 1_500_000_000))
    (source / "secret").write_bytes(b"s")
    os.chmod(source / "secret", 0o600)
    os.utime(source / "secret", (1_400_000_000, 1_400_000_000))
    subprocess.run(["cp", "-p", str(source / "script.sh"), str(mount.path / "script.sh")],
                   check=True)
    st = os.stat(mount.path / "script.sh")
    assert st.st_mode & 0o7777 == 0o755 and int(st.st_mtime) == 1_500_000_000

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="tree")
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(mount.path)], check=True)
    mount.unmount()
    again = mount_factory(container.container_name, name="mnt2")
    for name, mode, mtime in (("script.sh", 0o755, 1_500_000_000),
                              ("secret", 0o600, 1_400_000_000)):
        st = os.stat(again.path / "tree" / name)
        assert st.st_mode & 0o7777 == mode, name
        assert int(st.st_mtime) == mtime, name
        assert (again.path / "tree" / name).read_bytes() == (source / name).read_bytes()
