"""The FUSE requests that change the namespace: unlink, mkdir, rmdir, rename, symlink,
mknod, link (refused), and readlink beside them. Part of the Operations class
(operations.py); the decisions stay in the namespace, its markers and the write buffer.

Invariants:
- A change reaches Azure before its request returns, except an empty directory's marker
  (deferred: localdirs.py, markers.py); rmdir and directory renames run inside
  ``markers.changing`` so that no marker put races them.
- A file renamed over or unlinked while descriptors are open on it keeps serving them the
  version they opened (``_hold_open_versions``, ``_follow``), as on a local filesystem.
- Renaming a directory moves every blob under it one by one: not atomic (README).
"""

from __future__ import annotations

import errno
import stat
import time
from typing import TYPE_CHECKING, Any

import pyfuse3

from ..storage.driver import BlobInfo
from . import control, filetypes
from .nodes import Entry, FSError, Node
from .requests import handled

if TYPE_CHECKING:
    from ..config import Config
    from ..storage.driver import Driver
    from ..write.writebuffer import WriteBuffer
    from .namespace import Namespace
    from .requests import Handle


class NamespaceChanges:
    """The namespace-changing half of Operations (a mixin: pyfuse3 wants one object)."""

    cfg: Config
    ns: Namespace
    driver: Driver
    writes: WriteBuffer
    handles: dict[int, Handle]
    replacing: dict[str, int]  # blob name -> renames over it in progress

    async def _hold_open_versions(self, name: str) -> None:
        raise NotImplementedError  # Operations: descriptors open on `name` take their version

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

    @handled
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

    @handled
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

    @handled
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        parent = self._parent_to_change(parent_inode, name)
        async with self.ns.markers.changing(self.ns.child_name(parent, name)):
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

    @handled
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FSError(errno.EINVAL)
        old_parent = self._parent_to_change(parent_inode_old, name_old)
        new_parent = self._parent_to_change(parent_inode_new, name_new)
        async with self.ns.markers.changing(self.ns.child_name(old_parent, name_old),
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
        await self.ns.markers.drop_above(new_path)
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

    # -- symlinks, special files and hard links (filetypes.py) -----------------------------

    @handled
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        metadata = {**filetypes.symlink_metadata(), **self._new_metadata(0o777, 0o777, ctx)}
        node = await self._make_blob(parent_inode, name, target, metadata)
        node.link = (node.etag, target)
        return self.ns.attributes(node)

    @handled
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
        await self.ns.markers.drop_above(path)
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

    @handled
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

    @handled
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        # No hard links: a blob has one name, and a second name kept only in this mount's
        # memory would be a different file on every other host (README). EPERM is what
        # link(2) gives on a filesystem that does not support them (POSIX), as on vfat.
        raise FSError(errno.EPERM)
