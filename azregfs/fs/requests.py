"""What every FUSE request goes through, and what open requests leave behind.

``handled`` wraps each handler: an FSError becomes its errno (logged in one line when it
carries a message), a StorageError its mapped errno, anything else EIO with a traceback. A
failure repeated from recent.py's memory is logged at debug level: the ERROR line was its
first. Each request is counted and timed (metrics) under its operation's name.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from ..ops.metrics import fuse_operation
from ..read.blockcache import ReadStream
from ..storage.driver import StorageError
from ..write.writebuffer import WriteSession
from .nodes import Entry, FSError, Node

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.EISDIR,
         errno.ENOTDIR, errno.EINVAL}


def handled(handler: F) -> F:
    """Map exceptions to errnos, and count and time the request (metrics)."""
    op = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = fuse_operation.set(op)  # names this request in the Azure request log
        started = time.monotonic()
        error: int | None = None
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            error = exc.errno
            raise
        except FSError as exc:
            error = exc.errno
            if exc.message and exc.errno not in QUIET and not exc.repeated:
                log.error("%s: %s", op, exc.message)
            elif exc.message:
                log.debug("%s: %s", op, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except StorageError as exc:
            error = exc.errno
            if exc.errno not in QUIET and not exc.repeated:
                log.error("%s: %s", op, exc)
            else:
                log.debug("%s: %s", op, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            error = errno.EIO
            log.exception("%s failed unexpectedly", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            fuse_operation.reset(token)
            self.metrics.fuse_done(op, time.monotonic() - started, error)

    return wrapper  # type: ignore[return-value]


@dataclass(eq=False)
class Handle:
    node: Node
    name: str  # blob name at open
    etag: str  # version read by this handle (close-to-open)
    size: int
    session: WriteSession | None
    stream: ReadStream
    content_md5: bytes | None = None  # of the version at open (read/known.py)
    # A small file is fetched whole at its first read and held (pinned) for the handle, so
    # the handle serves one version even when the blob is replaced; set once tried.
    pinning: trio.Event | None = None
    pinned: tuple[str, str] | None = None  # the (name, ETag) held in the cache
    # Opened while a rename replaced its file (direct I/O, so the kernel does not cut reads
    # at the size it knew): it may take the new version, whatever its size.
    follow: bool = False


@dataclass
class DirHandle:
    node: Node
    # Listed at the first readdir (and again at a rewind), not at opendir: a walk (find's
    # fts) opens many directories only to come back up through them.
    entries: list[tuple[str, Entry]] | None = None
