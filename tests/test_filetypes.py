"""Symlinks, FIFOs, sockets, device nodes and hard links through a real mount, and the
round trips operators make with them: rsync -a, tar and cp -a, in and back out.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from azure.storage.blob import ContainerClient
from conftest import Mount, blob_names, need


def properties(container: ContainerClient, name: str):
    return container.get_blob_client(name).get_blob_properties()


def test_a_symlink_is_a_blob_holding_its_target(mnt: Mount, container: ContainerClient) -> None:
    target = "../some dir/naïve target"  # kept byte for byte, dangling or not
    os.mkdir(mnt.path / "d")
    os.symlink(target, mnt.path / "d" / "link")
    assert os.readlink(mnt.path / "d" / "link") == target
    info = os.lstat(mnt.path / "d" / "link")
    assert stat.S_ISLNK(info.st_mode) and info.st_size == len(target.encode())
    assert blob_names(container) == ["d/link"]
    assert container.download_blob("d/link").readall() == target.encode()
    assert properties(container, "d/link").metadata.get("is_symlink") == "true"
    with pytest.raises(FileExistsError):
        os.symlink("elsewhere", mnt.path / "d" / "link")
    os.lchown(mnt.path / "d" / "link", 123, 456)
    assert (os.lstat(mnt.path / "d" / "link").st_uid, os.readlink(mnt.path / "d" / "link")) \
        == (123, target)
    os.rename(mnt.path / "d" / "link", mnt.path / "moved")
    assert os.readlink(mnt.path / "moved") == target
    assert os.lstat(mnt.path / "moved").st_uid == 123
    os.unlink(mnt.path / "moved")
    assert "moved" not in blob_names(container)


def test_links_follow_to_files_and_directories(mnt: Mount) -> None:
    os.mkdir(mnt.path / "real")
    (mnt.path / "real" / "f").write_bytes(b"through the link")
    os.symlink("real", mnt.path / "alias")
    assert (mnt.path / "alias" / "f").read_bytes() == b"through the link"
    assert os.path.isdir(mnt.path / "alias") and os.path.islink(mnt.path / "alias")
    assert sorted(os.listdir(mnt.path)) == ["alias", "real"]


def test_a_link_made_by_another_tool_reads_as_a_link(mount_factory,
                                                     container: ContainerClient) -> None:
    """blobfuse2 writes links the same way: each tool sees the other's."""
    container.upload_blob("bf2link", b"/etc/hostname", metadata={"is_symlink": "true"})
    container.upload_blob("plain", b"x", metadata={"filetype": "unknown-kind"})
    mnt = mount_factory(container.container_name)
    assert os.readlink(mnt.path / "bf2link") == "/etc/hostname"
    assert stat.S_ISREG(os.lstat(mnt.path / "plain").st_mode)
    with pytest.raises(OSError) as info:
        os.readlink(mnt.path / "plain")
    assert info.value.errno == errno.EINVAL


