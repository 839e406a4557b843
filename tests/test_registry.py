"""An unmodified registry (Debian's Distribution 2.8, filesystem driver) on the mount, driven
by skopeo and by its HTTP API, with the container checked through the SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import blob_names, need
from registry_util import (
    REGISTRY_PREFIX,
    blob_data_names,
    catalog_and_tags,
    chunked_upload,
    delete_manifest,
    get_blob,
    manifest_digest,
    prefix_dirs,
    request,
    torn_blobs,
    upload_files,
    wait_for,
    write_like_azure_driver_28,
)

from azregfs.demo.oci import (
    Image,
    MiB,
    Registry,
    build_image,
    read_image,
    skopeo_copy,
    verify_layout,
)

pytestmark = pytest.mark.registry

BIG_LAYER = 200 * MiB


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("docker-registry")
    need("skopeo")


@pytest.fixture(scope="session")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Four layers, one of 200 MiB (plain tar), two small gzipped ones."""
    layout = tmp_path_factory.mktemp("big-image")
    return build_image(layout, [BIG_LAYER, 3 * MiB, 64 * 1024, 1 * MiB], tag="v1", seed=200,
                       compress_below=4 * MiB)


@pytest.fixture(scope="session")
def medium_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    layout = tmp_path_factory.mktemp("medium-image")
    return build_image(layout, [12 * MiB, 1 * MiB, 10 * 1024], tag="v1", seed=12,
                       compress_below=4 * MiB)


@pytest.fixture
def registry_factory(mount_factory, tmp_path: Path) -> Iterator:
    """Registries are stopped before the mounts (this fixture depends on mount_factory)."""
    started: list[Registry] = []

    def make(rootdirectory: Path) -> Registry:
        registry = Registry(rootdirectory, tmp_path / f"registry-{len(started)}")
        started.append(registry)
        return registry.start()

    yield make
    for registry in started:
        registry.stop()


def push(image: Image, registry: Registry, reference: str) -> None:
    skopeo_copy(f"oci:{image.layout}:{image.tag}", f"docker://{registry.address}/{reference}")


def pull_and_compare(image: Image, registry: Registry, reference: str, into: Path) -> None:
    assert not into.exists()
    skopeo_copy(f"docker://{registry.address}/{reference}", f"oci:{into}:{image.tag}")
    pulled = read_image(into, image.tag)
    assert pulled.digests == image.digests
    assert verify_layout(pulled) == []


def assert_registry_layout(names: list[str], prefix: str = REGISTRY_PREFIX) -> None:
    assert names, "nothing was written"
    assert [n for n in names if not n.startswith(prefix)] == []
    assert prefix_dirs(names) == [], "directory markers left beside their children"


def test_push_pull_cross_repository_mount_catalog(
        big_image: Image, container, mount_factory, registry_factory, tmp_path: Path) -> None:
    mount = mount_factory(container.container_name)
    registry = registry_factory(mount.path)

    push(big_image, registry, "team/big:v1")
    names = blob_names(container)
    assert_registry_layout(names)
    for digest in big_image.digests:
        hexdigest = digest.split(":", 1)[1]
        assert f"{REGISTRY_PREFIX}blobs/sha256/{hexdigest[:2]}/{hexdigest}/data" in names
    big_layer = container.get_blob_client(
        f"{REGISTRY_PREFIX}blobs/sha256/{big_image.layers[0].digest[7:9]}/"
        f"{big_image.layers[0].digest[7:]}/data").get_blob_properties()
    assert big_layer.size == big_image.layers[0].size

    pull_and_compare(big_image, registry, "team/big:v1", tmp_path / "pulled")

    # The second repository gets the layers by cross-repository mount: link files only.
    up_before = mount.stats()["driver"]["bytes_up"]
    push(big_image, registry, "mirror/big:v1")
    assert mount.stats()["driver"]["bytes_up"] - up_before < BIG_LAYER // 10
    assert manifest_digest(registry, "mirror/big", "v1") == big_image.manifest.digest
    assert_registry_layout(blob_names(container))

    assert catalog_and_tags(registry) == {"mirror/big": ["v1"], "team/big": ["v1"]}


