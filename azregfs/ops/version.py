"""The versions a bug report needs: azregfs and what it runs on."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import platform


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def libfuse_version() -> str:
    """The libfuse that pyfuse3 was loaded against (fuse_pkgversion since libfuse 3.10)."""
    for name in ("libfuse3.so.3", ctypes.util.find_library("fuse3")):
        if not name:
            continue
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            version = library.fuse_pkgversion
            version.restype = ctypes.c_char_p
            return version().decode()
        except AttributeError:
            number = library.fuse_version()
            return f"{number // 100}.{number % 100}"
    return "not found"


def version_line() -> str:
    return (f"azregfs {_package('azregfs')} (pyfuse3 {_package('pyfuse3')}, libfuse "
            f"{libfuse_version()}, trio {_package('trio')}, azure-storage-blob "
            f"{_package('azure-storage-blob')}, Python {platform.python_version()})")
