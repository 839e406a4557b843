"""RecentFailures (recent.py): the kernel's repeats of a failed request are answered at once."""

from __future__ import annotations

import errno
import time

import pytest

from azregfs.fs.nodes import FSError
from azregfs.storage.driver import StorageError
from azregfs.storage.recent import RecentFailures


def test_a_storage_failure_is_raised_again_as_a_repeat_of_the_same_type() -> None:
    failures: RecentFailures[str] = RecentFailures()
    failures.check("a")  # nothing noted: no error
    failures.note("a", StorageError(errno.EIO, "read of a: HTTP 500"))
    with pytest.raises(StorageError) as repeat:
        failures.check("a")
    assert repeat.value.errno == errno.EIO and repeat.value.repeated
    assert "HTTP 500" in str(repeat.value)
    failures.check("b")  # another key is asked as usual


def test_only_eio_is_remembered() -> None:
    failures: RecentFailures[str] = RecentFailures()
    failures.note("gone", StorageError(errno.ESTALE, "changed"))
    failures.note("absent", FSError(errno.ENOENT))
    failures.check("gone")
    failures.check("absent")
    assert len(failures) == 0


def test_a_failure_is_forgotten_after_its_moment_or_when_told() -> None:
    failures: RecentFailures[str] = RecentFailures(seconds=0.05)
    failures.note("a", FSError(errno.EIO, "lookup of a: connection reset"))
    with pytest.raises(FSError) as repeat:
        failures.check("a")
    assert repeat.value.repeated and repeat.value.message
    time.sleep(0.06)
    failures.check("a")
    failures.note("a", FSError(errno.EIO))
    failures.forget("a")
    failures.check("a")


def test_memory_is_bounded_in_keys() -> None:
    failures: RecentFailures[int] = RecentFailures(maxsize=8)
    for key in range(100):
        failures.note(key, StorageError(errno.EIO, "x"))
    assert len(failures) == 8
