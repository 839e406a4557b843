"""Renames through a real mount: files (server-side copy + delete, never a re-upload),
across directories, over existing files, while still open with pending writes, whole
directories (markers included), and the renameat2 flags.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random

import pytest
from azure.storage.blob import ContainerClient
from conftest import blob_names, fsync_dir

MiB = 1024 * 1024
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def blob_bytes(container: ContainerClient, name: str) -> bytes:
    return container.download_blob(name).readall()


def bytes_up(mount) -> int:
    return mount.stats()["driver"]["bytes_up"]


def renameat2(old: os.PathLike, new: os.PathLike, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("this libc has no renameat2 (glibc 2.28+ has it)")
    result = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def test_rename_file_copies_server_side(mnt, container):
    data = random.Random(1).randbytes(4 * MiB)
    (mnt.path / "a").write_bytes(data)
    before = bytes_up(mnt)
    os.rename(mnt.path / "a", mnt.path / "b")
    assert bytes_up(mnt) - before < MiB  # a copy, not a re-upload
    assert blob_names(container) == ["b"]
    assert blob_bytes(container, "b") == data
    assert os.listdir(mnt.path) == ["b"]
    assert (mnt.path / "b").read_bytes() == data
    assert not (mnt.path / "a").exists()


def test_rename_across_directories(mnt, container):
    (mnt.path / "_uploads" / "u1").mkdir(parents=True)
    (mnt.path / "blobs" / "ab").mkdir(parents=True)
    (mnt.path / "_uploads" / "u1" / "data").write_bytes(b"layer bytes")
    os.rename(mnt.path / "_uploads" / "u1" / "data", mnt.path / "blobs" / "ab" / "data")
    assert (mnt.path / "blobs" / "ab" / "data").read_bytes() == b"layer bytes"
    assert os.listdir(mnt.path / "_uploads" / "u1") == []  # the source directory stays
    assert "blobs/ab/data" in blob_names(container)
    assert "_uploads/u1/data" not in blob_names(container)
    assert blob_bytes(container, "blobs/ab/data") == b"layer bytes"


def test_rename_over_existing_file_replaces_it(mnt, container):
    container.upload_blob("target", b"old target content")
    (mnt.path / "source").write_bytes(b"new")
    assert (mnt.path / "target").read_bytes() == b"old target content"
    os.rename(mnt.path / "source", mnt.path / "target")
    assert blob_names(container) == ["target"]
    assert blob_bytes(container, "target") == b"new"
    assert (mnt.path / "target").read_bytes() == b"new"
    assert os.stat(mnt.path / "target").st_size == 3


def test_rename_while_open_with_pending_writes(mnt, container):
    fd = os.open(mnt.path / "tmp.123", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"first ")
        os.rename(mnt.path / "tmp.123", mnt.path / "final")
        os.write(fd, b"second")
    finally:
        os.close(fd)
    assert blob_names(container) == ["final"]
    assert blob_bytes(container, "final") == b"first second"
    assert os.listdir(mnt.path) == ["final"]
    assert (mnt.path / "final").read_bytes() == b"first second"


def test_put_content_pattern_tmp_fsync_rename_over_then_close(mnt, container):
    """Distribution 3.1+ PutContent: write a .tmp, fsync, rename it over the target while
    still open, close, fsync the parent directory."""
    (mnt.path / "repo").mkdir()
    container.upload_blob("repo/link", b"sha256:old")
    tmp = mnt.path / "repo" / "link.4f1c.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"sha256:new")
        os.fsync(fd)
        os.rename(tmp, mnt.path / "repo" / "link")
    finally:
        os.close(fd)
    dir_fd = os.open(mnt.path / "repo", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    assert blob_names(container) == ["repo/link"]
    assert blob_bytes(container, "repo/link") == b"sha256:new"
    assert (mnt.path / "repo" / "link").read_bytes() == b"sha256:new"


def test_rename_large_open_file_with_staged_blocks(mount_factory, container):
    mount = mount_factory(container.container_name, "-o", "block_size=1M")
    data = random.Random(2).randbytes(5 * MiB + 77)
    fd = os.open(mount.path / "big.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[: 3 * MiB])
        os.rename(mount.path / "big.tmp", mount.path / "big")
        os.write(fd, data[3 * MiB:])
    finally:
        os.close(fd)
    assert blob_names(container) == ["big"]
    assert blob_bytes(container, "big") == data


def test_rename_directory_moves_every_blob(mnt, container):
    root = mnt.path / "old"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "f1").write_bytes(b"1")
    (root / "sub" / "f2").write_bytes(b"2")
    (root / "sub" / "deep" / "f3").write_bytes(b"3")
    fsync_dir(root / "empty")
    assert "old/empty" in blob_names(container)  # the marker of the empty directory
    os.rename(root, mnt.path / "new")
    assert blob_names(container) == ["new/empty", "new/f1", "new/sub/deep/f3", "new/sub/f2"]
    marker = container.get_blob_client("new/empty").get_blob_properties()
    assert marker.metadata.get("hdi_isfolder") == "true"
    assert os.listdir(mnt.path) == ["new"]
    assert sorted(os.listdir(mnt.path / "new")) == ["empty", "f1", "sub"]
    assert (mnt.path / "new" / "sub" / "deep" / "f3").read_bytes() == b"3"
    assert os.path.isdir(mnt.path / "new" / "empty")
    assert not os.path.exists(mnt.path / "old")


def test_rename_empty_directory_marker(mnt, container):
    (mnt.path / "lonely").mkdir()
    fsync_dir(mnt.path / "lonely")
    os.rename(mnt.path / "lonely", mnt.path / "moved")
    assert blob_names(container) == ["moved"]
    assert os.path.isdir(mnt.path / "moved")


def test_rename_empty_directory_before_its_marker(mnt, container):
    (mnt.path / "fresh").mkdir()
    os.rename(mnt.path / "fresh", mnt.path / "moved")
    assert blob_names(container) == []  # neither name had a blob yet
    assert os.listdir(mnt.path) == ["moved"]
    fsync_dir(mnt.path / "moved")
    assert blob_names(container) == ["moved"]


def test_rename_noreplace(mnt, container):
    (mnt.path / "a").write_bytes(b"a")
    (mnt.path / "b").write_bytes(b"b")
    with pytest.raises(OSError) as raised:
        renameat2(mnt.path / "a", mnt.path / "b", RENAME_NOREPLACE)
    assert raised.value.errno == errno.EEXIST
    assert blob_bytes(container, "b") == b"b"
    renameat2(mnt.path / "a", mnt.path / "c", RENAME_NOREPLACE)
    assert blob_names(container) == ["b", "c"]
    assert blob_bytes(container, "c") == b"a"


def test_rename_exchange_is_refused(mnt, container):
    (mnt.path / "a").write_bytes(b"a")
    (mnt.path / "b").write_bytes(b"b")
    with pytest.raises(OSError) as raised:
        renameat2(mnt.path / "a", mnt.path / "b", RENAME_EXCHANGE)
    assert raised.value.errno == errno.EINVAL
    assert blob_bytes(container, "a") == b"a"
    assert blob_bytes(container, "b") == b"b"


def test_rename_missing_source(mnt):
    with pytest.raises(FileNotFoundError):
        os.rename(mnt.path / "nope", mnt.path / "other")


def test_rename_directory_over_file_and_into_itself(mnt):
    (mnt.path / "d" / "inner").mkdir(parents=True)
    (mnt.path / "f").write_bytes(b"f")
    with pytest.raises(NotADirectoryError):
        os.rename(mnt.path / "d", mnt.path / "f")
    with pytest.raises(OSError) as raised:
        os.rename(mnt.path / "d", mnt.path / "d" / "inner" / "x")
    assert raised.value.errno == errno.EINVAL


def test_open_reader_survives_renames(mnt, container):
    data = random.Random(3).randbytes(3 * MiB)
    (mnt.path / "d").mkdir()
    (mnt.path / "d" / "f").write_bytes(data)
    with open(mnt.path / "d" / "f", "rb", buffering=0) as reader:
        assert reader.read(10) == data[:10]
        os.rename(mnt.path / "d" / "f", mnt.path / "d" / "g")
        assert reader.read(MiB) == data[10:MiB + 10]
        os.rename(mnt.path / "d", mnt.path / "e")
        assert reader.read() == data[MiB + 10:]
    assert blob_names(container) == ["e/g"]
    assert (mnt.path / "e" / "g").read_bytes() == data


def test_rename_block_blob_over_append_blob(mnt, container):
    """Distribution 3.1 PutContent over a `link` the v3 azure driver wrote as an append blob:
    Azure's Copy Blob cannot overwrite a blob of another type, so the mount must not try."""
    link = container.get_blob_client("repo/link")
    link.create_append_blob()
    link.append_block(b"sha256:old")
    tmp = mnt.path / "repo" / "link.5e2a.tmp"
    tmp.write_bytes(b"sha256:new")
    os.rename(tmp, mnt.path / "repo" / "link")
    assert blob_names(container) == ["repo/link"]
    assert blob_bytes(container, "repo/link") == b"sha256:new"
    kind = link.get_blob_properties().blob_type
    assert getattr(kind, "value", str(kind)) == "BlockBlob"
    assert (mnt.path / "repo" / "link").read_bytes() == b"sha256:new"


def test_rename_directory_with_a_file_open_for_writing(mnt, container):
    (mnt.path / "_uploads" / "u1").mkdir(parents=True)
    fd = os.open(mnt.path / "_uploads" / "u1" / "data", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"part one, ")
        os.rename(mnt.path / "_uploads" / "u1", mnt.path / "_uploads" / "u2")
        os.write(fd, b"part two")
    finally:
        os.close(fd)
    assert blob_names(container) == ["_uploads/u2/data"]
    assert blob_bytes(container, "_uploads/u2/data") == b"part one, part two"
    assert (mnt.path / "_uploads" / "u2" / "data").read_bytes() == b"part one, part two"
