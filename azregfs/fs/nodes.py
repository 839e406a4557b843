"""What the namespace is made of: nodes (one per path the kernel knows), the entries of a
directory listing, the errno-carrying FSError, and the '/'-joined relative paths they use
('' is the root).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..storage.driver import BlobInfo


class FSError(Exception):
    """An errno for the kernel plus an optional log line (None: nothing worth logging)."""

    repeated = False  # a failure remembered a moment ago (recent.py), not asked again

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code
        self.message = message


@dataclass(slots=True)
class Node:
    inode: int
    path: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str = ""
    blob_type: str = "BlockBlob"
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    content_md5: bytes | None = None
    marker: bool = False  # a directory whose marker blob exists
    lookups: int = 0
    opens: int = 0
    writing: bool = False  # a write session owns size/mtime; never refreshed from Azure
    checked_at: float = 0.0  # monotonic time the attributes were last read from Azure
    former: str = ""  # replaced (renamed over) or deleted: the path it had
    link: tuple[str, bytes] | None = None  # a symlink's (ETag, target), once read
    changed_at: float = 0.0  # last chmod/chown/utime/truncate here: ctime, in memory only

    @property
    def gone(self) -> bool:
        """Its name now belongs to another node, or to nothing (an inode the kernel holds)."""
        return self.path.startswith("\0")

    def absorb(self, info: BlobInfo) -> None:
        self.size = info.size
        self.etag = info.etag
        self.blob_type = info.blob_type
        self.metadata = dict(info.metadata)
        self.content_type = info.content_type
        self.content_md5 = info.content_md5
        self.mtime = mtime_of(info)
        self.checked_at = time.monotonic()


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory listing."""

    is_dir: bool
    info: BlobInfo | None  # the file's blob, a directory's marker, or None (implicit dir)


def mtime_of(info: BlobInfo) -> float:
    try:
        return float(info.metadata.get("mtime", "")) or info.mtime
    except ValueError:
        return info.mtime


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def is_under(path: str, top: str) -> bool:
    """path is top or below it ('' is the root, above everything)."""
    return not top or path == top or path.startswith(top + "/")


def ancestors(path: str) -> Iterable[str]:
    """Proper ancestors of path, nearest first, excluding the root."""
    while "/" in path:
        path = parent_of(path)
        yield path
