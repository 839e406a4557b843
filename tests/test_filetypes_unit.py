"""filetypes.py alone: which metadata makes which kind of file."""

from __future__ import annotations

import stat

import pytest

from azregfs.fs import filetypes


def test_each_kind_round_trips_through_its_metadata() -> None:
    assert filetypes.file_type(filetypes.symlink_metadata()) == stat.S_IFLNK
    for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        metadata = filetypes.special_metadata(kind | 0o644, 0x0803)
        assert filetypes.file_type(metadata) == kind
        assert filetypes.rdev(metadata) == (0x0803 if kind in (stat.S_IFCHR, stat.S_IFBLK)
                                            else 0)


def test_unknown_or_missing_keys_mean_a_regular_file() -> None:
    for metadata in ({}, {"filetype": "teapot"}, {"is_symlink": "no"}, {"mode": "600"}):
        assert filetypes.file_type(metadata) == stat.S_IFREG
    assert filetypes.file_type({"is_symlink": "True"}) == stat.S_IFLNK  # blobfuse2's case
    assert filetypes.rdev({"filetype": "char", "rdev": "garbage"}) == 0
    assert filetypes.rdev({"rdev": "7"}) == 0  # not a device


def test_mknod_of_another_type_is_refused() -> None:
    for kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        with pytest.raises(ValueError):
            filetypes.special_metadata(kind | 0o644, 0)
