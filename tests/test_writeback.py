"""The writeback_cache option: the kernel gathers small writes, and what that keeps of the
consistency rules (close-to-open between hosts, errors at close, O_APPEND)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import time

import pytest
from azure.storage.blob import ContainerSasPermissions
from conftest import blob_names
from test_namespace import sas_mount_env

MiB = 1024 * 1024
WRITEBACK = ("-o", "writeback_cache=true")


def test_small_writes_reach_the_daemon_gathered(mount_factory, container) -> None:
    mnt = mount_factory(container.container_name, *WRITEBACK)
    data = os.urandom(8 * MiB)
    with open(mnt.path / "f", "wb", buffering=0) as handle:
        for start in range(0, len(data), 4096):
            handle.write(data[start:start + 4096])
    assert container.download_blob("f").readall() == data  # committed at close
    writes = mnt.stats()["fuse"]["operations"]["write"]
    assert writes <= len(data) // (32 * 1024), writes  # not one request per 4 KiB write


def test_another_hosts_change_is_seen_by_the_next_open(mount_factory, container) -> None:
    a = mount_factory(container.container_name, *WRITEBACK, name="a")
    b = mount_factory(container.container_name, *WRITEBACK, name="b")
    first, more = os.urandom(3 * MiB), os.urandom(MiB + 17)
    (a.path / "data").write_bytes(first)
    assert (b.path / "data").read_bytes() == first  # b now caches the file
    with open(a.path / "data", "r+b") as handle:  # a resumed upload: seek to the end
        handle.seek(0, os.SEEK_END)
        handle.write(more)
    time.sleep(1.2)  # entry_timeout: b looks the name up again
    assert os.stat(b.path / "data").st_size == len(first) + len(more)
    with open(b.path / "data", "rb") as handle:
        assert handle.seek(0, os.SEEK_END) == len(first) + len(more)
        handle.seek(0)
        assert hashlib.sha256(handle.read()).digest() == hashlib.sha256(first + more).digest()


def test_a_failed_commit_is_still_reported_by_close(azurite, mount_factory, container) -> None:
    env = sas_mount_env(azurite, container, ContainerSasPermissions(read=True, list=True))
    mnt = mount_factory(container.container_name, *WRITEBACK, env=env)
    with pytest.raises(OSError) as info, open(mnt.path / "new", "wb") as handle:
        handle.write(b"refused" * 1000)
    assert info.value.errno == errno.EACCES
    assert blob_names(container) == []


def test_o_append_writes_land_at_the_end(mount_factory, container) -> None:
    mnt = mount_factory(container.container_name, *WRITEBACK)
    (mnt.path / "log").write_bytes(b"start\n")
    first = os.open(mnt.path / "log", os.O_WRONLY | os.O_APPEND)
    second = os.open(mnt.path / "log", os.O_WRONLY | os.O_APPEND)
    try:
        for index in range(50):
            os.write(first if index % 2 else second, b"line %02d\n" % index)
    finally:
        os.close(first)
        os.close(second)
    expected = b"start\n" + b"".join(b"line %02d\n" % i for i in range(50))
    assert (mnt.path / "log").read_bytes() == expected
    assert container.download_blob("log").readall() == expected


def test_utime_is_kept_but_the_kernels_write_times_cost_nothing(mount_factory,
                                                               container) -> None:
    mnt = mount_factory(container.container_name, *WRITEBACK)
    for index in range(5):
        (mnt.path / f"f{index}").write_bytes(b"x" * 100_000)
    requests = mnt.stats()["driver"]["requests"]
    assert "set_metadata" not in requests and "head" not in requests, requests
    os.utime(mnt.path / "f0", (1_000_000_000, 1_500_000_000))
    mnt.unmount()
    again = mount_factory(container.container_name, *WRITEBACK, name="again")
    assert os.stat(again.path / "f0").st_mtime == 1_500_000_000


def test_sigterm_saves_what_the_kernel_still_holds(mount_factory, container) -> None:
    """Data written to a descriptor still open may sit in the kernel's page cache; a stop
    (systemctl stop, SIGTERM) asks the kernel for it before the last commits."""
    mnt = mount_factory(container.container_name, *WRITEBACK)
    data = os.urandom(3 * MiB + 123)
    fd = os.open(mnt.path / "open", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, data)
        mnt.process.send_signal(signal.SIGTERM)
        assert mnt.process.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone under it
            os.close(fd)
    assert container.download_blob("open").readall() == data
