"""Test fixtures: one Azurite for the session, a fresh container per test, and mounts made
through azregfs's own CLI in a subprocess (``--foreground``), always unmounted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient, ContainerClient

from azregfs.demo.azurite import Azurite
from azregfs.fs import control
from testkit.faultproxy import FaultProxy

# Modules that take minutes (Azurite's uploads cost time quadratic in the blobs it holds;
# distribution's suite is built and run; a 6,000-object registry is uploaded; outages are
# waited out) start first: with one module per worker (scripts/test, which keeps this order:
# xdist would otherwise start the modules with the most tests first), the longest ones then
# run beside the rest instead of after it.
LONGEST_FIRST = ("test_big_directory.py", "test_distribution_suite.py", "test_namespace.py",
                 "test_faults.py", "test_walks.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    """One in-memory Azurite per test module. Azurite never gives back the memory of a
    deleted container within a run: one Azurite for the whole suite grew to 7 GB and spent
    its time collecting garbage, until a request hung."""
    server = Azurite().start()
    yield server
    server.stop()


@pytest.fixture
def container_name() -> str:
    return "t" + uuid.uuid4().hex[:20]


@pytest.fixture
def container(azurite: Azurite, container_name: str) -> Iterator[ContainerClient]:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(container_name)
    # The name is new: "already exists" means the SDK retried a create whose answer was
    # lost (a busy Azurite past the read timeout), not a clash.
    with contextlib.suppress(ResourceExistsError):
        client.create_container()
    yield client
    with contextlib.suppress(Exception):  # Azurite may already be stopped by the test
        client.delete_container()


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        return json.loads(control.read(self.path, "stats"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unmount(self, timeout: float = 60) -> int:
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            subprocess.run(["fusermount3", "-uz", str(self.path)], check=False)
            return -9


def azregfs_command() -> list[str]:
    return [sys.executable, "-m", "azregfs"]


def start_mount(
    azurite: Azurite, container: str, path: Path, *extra: str,
    env: dict[str, str] | None = None, timeout: float = 30,
) -> Mount:
    path.mkdir(parents=True, exist_ok=True)
    log_path = path.parent / f"{path.name}.log"
    full_env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    full_env.update(env or {})
    args = [*azregfs_command(), "mount", "--foreground", "--log-level", "DEBUG",
            *extra, container, str(path)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if process.poll() is not None:
            raise RuntimeError(f"mount exited {process.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"mount not live after {timeout}s: {log_path.read_text()}")
        time.sleep(0.05)
    return Mount(path, process, log_path, args)


def mount_through(proxy: FaultProxy, azurite: Azurite, mount_factory, container: ContainerClient,
                  *options: str, name: str = "mnt") -> Mount:
    """A mount whose every Azure request goes through the proxy (rules are added after the
    mount's pre-flight check, so it never meets a fault)."""
    return mount_factory(container.container_name, *options, name=name,
                         env={"AZURE_STORAGE_CONNECTION_STRING": proxy.connection_string(azurite)})


@pytest.fixture
def mount_factory(azurite: Azurite, tmp_path: Path) -> Iterator:
    mounts: list[Mount] = []

    def make(container: str, *extra: str, name: str = "mnt", **kwargs) -> Mount:
        mount = start_mount(azurite, container, tmp_path / name, *extra, **kwargs)
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        mount.unmount()


@pytest.fixture
def mnt(mount_factory, container: ContainerClient) -> Mount:
    """The default: a mount of a fresh, empty container."""
    return mount_factory(container.container_name)


def create_blobs(container: ContainerClient, names: list[str], data: bytes = b"") -> None:
    """Upload many small blobs with the SDK, 32 at a time."""
    def upload(name: str) -> None:
        container.upload_blob(name, data, overwrite=True)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(upload, names))


def blob_names(container: ContainerClient) -> list[str]:
    return sorted(blob.name for blob in container.list_blobs())


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (scripts/install installs it)")


def fsync_dir(path: Path) -> None:
    """fsync(2) on a directory: the point where a directory made on the mount is durable
    (its marker blob, deferred until then or marker_delay, is written)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
