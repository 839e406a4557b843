"""A directory bigger than one List page (5,000 blobs) lists completely: 10,001 blobs come
in pages of 5,000, 5,000 and 1, so both continuations and a last page of one are crossed.

In a module of its own, hence an Azurite of its own (tests/conftest.py), started first.
Azurite finds a blob by scanning every blob of the account (LokiJS ``Resultset.find``: 61%
of its CPU while uploading), so uploads cost time quadratic in the blobs held: 6,000 took
59 s, 10,000 about 160 s, and 20,000 took 587 s of the suite's 1,232 s in CI; every test
after them in the same Azurite ran slower, until uploads timed out (60 s a request). Bigger
directories (20,000 and 100,000 blobs) are measured by ``bench/walk.py``, not here.
"""

from __future__ import annotations

import os

from azure.storage.blob import ContainerClient
from conftest import create_blobs

PAGE = 5000  # Azure's largest List page


def test_a_directory_of_three_list_pages_lists_completely(mount_factory,
                                                          container: ContainerClient) -> None:
    names = [f"big/{index:05d}" for index in range(2 * PAGE + 1)]
    create_blobs(container, names)
    mnt = mount_factory(container.container_name)
    listed = os.listdir(mnt.path / "big")
    assert sorted(listed) == [name[4:] for name in names]
    assert mnt.stats()["driver"]["requests"]["list"] >= 3  # pages of 5,000, 5,000 and 1
