"""How a blob that is not a regular file says what it is: symlinks, FIFOs, sockets and
device nodes, in blob metadata. Pure: no I/O.

Conventions (so that other tools read what azregfs writes, and the other way round):
- **Symlink**: a block blob whose content is the link's target, byte for byte as given to
  symlink(2), with metadata ``is_symlink=true`` -- blobfuse2's convention. Its size is the
  target's length, as lstat(2) shows on a local filesystem.
- **FIFO, socket, character or block device**: a zero-length blob with metadata
  ``filetype`` (``fifo``, ``socket``, ``char``, ``block``) and, for devices, ``rdev`` (the
  device number, decimal), as s3ql keeps them apart from the data. The kernel does the rest:
  opening such a node never reaches the filesystem.
- Anything else (no such key, or a value we do not know) is a regular file, so a blob
  written by another tool with stray metadata never turns into something it is not.
- The permission bits stay in ``mode`` (see namespace.py), apart from the type, so
  chmod(2) of a FIFO keeps it a FIFO.
"""

from __future__ import annotations

import stat

SYMLINK_KEY = "is_symlink"
TYPE_KEY = "filetype"
RDEV_KEY = "rdev"

_SPECIAL = {
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
}
_SPECIAL_NAMES = {kind: name for name, kind in _SPECIAL.items()}


def file_type(metadata: dict[str, str]) -> int:
    """The S_IFMT bits of the blob with this metadata (never S_IFDIR: markers are told
    apart before this is asked)."""
    if metadata.get(SYMLINK_KEY, "").lower() == "true":
        return stat.S_IFLNK
    return _SPECIAL.get(metadata.get(TYPE_KEY, "").lower(), stat.S_IFREG)


def rdev(metadata: dict[str, str]) -> int:
    """The device number of a device node (0 for anything else or a bad value)."""
    if file_type(metadata) not in (stat.S_IFCHR, stat.S_IFBLK):
        return 0
    try:
        return max(0, int(metadata.get(RDEV_KEY, "0")))
    except ValueError:
        return 0


def symlink_metadata() -> dict[str, str]:
    return {SYMLINK_KEY: "true"}


def special_metadata(mode: int, device: int) -> dict[str, str]:
    """Metadata for mknod(2) of a FIFO, socket or device (ValueError for other types)."""
    kind = stat.S_IFMT(mode)
    name = _SPECIAL_NAMES.get(kind)
    if name is None:
        raise ValueError(f"not a special file type: {kind:o}")
    metadata = {TYPE_KEY: name}
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        metadata[RDEV_KEY] = str(device)
    return metadata