def test_chunked_upload_delete_and_garbage_collect(
        container, mount_factory, registry_factory, tmp_path: Path) -> None:
    doomed = build_image(tmp_path / "doomed", [2 * MiB, 300 * 1024], seed=1)
    kept = build_image(tmp_path / "kept", [2 * MiB, 300 * 1024], seed=2)
    mount = mount_factory(container.container_name)
    registry = registry_factory(mount.path)
    push(doomed, registry, "gc/doomed:latest")
    push(kept, registry, "gc/kept:latest")

    # Several PATCHes: each one resumes the upload and reopens its data file to append.
    data = os.urandom(5 * MiB + 12345)
    digest = chunked_upload(registry, "gc/chunks", data, chunk_size=1 * MiB + 7)
    assert get_blob(registry, "gc/chunks", digest) == data
    hexdigest = digest.split(":", 1)[1]
    stored = f"{REGISTRY_PREFIX}blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"
    assert container.download_blob(stored).readall() == data
    assert [n for n in blob_names(container) if "/_uploads/" in n] == []

    delete_manifest(registry, "gc/doomed", doomed.manifest.digest)
    status, _, _ = request(registry, "GET", f"/v2/gc/doomed/manifests/{doomed.manifest.digest}")
    assert status == 404
    registry.stop()
    result = registry.garbage_collect()
    assert result.returncode == 0, result.stderr

    remaining = blob_data_names(container)
    assert {d[7:] for d in kept.digests} <= remaining
    assert {d[7:] for d in doomed.digests}.isdisjoint(remaining)
    assert hexdigest not in remaining  # referenced by no manifest
    assert_registry_layout(blob_names(container))

    registry = registry_factory(mount.path)
    pull_and_compare(kept, registry, "gc/kept:latest", tmp_path / "pulled-kept")
    assert registry.tags("gc/kept") == ["latest"]


def test_serves_container_written_by_azure_driver_28(
        medium_image: Image, container, mount_factory, registry_factory, tmp_path: Path) -> None:
    local_store = tmp_path / "local-store"
    local = registry_factory(local_store)
    push(medium_image, local, "legacy/app:v1")
    local.stop()
    write_like_azure_driver_28(local_store, container, medium_image)
    names = blob_names(container)
    assert names and all(name.startswith("/docker/registry/v2/") for name in names)

    mount = mount_factory(container.container_name, "--rootdirectory", "/")
    assert os.listdir(mount.path) == ["docker"]
    registry = registry_factory(mount.path)
    assert catalog_and_tags(registry) == {"legacy/app": ["v1"]}
    pull_and_compare(medium_image, registry, "legacy/app:v1", tmp_path / "pulled")

    # What the registry writes now keeps the driver's names, so the driver could take over.
    newer = build_image(tmp_path / "newer", [1 * MiB], seed=28)
    push(newer, registry, "legacy/app:v2")
    names = blob_names(container)
    assert_registry_layout(names, prefix="/docker/registry/v2/")
    layer = newer.layers[0].digest[7:]
    assert f"/docker/registry/v2/blobs/sha256/{layer[:2]}/{layer}/data" in names
    assert "/docker/registry/v2/repositories/legacy/app/_manifests/tags/v2/current/link" in names


def test_two_mounts_push_through_one_pull_through_other(
        medium_image: Image, container, mount_factory, registry_factory, tmp_path: Path) -> None:
    writer = registry_factory(mount_factory(container.container_name, name="a").path)
    reader = registry_factory(mount_factory(container.container_name, name="b").path)
    assert reader.catalog() == []  # the reader has looked, and found nothing, before the push
    push(medium_image, writer, "shared/app:v1")
    pull_and_compare(medium_image, reader, "shared/app:v1", tmp_path / "pulled")
    assert catalog_and_tags(reader) == {"shared/app": ["v1"]}


