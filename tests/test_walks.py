"""Walks of a registry on the mount -- garbage-collect, find, du -- and what they cost in
Azure requests (issue 17): flat pages of 5,000 blobs and a level listing for each directory
a page boundary falls in, not a request per directory; no GET of a link file whose name and
Content-MD5 say what it holds; nothing at all from a warm mount.

The registry is synthetic (testkit/synthetic.py: real digests, schema 2 manifests, tags,
layer links, 10% orphan blobs), written straight into the container with the SDK. The
mounts use dir_timeout=60, longer than any step here, so that the budgets count the pattern
of requests and not the machine's speed: how a walk refreshes listings that expire while it
runs is pinned by tests/test_scans_unit.py. bench/gc.py measures the same steps at scale."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from conftest import create_blobs, need

from azregfs.config import Config
from azregfs.demo.oci import registry_config
from azregfs.storage.driver import Driver
from testkit import synthetic


def requests(mount) -> Counter:
    return Counter(mount.stats()["driver"]["requests"])


def spent(mount, before: Counter) -> dict[str, int]:
    return {op: n for op, n in (requests(mount) - before).items() if n}


@pytest.fixture
def registry_data(container) -> synthetic.SyntheticRegistry:
    data = synthetic.build(repos=30, tags=3)
    synthetic.upload(container, data)
    return data


def garbage_collect(config: Path) -> str:
    return subprocess.run(["docker-registry", "garbage-collect", "--dry-run", str(config)],
                          check=True, capture_output=True, text=True, timeout=600).stdout


@pytest.mark.registry
def test_garbage_collect_costs_pages_and_manifests_not_directories_or_links(
        mount_factory, container, registry_data, tmp_path: Path) -> None:
    need("docker-registry")
    objects = len(registry_data.objects)
    manifests = registry_data.manifests
    mnt = mount_factory(container.container_name, "-o", "dir_timeout=60")
    config = tmp_path / "registry.yml"
    config.write_text(registry_config(mnt.path, 0))

    before = requests(mnt)
    output = garbage_collect(config)
    cold = spent(mnt, before)
    print(f"{objects} objects, {manifests} manifests; cold: {cold}")
    eligible = re.search(r"(\d+) blobs and (\d+) manifests eligible for deletion", output)
    assert eligible and int(eligible.group(1)) == len(registry_data.orphans), output[-500:]
    # The manifests are read (their content is unknown); their 3 links each are not.
    assert cold.get("read", 0) == manifests, cold
    # Lists: the walk's flat pages and the directories page boundaries fall in; with
    # listings fresh, the manifests' own directories under blobs/ come from the first
    # flat listing too (measured: 10 LIST, 4 HEAD for 1,139 objects).
    assert cold.get("list", 0) <= 15 and cold.get("head", 0) <= 5, cold
    assert sum(cold.values()) <= manifests + 20, cold  # native driver: ~6 per object

    before = requests(mnt)
    assert sorted(garbage_collect(config).splitlines()) == sorted(output.splitlines())
    warm = spent(mnt, before)
    print(f"warm: {warm}")
    assert warm == {}, warm  # every listing fresh, every manifest in the cache


def test_find_and_du_cost_a_request_per_page_not_per_directory(mount_factory, container) -> None:
    registry_data = synthetic.build(repos=100, tags=5)  # 6,284 objects: two pages
    synthetic.upload(container, registry_data)
    mnt = mount_factory(container.container_name, "-o", "dir_timeout=60")
    directories = {name.rsplit("/", depth)[0] for name in registry_data.objects
                   for depth in range(1, name.count("/") + 1)}
    before = requests(mnt)
    found = subprocess.run(["find", "."], cwd=mnt.path, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    cold = spent(mnt, before)
    print(f"{len(registry_data.objects)} objects in {len(directories)} directories; "
          f"find: {cold}")
    assert len([line for line in found if line.endswith(("/data", "/link"))]) == len(
        registry_data.objects)
    pages = -(-len(registry_data.objects) // 5000)
    # One flat page each time, and a level listing of each directory a boundary cuts
    # (the tree's top levels): about ten, against more than a thousand directories.
    assert cold.get("list", 0) <= pages + 10 and set(cold) == {"list"}, cold
    before = requests(mnt)
    du = subprocess.run(["du", "-s", "--apparent-size", "-B1", "."], cwd=mnt.path,
                        check=True, capture_output=True, text=True).stdout.split()[0]
    assert int(du) >= sum(len(data) for data in registry_data.objects.values())
    assert spent(mnt, before) == {}  # the same walk, while fresh: nothing


def read_every_file(root: Path) -> int:
    """A walk in name order that reads each file before going on, as garbage-collect does."""
    count = 0
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        if entry.is_dir(follow_symlinks=False):
            count += read_every_file(Path(entry.path))
        else:
            Path(entry.path).read_bytes()
            count += 1
    return count


def test_a_walk_slower_than_dir_timeout_costs_requests_per_dir_timeout_not_per_directory(
        mount_factory, container) -> None:
    """Directories of one file each (a registry's _layers links), walked while listings
    expire: the first listing comes from a lookup's flat listing of the small subtree, and
    its expiry was refreshed one directory at a time (792 LISTs for 1,000 directories in
    bench/fuse_floor.py's walk). It is a scan's page now, refreshed whole."""
    count, dir_timeout = 300, 0.2
    create_blobs(container, [f"w/d{i:04}/link" for i in range(count)], b"sha256:" + b"0" * 64)
    mnt = mount_factory(container.container_name, "-o", f"dir_timeout={dir_timeout}")
    before = requests(mnt)
    started = time.monotonic()
    assert read_every_file(mnt.path / "w") == count
    windows = (time.monotonic() - started) / dir_timeout
    walked = spent(mnt, before)
    print(f"{count} directories in {windows:.1f} dir_timeouts: {walked}")
    assert windows > 3, "the walk should outlast its listings"
    assert walked.get("list", 0) <= 2 + 2 * windows, walked


def test_a_page_asked_for_again_is_parsed_only_when_its_answer_changed(azurite, container) -> None:
    """What a walk's refresh relies on (fs/scans.py, _fetch): Azure answers the same LIST
    with the same body while nothing under it changed, so a page asked for again with the
    digest of the one the walk has is not parsed; any change to a blob in it is."""
    create_blobs(container, [f"p/{i:03}" for i in range(30)], b"x")
    driver = Driver(Config(connection_string=azurite.connection_string,
                           container=container.container_name))

    async def main() -> None:
        first = await driver.list_page("p/", None, 20)
        assert len(first.blobs) == 20 and first.next_marker and first.digest
        again = await driver.list_page("p/", None, 20, first.digest)
        assert again.unchanged and not again.blobs
        container.get_blob_client("p/007").upload_blob(b"y", overwrite=True)
        changed = await driver.list_page("p/", None, 20, first.digest)
        assert not changed.unchanged and len(changed.blobs) == 20
        assert changed.digest != first.digest
        second = await driver.list_page("p/", first.next_marker, 20, first.digest)
        assert not second.unchanged and len(second.blobs) == 10  # another page: parsed

    trio.run(main)
