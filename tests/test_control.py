"""The control directory (control.py): MNT/.azregfs/{stats,pid,probe}, never listed, never
changed; and no extended attributes, so the kernel sends no GETXATTR before each write."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from azure.storage.blob import ContainerClient
from conftest import Mount, blob_names

from azregfs.fs import control


def test_control_files_are_read_but_never_listed(mnt: Mount) -> None:
    (mnt.path / "dir").mkdir()
    (mnt.path / "dir" / "f").write_bytes(b"x")
    assert sorted(os.listdir(mnt.path)) == ["dir"]
    found = subprocess.run(["find", str(mnt.path)], capture_output=True, text=True, check=True)
    assert ".azregfs" not in found.stdout
    assert sorted(os.listdir(mnt.path / ".azregfs")) == ["pid", "probe", "stats"]
    assert int(control.read(mnt.path, "pid")) == mnt.process.pid
    stats = json.loads(control.read(mnt.path, "stats"))
    assert stats["driver"]["requests"]["put"] == 1
    assert json.loads(control.read(mnt.path, "probe")) == {"ok": True}
    # Every open is a fresh snapshot, whatever the page cache holds.
    first = json.loads((mnt.path / ".azregfs" / "stats").read_bytes())
    (mnt.path / "g").write_bytes(b"y")
    again = json.loads(subprocess.run(["cat", str(mnt.path / ".azregfs" / "stats")],
                                      capture_output=True, check=True).stdout)
    assert again["driver"]["requests"]["put"] == first["driver"]["requests"]["put"] + 1
    assert os.stat(mnt.path / ".azregfs").st_mode & 0o777 == 0o555


def test_the_control_directory_cannot_be_changed(mnt: Mount, container: ContainerClient) -> None:
    control_dir = mnt.path / ".azregfs"
    attempts = [
        lambda: (control_dir / "new").write_bytes(b"x"),
        lambda: open(control_dir / "stats", "wb"),  # noqa: SIM115
        lambda: os.unlink(control_dir / "stats"),
        lambda: os.mkdir(control_dir / "sub"),
        lambda: os.rename(control_dir / "pid", control_dir / "pid2"),
        lambda: os.rename(control_dir, mnt.path / "elsewhere"),
        lambda: os.chmod(control_dir / "stats", 0o666),
        lambda: os.rmdir(control_dir),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno in (errno.EACCES, errno.EEXIST, errno.ENOTEMPTY), attempt
    (mnt.path / "f").write_bytes(b"x")
    with pytest.raises(OSError) as refused:
        os.rename(mnt.path / "f", control_dir)
    assert refused.value.errno in (errno.EACCES, errno.EISDIR)
    assert blob_names(container) == ["f"]


def test_blobs_under_the_reserved_name_are_not_shown(
        mount_factory, container: ContainerClient) -> None:
    container.upload_blob(".azregfs/stats", b"someone else's")
    container.upload_blob("kept", b"k")
    mount = mount_factory(container.container_name)
    assert os.listdir(mount.path) == ["kept"]
    assert "driver" in json.loads(control.read(mount.path, "stats"))


def test_writes_cost_no_getxattr_and_xattrs_are_unsupported(mnt: Mount) -> None:
    with open(mnt.path / "f", "wb", buffering=0) as handle:
        for _ in range(500):
            handle.write(b"x" * 4096)
    operations = mnt.stats()["fuse"]["operations"]
    assert operations["write"] >= 500
    assert operations.get("getxattr", 0) <= 1  # at most the one that turned them off
    with pytest.raises(OSError) as unsupported:
        os.getxattr(mnt.path / "f", "user.anything")
    assert unsupported.value.errno == errno.ENOTSUP
    assert mnt.stats()["fuse"]["operations"].get("getxattr", 0) <= 1
