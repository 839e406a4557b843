"""The FUSE operations: a thin translation of kernel requests onto the namespace, the block
cache and the write buffer. Decisions about data live in those modules, not here.

Every handler runs through ``_errors``: an FSError becomes its errno (logged in one line when
it carries a message), a StorageError its mapped errno, anything else EIO with a traceback.
A failure repeated from recent.py's memory is logged at debug level: the ERROR line was its
first.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pyfuse3
import trio

from . import control, filetypes
from .blockcache import BlockCache, ReadStream
from .config import Config
from .driver import BlobInfo, StorageError
from .metrics import fuse_operation
from .namespace import ROOT_INODE, Entry, FSError, Namespace, Node, join, parent_of
from .writebuffer import WriteBuffer, WriteSession

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.EISDIR,
         errno.ENOTDIR, errno.EINVAL}


def _errors(handler: F) -> F:
    """Map exceptions to errnos, and count and time the request (metrics)."""
    op = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any, **kwargs: Any) -> Any:
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
    entries: list[tuple[str, Entry]]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, cfg: Config, namespace: Namespace, cache: BlockCache,
                 writes: WriteBuffer) -> None:
        super().__init__()
        self.cfg = cfg
        self.ns = namespace
        self.driver = namespace.driver
        self.cache = cache
        self.writes = writes
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self.next_fh = 1
        self.seen_etag: dict[int, str] = {}  # inode -> ETag of its last open (keep_cache)
        self.replacing: dict[str, int] = {}  # blob name -> renames over it in progress
        writes.on_commit = self._committed
        self.enable_writeback_cache = cfg.writeback_cache  # read by pyfuse3.init
        self.metrics = namespace.driver.metrics
        self.metrics.bind(self._live_numbers)
        self.control = control.Control(
            {"stats": self._stats_json, "pid": self._pid, "probe": self._probe})
        self.control_dirs: set[int] = set()  # open handles of the control directory
        self.writes_in_flight = 0
        self.refusing_writes: str | None = None  # why, once the daemon stops taking writes
        self.writes_refused = 0
        self._writes_drained = trio.lowlevel.ParkingLot()

    def _fh(self) -> int:
        self.next_fh += 1
        return self.next_fh

    async def _committed(self, node: Node, info: BlobInfo) -> None:
        self.ns.clear_pending(node.path)
        self.ns.note(node.path, Entry(False, info))
        await self.ns.drop_markers_above(node.path)

    # -- lookups and attributes ------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        if control.is_reserved(parent_inode, name):
            if parent_inode == control.DIR_INODE and name == b"..":
                root = self.ns.get(ROOT_INODE)
                root.lookups += 1
                return self.ns.attributes(root)
            found = self.control.lookup(parent_inode, name)
            if found is None:
                raise FSError(errno.ENOENT)
            return found
        parent = self.ns.get(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = self.ns.by_path.get(parent_of(parent.path)) or self.ns.get(ROOT_INODE)
        else:
            return self.ns.attributes(await self.ns.lookup(parent, name))
        node.lookups += 1
        return self.ns.attributes(node)

    @_errors
    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self.ns.forget(inode, count)
            if inode not in self.ns.nodes:
                # The kernel dropped the inode and its pages: nothing left to keep.
                self.seen_etag.pop(inode, None)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if control.is_control(inode):
            return self.control.attributes(inode)
        node = self.ns.get(inode)
        await self.ns.refresh(node, self.cfg.attr_timeout)
        return self.ns.attributes(node)

    @_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if control.is_control(inode):
            raise FSError(errno.EACCES)
        node = self.ns.get(inode)
        changes: dict[str, str] = {}
        if fields.update_mode:
            changes["mode"] = f"{stat.S_IMODE(attr.st_mode):o}"
        if fields.update_uid:
            changes["uid"] = str(attr.st_uid)
        if fields.update_gid:
            changes["gid"] = str(attr.st_gid)
        if fields.update_mtime and fields.update_ctime and not fields.update_atime \
                and self.enable_writeback_cache and not node.is_dir:
            # The writeback cache's own write times (sent with ctime, never by utimensat,
            # which sets atime too): the blob's Last-Modified already says when it was
            # written, so this costs no request.
            node.mtime = attr.st_mtime_ns / 1e9
        elif fields.update_mtime:
            changes["mtime"] = f"{attr.st_mtime_ns / 1e9:.9f}"
        if fields.update_size:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            await self._truncate(node, attr.st_size)
        if changes:
            await self._set_metadata(node, changes)
        return self.ns.attributes(node)

    async def _truncate(self, node: Node, size: int) -> None:
        session = self.writes.session(node)
        if session is not None:
            await session.truncate(size)
            return
        await self.ns.refresh(node, 0)
        session = self.writes.open(node, self.ns.blob_name(node.path), self._base(node))
        try:
            await session.truncate(size)
            await session.commit()
        finally:
            await self.writes.close(session)

    async def _set_metadata(self, node: Node, changes: dict[str, str]) -> None:
        session = self.writes.session(node)
        if session is not None:
            session.metadata.update(changes)
            session.metadata_changed = True
            node.metadata.update(changes)
            if "mtime" in changes:
                node.mtime = float(changes["mtime"])  # the reply's attributes show it
            return
        name = self.ns.blob_name(node.path)
        info = await self.driver.head(name) if not node.is_dir or node.marker else None
        if node.is_dir and info is not None and info.is_marker:
            # Set Blob Metadata replaces every key: the marker must keep hdi_isfolder (and
            # other tools' keys), or the directory turns into an empty file.
            try:
                await self._replace_metadata(node, info, changes)
                return
            except StorageError as exc:
                if exc.errno != errno.ENOENT:
                    raise  # ENOENT: a child removed the marker meanwhile
        if node.is_dir:
            # An implicit directory has no blob to keep them: they last while the node does.
            node.marker = False
            node.metadata.update(changes)
            if "mtime" in changes:
                node.mtime = float(changes["mtime"])
            return
        if info is None or info.is_marker:
            raise FSError(errno.ENOENT)
        await self._replace_metadata(node, info, changes)

    async def _replace_metadata(self, node: Node, info: BlobInfo, changes: dict[str, str]) -> None:
        """Set changes on top of the blob's current metadata (info, just read), so the keys
        azregfs does not own survive (content type and data are left alone by Azure)."""
        metadata = {**info.metadata, **changes}
        etag = await self.driver.set_metadata(info.name, metadata)
        info = replace(info, etag=etag, metadata=metadata, mtime=time.time())
        if node.is_dir:
            node.metadata = dict(metadata)
            node.etag = etag
        else:
            node.absorb(info)
        if "mtime" in changes:
            node.mtime = float(changes["mtime"])  # the reply's attributes show it
        self.ns.note(node.path, Entry(node.is_dir, info))  # no cached listing undoes it

    def _base(self, node: Node) -> BlobInfo | None:
        if self.ns.is_pending(node.path) or not node.etag:
            return None
        return BlobInfo(self.ns.blob_name(node.path), node.size, node.etag, node.mtime,
                        dict(node.metadata), node.blob_type, node.content_type)

    # -- files -----------------------------------------------------------------------------

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if control.is_control(inode):
            if writing:
                raise FSError(errno.EACCES)
            return await self.control.open(inode, self._fh())
        node = self.ns.get(inode)
        if node.is_dir:
            raise FSError(errno.EISDIR)
        if node.gone and writing:
            # Opened as another rename or unlink took its name: there is no blob to write.
            raise FSError(errno.ESTALE, f"{node.former} was replaced or removed while being "
                          "opened; open it again")
        await self.ns.refresh(node, self.cfg.revalidate_window)
        keep_cache = self.seen_etag.get(inode) == node.etag and not node.writing
        self.seen_etag[inode] = node.etag
        session = None
        if writing:
            session = self.writes.open(node, self.ns.blob_name(node.path), self._base(node),
                                       truncate=bool(flags & os.O_TRUNC))
            keep_cache = keep_cache and not flags & os.O_TRUNC
        return self._open_handle(node, session, keep_cache)

    def _open_handle(self, node: Node, session: WriteSession | None,
                     keep_cache: bool) -> pyfuse3.FileInfo:
        fh = self._fh()
        # A node that lost its name (an open racing a rename over it) reads what its blob
        # was: the version it knew, or the one that replaced it (see _pin).
        name = self.ns.blob_name(node.former if node.gone else node.path)
        handle = Handle(node, name, node.etag, node.size, session, ReadStream())
        handle.follow = session is None and (node.gone or name in self.replacing)
        self.handles[fh] = handle
        node.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not handle.follow,
                                direct_io=handle.follow)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._parent_to_change(parent_inode, name)
        path = self.ns.child_name(parent, name)
        existing = await self.ns.resolve(path, just_looked_up=True)
        if existing is not None and (existing.is_dir or flags & os.O_EXCL):
            raise FSError(errno.EEXIST if flags & os.O_EXCL else errno.EISDIR)
        node = self.ns.node_for(path, False)
        node.lookups += 1
        base = None
        if existing is None:
            node.size, node.etag, node.mtime = 0, "", time.time()
            # e.g. tar creates 0600 files and never chmods them afterwards
            node.metadata = self._new_metadata(mode, 0o666, ctx)
            self.ns.add_pending(path)
            self.ns.touch(parent.path)
        else:
            self.ns.remember(path, existing)
            base = self._base(node)
        session = self.writes.open(node, self.ns.blob_name(path), base,
                                   truncate=base is None or bool(flags & os.O_TRUNC),
                                   exclusive=bool(flags & os.O_EXCL))
        info = self._open_handle(node, session, keep_cache=False)
        return info, self.ns.attributes(node)

    # -- symlinks, special files and hard links (filetypes.py) -----------------------------

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        metadata = {**filetypes.symlink_metadata(), **self._new_metadata(0o777, 0o777, ctx)}
        node = await self._make_blob(parent_inode, name, target, metadata)
        node.link = (node.etag, target)
        return self.ns.attributes(node)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        if stat.S_ISREG(mode):
            metadata: dict[str, str] = {}
        else:
            try:
                metadata = filetypes.special_metadata(mode, rdev)
            except ValueError:
                raise FSError(errno.EINVAL) from None
        metadata.update(self._new_metadata(mode, 0o666, ctx))
        return self.ns.attributes(await self._make_blob(parent_inode, name, b"", metadata))

    async def _make_blob(self, parent_inode: int, name: bytes, data: bytes,
                         metadata: dict[str, str]) -> Node:
        """A new name holding a small blob, written at once (one Put Blob, create-only)."""
        parent = self._parent_to_change(parent_inode, name)
        path = self.ns.child_name(parent, name)
        if await self.ns.resolve(path, just_looked_up=True) is not None:
            raise FSError(errno.EEXIST)
        info = await self.driver.put(self.ns.blob_name(path), data, metadata, exclusive=True)
        entry = Entry(False, info)
        self.ns.note(path, entry)
        node = self.ns.remember(path, entry)
        node.lookups += 1
        self.ns.touch(parent.path)
        await self.ns.drop_markers_above(path)
        return node

    def _new_metadata(self, mode: int, full: int, ctx: Any) -> dict[str, str]:
        """What a new file or directory keeps beyond the mount's defaults: its mode, and its
        creator as owner (a registry running as the mount's uid/gid adds nothing)."""
        metadata = {}
        if stat.S_IMODE(mode) != full & ~self.cfg.umask:
            metadata["mode"] = f"{stat.S_IMODE(mode):o}"
        if ctx is not None and ctx.uid != self.cfg.uid:
            metadata["uid"] = str(ctx.uid)
        if ctx is not None and ctx.gid != self.cfg.gid:
            metadata["gid"] = str(ctx.gid)
        return metadata

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.ns.get(inode)
        if node.is_dir or filetypes.file_type(node.metadata) != stat.S_IFLNK:
            raise FSError(errno.EINVAL)
        await self.ns.refresh(node, self.cfg.attr_timeout)
        if node.link is None or node.link[0] != node.etag:
            name = self.ns.blob_name(node.former if node.gone else node.path)
            target = await self.driver.read(name, 0, node.size, node.etag) if node.size else b""
            node.link = (node.etag, target)
        return node.link[1]

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        # No hard links: a blob has one name, and a second name kept only in this mount's
        # memory would be a different file on every other host (README). EPERM is what
        # link(2) gives on a filesystem that does not support them (POSIX), as on vfat.
        raise FSError(errno.EPERM)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            return self.control.read(fh, off, size)
        session = handle.session or self.writes.session(handle.node)
        if session is not None:
            return await session.read(off, size, self.cache)
        if handle.pinning is None:
            await self._pin(handle)
        else:
            await handle.pinning.wait()  # a concurrent first read is fetching it
        try:
            return await self.cache.read(handle.name, handle.etag, handle.size, off, size,
                                         handle.stream)
        except StorageError as exc:
            if exc.errno == errno.ESTALE:
                raise FSError(errno.ESTALE, f"{handle.name} changed since it was opened; "
                              "reopen it to read the new version") from None
            raise

    async def _pin(self, handle: Handle) -> None:
        """First read: a file up to the cache's whole_max is fetched whole and held for the
        handle, so it keeps serving that version after the blob is replaced. Larger files
        are read by ETag and give ESTALE if replaced mid-read (README)."""
        handle.pinning = trio.Event()
        try:
            if not 0 < handle.size <= self.cache.whole_max:
                return
            try:
                if await self.cache.pin(handle.name, handle.etag, handle.size):
                    handle.pinned = (handle.name, handle.etag)
                return
            except StorageError as exc:
                if exc.errno not in (errno.ESTALE, errno.ENOENT):
                    raise
            # Replaced between open and this first read. Nothing of the old version was
            # served, so the handle may take the current one -- if its size is the one the
            # kernel was given for this inode (a larger one would be cut at that size), or
            # if the handle uses direct I/O (opened while a rename replaced the file).
            info = await self.driver.head(handle.name)
            if info is None or info.is_marker or (info.size != handle.size
                                                  and not handle.follow):
                return  # the read below reports it (ESTALE, or ENOENT when deleted)
            log.debug("%s was replaced before its first read: reading the new version",
                      handle.name)
            handle.etag, handle.size = info.etag, info.size
            node = handle.node
            if not node.gone and not node.writing and self.ns.by_path.get(node.path) is node:
                node.absorb(info)
            if await self.cache.pin(handle.name, handle.etag, handle.size):
                handle.pinned = (handle.name, handle.etag)
        finally:
            handle.pinning.set()

    async def _hold_open_versions(self, name: str) -> None:
        """Blob `name` is about to be replaced or deleted by this mount: descriptors open on
        it that have not read yet take their whole version now, as a local filesystem keeps
        an open file's data. Best effort: a failure leaves them to read by ETag."""
        for handle in list(self.handles.values()):
            if handle.name != name or handle.session is not None:
                continue
            try:
                if handle.pinning is None:
                    await self._pin(handle)
                else:
                    await handle.pinning.wait()
            except (StorageError, FSError) as exc:
                log.debug("could not hold %s for an open descriptor: %s", name, exc)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if handle.session is None:
            raise FSError(errno.EBADF)
        if self.refusing_writes is not None:
            error = FSError(errno.EIO, f"write to {handle.name} refused: {self.refusing_writes}")
            error.repeated = self.writes_refused > 0  # one ERROR line, the rest at debug
            self.writes_refused += 1
            raise error
        self.writes_in_flight += 1
        try:
            return await handle.session.write(off, buf)
        finally:
            self.writes_in_flight -= 1
            if not self.writes_in_flight:
                self._writes_drained.unpark_all()

    async def stop_taking_writes(self, why: str) -> None:
        """Refuse every WRITE from now on (EIO), and return once those under way are in.

        For a stop with the writeback cache: after the fsyncs, the kernel may still be
        sending pages written since, several at once and handled out of order. A commit taken while
        a later page is in but an earlier one is not would leave zeros between them; once
        no WRITE is under way, what the sessions hold is every page the kernel sent."""
        self.refusing_writes = why
        while self.writes_in_flight:
            await self._writes_drained.park()

    @_errors
    async def flush(self, fh: int) -> None:
        await self._commit(fh)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._commit(fh)

    async def _commit(self, fh: int) -> None:
        handle = self.handles.get(fh)  # None: a control file
        if handle is not None and handle.session is not None:
            await handle.session.commit()

    @_errors
    async def release(self, fh: int) -> None:
        if self.control.handles.pop(fh, None) is not None:
            return
        handle = self.handles.pop(fh)
        handle.node.opens -= 1
        if handle.pinned is not None:
            self.cache.unpin(*handle.pinned)
        if handle.session is not None:
            await self.writes.close(handle.session)
            path = handle.node.path
            if self.writes.session(handle.node) is None and self.ns.is_pending(path):
                # Its first commit failed and the data is discarded: the file never existed.
                self.ns.forget_path(path)
                self.ns.changed(parent_of(path))
        self.ns.maybe_drop(handle.node)

    # -- namespace changes -----------------------------------------------------------------

    def _parent_to_change(self, parent_inode: int, name: bytes) -> Node:
        """The directory in which `name` is to be created, removed or renamed."""
        if control.is_reserved(parent_inode, name):
            raise FSError(errno.EACCES)  # the control directory (control.py)
        return self.ns.get(parent_inode)

    async def _existing(self, parent: Node, name: bytes) -> tuple[str, Entry]:
        path = self.ns.child_name(parent, name)
        entry = await self.ns.resolve(path)
        if entry is None:
            raise FSError(errno.ENOENT)
        return path, entry

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self._parent_to_change(parent_inode, name)
        path, entry = await self._existing(parent, name)
        if entry.is_dir:
            raise FSError(errno.EISDIR)
        node = self.ns.by_path.get(path)
        session = self.writes.session(node) if node else None
        if session is not None:
            session.deleted = True
        if not self.ns.is_pending(path):
            await self._hold_open_versions(self.ns.blob_name(path))
            await self.driver.delete(self.ns.blob_name(path), missing_ok=False)
        self.ns.forget_path(path)
        self.ns.note(path, None)
        self.ns.keep_directory(parent.path)
        self.ns.touch(parent.path)

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self._parent_to_change(parent_inode, name)
        path = self.ns.child_name(parent, name)
        proven_at = self.ns.absent_since(path)
        if await self.ns.resolve(path, just_looked_up=True) is not None:
            raise FSError(errno.EEXIST)
        if self.driver.writes_refused:
            raise FSError(errno.EACCES, f"mkdir {path}: the SAS token allows no writes")
        # No request: see Namespace.made_directory.
        node = self.ns.made_directory(path, proven_at)
        node.metadata = self._new_metadata(mode, 0o777, ctx)  # mkdir -m 700, as create()
        node.lookups += 1
        self.ns.touch(parent.path)
        return self.ns.attributes(node)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self._parent_to_change(parent_inode, name)
        async with self.ns.changing(self.ns.child_name(parent, name)):
            path, entry = await self._existing(parent, name)
            if not entry.is_dir:
                raise FSError(errno.ENOTDIR)
            await self._require_empty(path)
            await self._delete_marker(path, entry)
            self.ns.removed_directory(path)
            self.ns.keep_directory(parent.path)
            self.ns.touch(parent.path)

    async def _require_empty(self, path: str) -> None:
        if not await self.ns.is_empty(path):
            raise FSError(errno.ENOTEMPTY)

    async def _delete_marker(self, path: str, entry: Entry) -> None:
        """An empty directory is gone: delete its marker blob, if it has one (a directory
        made here whose marker is still deferred, or an implicit one, has none)."""
        node = self.ns.by_path.get(path)
        if entry.info is not None or (node is not None and node.marker):
            await self.driver.delete(self.ns.blob_name(path))

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)
        old_parent = self._parent_to_change(parent_inode_old, name_old)
        new_parent = self._parent_to_change(parent_inode_new, name_new)
        async with self.ns.changing(self.ns.child_name(old_parent, name_old),
                                    self.ns.child_name(new_parent, name_new)):
            await self._rename(old_parent, name_old, new_parent, name_new, flags)

    async def _rename(self, old_parent: Node, name_old: bytes, new_parent: Node,
                      name_new: bytes, flags: int) -> None:
        old_path, entry = await self._existing(old_parent, name_old)
        new_path = self.ns.child_name(new_parent, name_new)
        if old_path == new_path:
            return
        target = await self.ns.resolve(new_path)
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FSError(errno.EEXIST)
        if entry.is_dir:
            if target is not None and not target.is_dir:
                raise FSError(errno.ENOTDIR)
            if new_path.startswith(old_path + "/"):
                raise FSError(errno.EINVAL)
            if target is not None:
                await self._require_empty(new_path)
                await self._delete_marker(new_path, target)
                self.ns.local.removed(new_path)
            await self._rename_dir(old_path, new_path)
            self.ns.local.moved(old_path, new_path, time.monotonic())
            self.ns.note(old_path, None)
            self.ns.note(new_path, Entry(True, None))
        else:
            if target is not None and target.is_dir:
                raise FSError(errno.EISDIR)
            victim = self.ns.by_path.get(new_path) if target is not None else None
            replaced = self.ns.blob_name(new_path)
            self.replacing[replaced] = self.replacing.get(replaced, 0) + 1
            try:
                if target is not None:
                    await self._hold_open_versions(replaced)
                moved = await self._rename_file(old_path, new_path, entry.info,
                                                target.info if target is not None else None)
            finally:
                self._replaced(replaced)
            victim_session = self.writes.session(victim) if victim is not None else None
            if victim_session is not None:
                victim_session.deleted = True  # as unlinked: its commit must not clobber ours
            self.ns.note(old_path, None)  # (changed() below drops cached listings; a
            self.ns.note(new_path, Entry(False, moved))  # directory made here keeps its own)
        node = self.ns.by_path.get(old_path)
        if node is not None:
            self.ns.move(node, new_path)
        else:
            self.ns.forget_path(new_path)
        if entry.is_dir:  # a file's two names were noted above, exactly
            self.ns.changed(old_parent.path, new_parent.path, old_path, new_path)
        self.ns.absent.pop(new_path, None)
        await self.ns.drop_markers_above(new_path)
        if old_parent is not new_parent:
            self.ns.keep_directory(old_parent.path)
        self.ns.touch(old_parent.path, new_parent.path)

    def _replaced(self, name: str) -> None:
        count = self.replacing.pop(name, 1) - 1
        if count > 0:
            self.replacing[name] = count

    async def _rename_file(self, old_path: str, new_path: str, moved: BlobInfo | None = None,
                           replaced: BlobInfo | None = None) -> BlobInfo | None:
        """Copy and delete; returns what the blob now is under its new name."""
        source, target = self.ns.blob_name(old_path), self.ns.blob_name(new_path)
        node = self.ns.by_path.get(old_path)
        session = self.writes.session(node) if node else None

        async def move() -> BlobInfo:
            current = session.base if session is not None else moved
            if replaced is not None and (current is None
                                         or current.blob_type != replaced.blob_type):
                # Azure's Copy Blob refuses to overwrite a blob of another type (a v3
                # registry's append-blob `link` replaced by a block-blob .tmp file).
                await self.driver.delete(target)
            info = await self.driver.copy(source, target, current)
            await self.driver.delete(source)
            return info

        if session is not None:
            await session.relocate(target, move)
            self.ns.clear_pending(old_path)
            if session.base is not None:
                self._follow(source, session.base)
            return session.base
        info = await move()
        if node is not None:
            node.absorb(info)
        self._follow(source, info)
        return info

    def _follow(self, source: str, info: BlobInfo) -> None:
        """A blob was copied to a new name: descriptors open on it read the copy (same
        bytes, new ETag), as an open file survives a rename on a local filesystem."""
        for handle in self.handles.values():
            if handle.name == source:
                handle.name, handle.etag, handle.size = info.name, info.etag, info.size

    async def _rename_dir(self, old_path: str, new_path: str) -> None:
        """Move every blob under the prefix (not atomic on a flat-namespace account)."""
        old_prefix, new_prefix = self.ns.dir_prefix(old_path), self.ns.dir_prefix(new_path)
        for session in list(self.writes.sessions.values()):
            if session.name.startswith(old_prefix):
                await session.commit()
        moves: list[tuple[BlobInfo, str]] = []  # (source, target blob name)
        async for page in self.driver.list_all(old_prefix):
            moves += [(info, new_prefix + info.name[len(old_prefix):]) for info in page]
        marker = await self.driver.head(self.ns.blob_name(old_path))
        if marker is not None and marker.is_marker:
            moves.append((marker, self.ns.blob_name(new_path)))
        for source, target in moves:
            name = source.name
            info = await self.driver.copy(name, target, source)
            await self.driver.delete(name)
            known = self.ns.by_path.get(name[len(self.ns.prefix):])
            if known is not None and not known.is_dir:
                known.absorb(info)  # its old ETag would make every read ESTALE
            self._follow(name, info)
        for session in self.writes.sessions.values():
            if session.name.startswith(old_prefix):
                session.name = new_prefix + session.name[len(old_prefix):]
                if session.base is not None:
                    session.base = await self.driver.head(session.name)

    # -- directories -----------------------------------------------------------------------

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if control.is_control(inode):
            if inode != control.DIR_INODE:
                raise FSError(errno.ENOTDIR)
            fh = self._fh()
            self.control_dirs.add(fh)
            return fh
        node = self.ns.get(inode)
        if not node.is_dir:
            raise FSError(errno.ENOTDIR)
        listing = await self.ns.listing(node)
        if inode == ROOT_INODE:
            listing.pop(control.CONTROL_NAME, None)  # never listed (control.py)
        fh = self._fh()
        self.dir_handles[fh] = DirHandle(node, sorted(listing.items()))
        node.opens += 1
        return fh

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh in self.control_dirs:
            for index, (name, attrs) in enumerate(self.control.entries()[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return
            return
        handle = self.dir_handles[fh]
        for index in range(start_id, len(handle.entries)):
            name, entry = handle.entries[index]
            path = join(handle.node.path, name)
            node = self.ns.remember(path, entry)
            if not pyfuse3.readdir_reply(token, name.encode(), self.ns.attributes(node), index + 1):
                self.ns.maybe_drop(node)
                return
            node.lookups += 1

    @_errors
    async def releasedir(self, fh: int) -> None:
        if fh in self.control_dirs:
            self.control_dirs.discard(fh)
            return
        handle = self.dir_handles.pop(fh)
        handle.node.opens -= 1
        self.ns.maybe_drop(handle.node)

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes reach Azure before their request returns, except the marker of
        an empty directory made here (deferred, see localdirs.py): written now."""
        if fh not in self.control_dirs:
            await self.ns.write_markers(under=self.dir_handles[fh].node.path)

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 2**50 // 4096  # 1 PiB: "plenty"
        data.f_files = data.f_ffree = data.f_favail = 2**32
        data.f_namemax = 255
        return data

    # -- extended attributes: none (see control.py) and the control files ----------------

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # ENOSYS, not ENODATA: the kernel then stops asking for security.capability before
        # every write (control.py explains).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def _stats_json(self) -> bytes:
        return json.dumps(self.stats()).encode()

    async def _pid(self) -> bytes:
        return str(os.getpid()).encode()

    async def _probe(self) -> bytes:
        # azregfs check: the outcome also lands in the metrics' last request.
        try:
            await self.driver.probe()
            return b'{"ok": true}'
        except StorageError as exc:
            return json.dumps({"ok": False, "error": str(exc)}).encode()

    def stats(self) -> dict[str, Any]:
        return self.metrics.snapshot()

    def _live_numbers(self) -> dict[str, Any]:
        """The numbers the parts keep themselves, read when stats or metrics are asked for."""
        budget = self.writes.budget
        return {
            "cache": self.cache.stats.as_dict(),
            "cache_bytes": self.cache.blocks.currsize,
            "cache_disk_bytes": self.cache.disk.used if self.cache.disk else 0,
            "inodes": self.ns.size,
            "open_handles": len(self.handles),
            "write_sessions": len(self.writes.sessions),
            "dirty_bytes": budget.used,
            "dirty_peak": budget.peak,
            "dirty_budget": budget.limit,
            "writer_wait_seconds": round(budget.waited_seconds, 6),
            "commits": self.writes.commits,
            "commit_failures": self.writes.commit_failures,
            "azure_concurrency": self.driver.limiter.total_tokens,
        }
