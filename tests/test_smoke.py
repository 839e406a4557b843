"""The first thing that must work: mount, write, read back, see it in the container."""

import os

from conftest import blob_names


def test_write_read_list(mnt, container):
    (mnt.path / "dir").mkdir()
    (mnt.path / "dir" / "file.txt").write_bytes(b"hello")
    assert (mnt.path / "dir" / "file.txt").read_bytes() == b"hello"
    assert os.listdir(mnt.path) == ["dir"]
    assert blob_names(container) == ["dir/file.txt"]
    assert container.download_blob("dir/file.txt").readall() == b"hello"