def test_fifos_sockets_and_devices_keep_their_type_and_number(
        mount_factory, container: ContainerClient, tmp_path: Path) -> None:
    mnt = mount_factory(container.container_name)
    os.mkfifo(mnt.path / "fifo", 0o640)
    os.mknod(mnt.path / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(mnt.path / "blk", stat.S_IFBLK | 0o644, os.makedev(7, 42))
    os.mknod(mnt.path / "reg", stat.S_IFREG | 0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(mnt.path / "sock"))
    assert properties(container, "fifo").size == 0
    assert properties(container, "chr").metadata["rdev"] == str(os.makedev(1, 3))
    os.chmod(mnt.path / "fifo", 0o604)  # the type survives a chmod
    mnt.unmount()
    again = mount_factory(container.container_name, name="again")
    kinds = {name: os.lstat(again.path / name) for name in os.listdir(again.path)}
    assert stat.S_ISFIFO(kinds["fifo"].st_mode) and stat.S_IMODE(kinds["fifo"].st_mode) == 0o604
    assert stat.S_ISCHR(kinds["chr"].st_mode) and kinds["chr"].st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(kinds["blk"].st_mode) and kinds["blk"].st_rdev == os.makedev(7, 42)
    assert stat.S_ISREG(kinds["reg"].st_mode) and stat.S_IMODE(kinds["reg"].st_mode) == 0o600
    assert stat.S_ISSOCK(kinds["sock"].st_mode)
    # The kernel serves the FIFO itself: a writer and a reader meet through it.
    writer = subprocess.Popen(["sh", "-c", f"echo through > '{again.path / 'fifo'}'"])
    assert (again.path / "fifo").read_bytes() == b"through\n"
    assert writer.wait(timeout=10) == 0
    with pytest.raises(PermissionError):  # a FUSE mount is nodev: its devices stay shut
        open(again.path / "chr", "rb")  # noqa: SIM115


def test_hard_links_are_refused_with_eperm(mnt: Mount, container: ContainerClient) -> None:
    (mnt.path / "f").write_bytes(b"one name")
    with pytest.raises(OSError) as info:
        os.link(mnt.path / "f", mnt.path / "second")
    assert info.value.errno == errno.EPERM
    assert blob_names(container) == ["f"] and os.lstat(mnt.path / "f").st_nlink == 1


def make_tree(root: Path) -> None:
    """What operators copy: odd modes, links (relative, absolute, dangling), a FIFO, empty
    directories, old mtimes."""
    (root / "etc" / "conf.d").mkdir(parents=True)
    (root / "etc" / "conf.d" / "a.conf").write_text("a=1\n")
    (root / "etc" / "secret").write_bytes(b"k" * 1000)
    os.chmod(root / "etc" / "secret", 0o600)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "empty" / "deeper").mkdir(parents=True)
    os.chmod(root / "empty", 0o700)
    os.symlink("../etc/conf.d/a.conf", root / "bin" / "relative")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("etc", root / "dirlink")
    os.mkfifo(root / "pipe", 0o620)
    (root / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    for path in [root / "etc" / "secret", root / "big", root / "bin" / "tool", root / "pipe"]:
        os.utime(path, (1_500_000_000, 1_500_000_123))
    for path in [root / "dangling", root / "bin" / "relative"]:
        os.utime(path, (1_400_000_000, 1_400_000_000), follow_symlinks=False)
    os.utime(root / "empty", (1_600_000_000, 1_600_000_000))


def differences(left: Path, right: Path) -> str:
    """What rsync would change to make right like left (checksums, modes, times, links,
    devices): empty when identical."""
    result = subprocess.run(
        ["rsync", "-acD", "--dry-run", "--itemize-changes", f"{left}/", f"{right}/"],
        capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("tool", ["rsync", "tar", "cp"])
def test_a_tree_goes_in_and_comes_back_out_identical(tool: str, mnt: Mount,
                                                     tmp_path: Path) -> None:
    need("rsync")
    source, back = tmp_path / "source", tmp_path / "back"
    source.mkdir()
    make_tree(source)
    inside = mnt.path / "copy"
    if tool == "rsync":
        subprocess.run(["rsync", "-a", f"{source}/", f"{inside}/"], check=True)
        subprocess.run(["rsync", "-a", f"{inside}/", f"{back}/"], check=True)
    elif tool == "tar":
        for src, dst in ((source, inside), (inside, back)):
            dst.mkdir()
            subprocess.run(f"tar -C '{src}' -cf - . | tar -C '{dst}' -xpf -", shell=True,
                           check=True)
    else:
        subprocess.run(["cp", "-a", str(source), str(inside)], check=True)
        subprocess.run(["cp", "-a", str(inside), str(back)], check=True)
    assert differences(source, inside) == ""
    assert differences(source, back) == ""
    assert differences(back, source) == ""


def test_what_a_user_creates_is_owned_by_that_user(mount_factory,
                                                   container: ContainerClient) -> None:
    """pjdfstest's chmod/05: a file made by uid 65534 is its own to chmod, on this mount and
    on the next (its owner is kept in metadata, as chown keeps it)."""
    mnt = mount_factory(container.container_name, "--allow-other")
    os.mkdir(mnt.path / "shared", 0o777)
    os.chmod(mnt.path / "shared", 0o777)
    # Relative names from inside: pytest's tmp_path is root's alone (0700).
    script = ("import os; os.setgid(65534); os.setuid(65534); open('mine', 'w').close(); "
              "os.chmod('mine', 0o642); os.mkdir('sub', 0o700); os.symlink('mine', 'link')")
    subprocess.run(["python3", "-c", script], check=True, cwd=mnt.path / "shared")
    for name in ("mine", "sub", "link"):
        info = os.lstat(mnt.path / "shared" / name)
        assert (info.st_uid, info.st_gid) == (65534, 65534), name
    assert stat.S_IMODE(os.stat(mnt.path / "shared" / "mine").st_mode) == 0o642
    props = properties(container, "shared/mine")
    assert (props.metadata["uid"], props.metadata["gid"]) == ("65534", "65534")
    os.utime(mnt.path / "shared", (1, 1))
    before = os.stat(mnt.path / "shared").st_mtime
    (mnt.path / "shared" / "another").write_bytes(b"")  # a new entry: the directory's
    assert os.stat(mnt.path / "shared").st_mtime > before  # mtime moves, as POSIX wants


def test_times_keep_their_nanoseconds_and_atime_its_own_value(mnt: Mount) -> None:
    """utimensat(2) sets atime and mtime apart, to the nanosecond (rsync -a --atimes, tar)."""
    path = mnt.path / "f"
    path.write_bytes(b"x")
    os.utime(path, ns=(1_900_000_000_100_000_000, 1_950_000_000_123_456_789))
    info = os.stat(path)
    assert (info.st_atime_ns, info.st_mtime_ns) == (1_900_000_000_100_000_000,
                                                    1_950_000_000_123_456_789)
    os.utime(mnt.path, ns=(5, 7))  # the root has no blob: kept while mounted
    assert (os.stat(mnt.path).st_atime_ns, os.stat(mnt.path).st_mtime_ns) == (5, 7)
    os.chown(mnt.path, 0, 0)  # ctime moves on an attribute change; mtime stays
    assert os.stat(mnt.path).st_ctime_ns > 7 and os.stat(mnt.path).st_mtime_ns == 7
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert os.fstat(fd).st_nlink == 0  # unlinked while open
    finally:
        os.close(fd)
