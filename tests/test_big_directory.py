"""A directory of 20,000 blobs lists completely, across List pages of 5,000.

In a module of its own, hence an Azurite of its own (tests/conftest.py): Azurite looks a
blob up by scanning every blob of the account, deleted containers' included, so 20,000
uploads take minutes, and every test after them in the same Azurite ran slower until
uploads of 3,000 blobs timed out (60 s a request) in CI.
"""

from __future__ import annotations

import os

from azure.storage.blob import ContainerClient
from conftest import create_blobs


def test_a_directory_of_20000_blobs_lists_completely(mount_factory,
                                                     container: ContainerClient) -> None:
    names = [f"big/{index:05d}" for index in range(20000)]
    create_blobs(container, names)
    mnt = mount_factory(container.container_name)
    listed = os.listdir(mnt.path / "big")
    assert len(listed) == 20000
    assert sorted(listed) == [name[4:] for name in names]
    assert mnt.stats()["driver"]["requests"]["list"] >= 4  # pages of 5000
