"""The FUSE operations: a thin translation of kernel requests onto the namespace, the block
cache and the write buffer. Decisions about data live in those modules, not here.

This file holds lookups, attributes, files (open, read, write, commit), directory reads
and the control files; the requests that change the namespace are in changes.py, and
what every request goes through (errno mapping, metrics) in requests.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from dataclasses import replace
from typing import Any

import pyfuse3
import trio

from ..config import Config
from ..read.blockcache import BlockCache, ReadStream
from ..read.known import known_content
from ..storage.driver import BlobInfo, StorageError
from ..write.writebuffer import WriteBuffer, WriteSession
from . import control
from .budget import InodeBudget
from .changes import NamespaceChanges
from .namespace import ROOT_INODE, Namespace, time_text
from .nodes import Entry, FSError, Node, join, parent_of
from .requests import DirHandle, Handle, handled

log = logging.getLogger(__name__)

class Operations(NamespaceChanges, pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, cfg: Config, namespace: Namespace, cache: BlockCache,
                 writes: WriteBuffer) -> None:
        super().__init__()
        self.cfg = cfg
        self.ns = namespace
        self.inode_budget = InodeBudget(namespace, cfg.max_inodes)  # run by the daemon
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
        await self.ns.markers.drop_above(node.path)

    # -- lookups and attributes ------------------------------------------------------------

    @handled
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

    @handled
    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self.ns.forget(inode, count)
            if inode not in self.ns.nodes:
                # The kernel dropped the inode and its pages: nothing left to keep.
                self.seen_etag.pop(inode, None)

    @handled
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if control.is_control(inode):
            return self.control.attributes(inode)
        node = self.ns.get(inode)
        await self.ns.refresh(node, self.cfg.attr_timeout)
        return self.ns.attributes(node)

    @handled
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
            changes["mtime"] = time_text(attr.st_mtime_ns)
        if fields.update_atime:
            changes["atime"] = time_text(attr.st_atime_ns)
        if fields.update_size:
            if node.is_dir:
                raise FSError(errno.EISDIR)
            await self._truncate(node, attr.st_size)
        if changes:
            await self._set_metadata(node, changes)
        node.changed_at = time.time()  # POSIX: every attribute change moves ctime
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

    @handled
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
        handle = Handle(node, name, node.etag, node.size, session, ReadStream(),
                        node.content_md5)
        handle.follow = session is None and (node.gone or name in self.replacing)
        self.handles[fh] = handle
        node.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not handle.follow,
                                direct_io=handle.follow)

    @handled
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

    @handled
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
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
                known = known_content(handle.name, handle.size, handle.content_md5)
                if await self.cache.pin(handle.name, handle.etag, handle.size, known):
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

    @handled
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

    @handled
    async def flush(self, fh: int) -> None:
        await self._commit(fh)

    @handled
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._commit(fh)

    async def _commit(self, fh: int) -> None:
        handle = self.handles.get(fh)  # None: a control file
        if handle is not None and handle.session is not None:
            await handle.session.commit()

    @handled
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

    # -- directories -----------------------------------------------------------------------

    @handled
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
        fh = self._fh()
        self.dir_handles[fh] = DirHandle(node)
        node.opens += 1
        return fh

    @handled
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh in self.control_dirs:
            for index, (name, attrs) in enumerate(self.control.entries()[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return
            return
        handle = self.dir_handles[fh]
        if handle.entries is None or start_id == 0:
            listing = await self.ns.listing(handle.node)
            if handle.node.inode == ROOT_INODE:
                listing = {name: entry for name, entry in listing.items()
                           if name != control.CONTROL_NAME}  # never listed (control.py)
            handle.entries = sorted(listing.items())
        entries = handle.entries
        for index in range(start_id, len(entries)):
            name, entry = entries[index]
            path = join(handle.node.path, name)
            node = self.ns.remember(path, entry)
            if not pyfuse3.readdir_reply(token, name.encode(), self.ns.attributes(node), index + 1):
                self.ns.maybe_drop(node)
                return
            node.lookups += 1

    @handled
    async def releasedir(self, fh: int) -> None:
        if fh in self.control_dirs:
            self.control_dirs.discard(fh)
            return
        handle = self.dir_handles.pop(fh)
        handle.node.opens -= 1
        self.ns.maybe_drop(handle.node)

    @handled
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes reach Azure before their request returns, except the marker of
        an empty directory made here (deferred, see localdirs.py): written now."""
        if fh not in self.control_dirs:
            await self.ns.markers.write_due(under=self.dir_handles[fh].node.path)

    @handled
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 2**50 // 4096  # 1 PiB: "plenty"
        data.f_files = data.f_ffree = data.f_favail = 2**32
        data.f_namemax = 255
        return data

    # -- extended attributes: none (see control.py) and the control files ----------------

    @handled
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # ENOSYS, not ENODATA: the kernel then stops asking for security.capability before
        # every write (control.py explains).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handled
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
            "inodes_asked_to_drop": self.inode_budget.asked,
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