def _push_until_big_upload(image: Image, registry: Registry, root: Path,
                           min_bytes: int) -> tuple[subprocess.Popen, Path, int]:
    """Start a push in the background; return once the big layer's upload file has grown
    past `min_bytes` (as the mount reports it)."""
    command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
               "--dest-tls-verify=false",
               f"oci:{image.layout}:{image.tag}", f"docker://{registry.address}/big/app:v1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def big_upload() -> tuple[Path, int] | None:
        if process.poll() is not None:
            raise AssertionError(f"push ended first: {process.stderr.read()}")  # type: ignore
        return next(((path, size) for path, size in upload_files(root) if size >= min_bytes),
                    None)

    path, size = wait_for(big_upload, 300, f"an upload of {min_bytes} bytes")
    return process, path, size


@pytest.mark.parametrize("options", [(), ("-o", "writeback_cache=true")],
                         ids=["default", "writeback_cache"])
def test_sigterm_during_push_commits_what_was_written(
        big_image: Image, container, mount_factory, registry_factory,
        options: tuple[str, ...]) -> None:
    """What is committed is a prefix of the layer: with the writeback cache too, where the
    kernel still holds pages and sends several at once when the daemon stops."""
    mount = mount_factory(container.container_name, *options)
    registry = registry_factory(mount.path)
    push_process, upload, written = _push_until_big_upload(big_image, registry, mount.path,
                                                           24 * MiB)
    try:
        mount.process.send_signal(signal.SIGTERM)
        assert mount.process.wait(timeout=120) == 0, mount.log()[-3000:]
        assert not os.path.ismount(mount.path)
    finally:
        registry.stop()
        push_process.kill()
        push_process.wait()

    name = REGISTRY_PREFIX + upload.relative_to(mount.path / REGISTRY_PREFIX).as_posix()
    committed = container.download_blob(name).readall()
    assert len(committed) >= written
    with open(big_image.layout / "blobs" / "sha256" / big_image.layers[0].digest[7:],
              "rb") as layer:
        assert committed == layer.read(len(committed))
    assert torn_blobs(container) == []


def test_sigkill_during_push_leaves_no_torn_blob_and_push_recovers(
        big_image: Image, container, mount_factory, registry_factory, tmp_path: Path) -> None:
    mount = mount_factory(container.container_name)
    registry = registry_factory(mount.path)
    push_process, _, _ = _push_until_big_upload(big_image, registry, mount.path, 40 * MiB)
    try:
        mount.process.kill()
        mount.process.wait()
    finally:
        registry.stop()
        push_process.kill()
        push_process.wait()
        subprocess.run(["fusermount3", "-uz", str(mount.path)], check=False)
    assert not os.path.ismount(mount.path)
    assert torn_blobs(container) == []

    remount = mount_factory(container.container_name, name="remount")
    registry = registry_factory(remount.path)
    push(big_image, registry, "big/app:v1")
    assert torn_blobs(container) == []
    pull_and_compare(big_image, registry, "big/app:v1", tmp_path / "pulled")


def test_demo_with_registry(tmp_path: Path) -> None:
    """`azregfs demo --registry` in a fresh directory: local Azurite, mount, registry, push;
    `azregfs demo --stop` ends all three."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE")}
    command = [sys.executable, "-m", "azregfs", "demo"]
    try:
        result = subprocess.run([*command, "--registry"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "catalog: ['sample/hello']" in result.stdout
        port = (tmp_path / ".demo" / "registry.port").read_text()
        registry = Registry(tmp_path / "mnt", tmp_path, port=int(port))
        assert registry.tags("sample/hello") == ["v1"]
    finally:
        stopped = subprocess.run([*command, "--stop"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not os.path.ismount(tmp_path / "mnt")
