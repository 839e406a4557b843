"""The namespace: inodes, paths, attributes, directory listings and directory markers.

Invariants:
- One Node per path the kernel knows; ``lookups`` counts the kernel's references (lookup,
  create, mkdir, and each entry ``readdir`` hands out) and ``forget`` drops the node when it
  reaches zero and no handle or write is open, so walking a huge tree leaves nothing behind.
- A path is a '/'-joined relative path ('' is the root); the blob name is the configured
  prefix plus the path. Directories are name prefixes, or marker blobs (zero length,
  metadata hdi_isfolder=true) for empty directories. Markers never show as files and are
  deleted once the directory has a real child, so a registry's tree carries none.
- Names the tree cannot show (empty segments, trailing '/', '.' or '..') are skipped from
  listings with one warning each.
- Files created but not yet committed exist only here (``pending``): listings merge them in.
- Our own changes reach a cached listing at once (``note``), including one still being
  fetched: every fetch in flight for a directory records the changes noted meanwhile and
  applies them to what Azure returned before it is cached, since the LIST may have been
  answered before or after the change landed. A whole-directory change (``changed``) while a
  fetch is in flight makes the fetch start again (at most twice more; the last result is
  returned but not cached). So a file closed on this mount is in the next readdir here,
  whatever listing was in flight when it committed.

Code between two ``await``s is atomic (trio): the tables are only mutated synchronously.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import cachetools
import pyfuse3
import trio

from .blobs import MARKER_KEY
from .config import Config
from .driver import MAX_NAME, BlobInfo, Driver, StorageError
from .filetypes import file_type, rdev
from .flight import Flight
from .localdirs import LocalDirs
from .recent import RecentFailures

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
MAX_SEGMENTS = 254
SMALL_LISTING = 1000  # entries a lookup miss may list to answer from the parent's listing
# Blobs a flat LIST may bring to fill a whole subtree: a lookup miss tries one page's worth,
# a readdir (a walk: find, du, a registry's catalog) two pages'.
FLAT_LOOKUP, FLAT_WALK = 1000, 10000
NAME_MAX = 255


class FSError(Exception):
    """An errno for the kernel plus an optional log line (None: nothing worth logging)."""

    repeated = False  # a failure remembered a moment ago (recent.py), not asked again

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code
        self.message = message


@dataclass
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
    marker: bool = False  # a directory whose marker blob exists
    lookups: int = 0
    opens: int = 0
    writing: bool = False  # a write session owns size/mtime; never refreshed from Azure
    checked_at: float = 0.0  # monotonic time the attributes were last read from Azure
    former: str = ""  # replaced (renamed over) or deleted: the path it had
    link: tuple[str, bytes] | None = None  # a symlink's (ETag, target), once read

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
        self.mtime = _mtime(info)
        self.checked_at = time.monotonic()


@dataclass(frozen=True)
class Entry:
    """One name in a directory listing."""

    is_dir: bool
    info: BlobInfo | None  # the file's blob, a directory's marker, or None (implicit dir)


@dataclass
class _Fetch:
    """A listing being fetched: our changes to its directory since the fetch began."""

    changes: dict[str, Entry | None] = field(default_factory=dict)  # name -> entry, or gone
    invalidated: bool = False


def _listing_bytes(entries: dict[str, Entry]) -> int:
    """A listing's memory, estimated: names, entries and their blob properties."""
    return 256 + sum(600 + 2 * len(name) for name in entries)


def _mtime(info: BlobInfo) -> float:
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


class Namespace:
    def __init__(self, cfg: Config, driver: Driver) -> None:
        self.cfg = cfg
        self.driver = driver
        self.prefix = cfg.prefix
        self.started = time.time()
        root = Node(ROOT_INODE, "", True, mtime=self.started, lookups=1)
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.by_path: dict[str, Node] = {"": root}
        self.next_inode = ROOT_INODE + 1
        # Bounded in (estimated) bytes: one flat listing may fill many directories at once.
        self.listings: cachetools.TTLCache[str, dict[str, Entry]] = cachetools.TTLCache(
            maxsize=cfg.listing_cache_size, ttl=max(cfg.dir_timeout, 0.001),
            getsizeof=_listing_bytes,
        )
        # Directories whose subtree was too big for a flat listing: the limit it exceeded.
        self.big_subtrees: cachetools.TTLCache[str, int] = cachetools.TTLCache(
            maxsize=4096, ttl=300)
        self.generation = 0  # bumped by each change we note: a flat fetch checks it
        # path -> the lookup asking Azure about it
        self._asking: dict[str, Flight[Entry | None]] = {}
        self.failed: RecentFailures[str] = RecentFailures()  # paths whose lookup just failed
        self.pending: dict[str, set[str]] = {}  # dir path -> names created, not committed
        # Directories whose last listing fit in one small page: lookups there list them.
        self.small_dirs: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=4096)
        # Paths just proven absent -> when (monotonic): the create() that the kernel sends
        # right after its failed lookup need not ask again, and a mkdir knows how long the
        # new directory's listing is exact. Never used to answer a lookup.
        self.absent: cachetools.TTLCache[str, float] = cachetools.TTLCache(
            maxsize=4096, ttl=min(1.0, max(cfg.dir_timeout, 0.001)))
        self.warned: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=10000)
        self.fetching: dict[str, list[_Fetch]] = {}  # dir path -> listings being fetched
        # Directories made here (their exact listing, for dir_timeout from the proof of
        # their absence) and those whose marker blob is deferred: see localdirs.py.
        self.local: LocalDirs[Entry] = LocalDirs(cfg.dir_timeout, cfg.marker_delay)
        # Marker puts in flight, and directories an rmdir or rename is changing: no marker
        # is written under those, and they wait for the puts in flight under them first.
        self._marking: dict[str, trio.Event] = {}
        self._changing: Counter[str] = Counter()

    # -- names -----------------------------------------------------------------------------

    def blob_name(self, path: str) -> str:
        return self.prefix + path

    def dir_prefix(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def child_name(self, parent: Node, raw: bytes) -> str:
        """Validate one name from the kernel and return the child's path."""
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FSError(errno.EINVAL, f"name {raw!r} is not UTF-8; blob names must be") from None
        if len(raw) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG)
        path = join(parent.path, name)
        if len(self.blob_name(path).encode("utf-8")) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG)
        if path.count("/") + 1 > MAX_SEGMENTS:
            raise FSError(errno.ENAMETOOLONG)
        return path

    def _skip(self, full_name: str, why: str) -> None:
        if full_name not in self.warned:
            self.warned[full_name] = True
            log.warning("blob %r is not shown: %s", full_name, why)

    # -- nodes -----------------------------------------------------------------------------

    def get(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise FSError(errno.ENOENT) from None

    def node_for(self, path: str, is_dir: bool) -> Node:
        node = self.by_path.get(path)
        if node is not None and node.is_dir != is_dir and not node.opens and not node.writing:
            self._drop(node)
            node = None
        if node is None:
            node = Node(self.next_inode, path, is_dir, mtime=self.started)
            self.next_inode += 1
            self.nodes[node.inode] = node
            self.by_path[path] = node
        return node

    def _apply_entry(self, node: Node, entry: Entry) -> None:
        if node.writing:
            return
        if entry.is_dir:
            node.marker = entry.info is not None
            if entry.info is not None:
                # The marker keeps the directory's mode, owner and times (chmod, chown, utime).
                node.metadata = dict(entry.info.metadata)
                node.mtime = _mtime(entry.info)
            node.checked_at = time.monotonic()
        elif entry.info is not None:
            node.absorb(entry.info)

    def remember(self, path: str, entry: Entry) -> Node:
        node = self.node_for(path, entry.is_dir)
        if (self.cfg.writeback_cache and not entry.is_dir and entry.info is not None
                and node.etag and node.etag != entry.info.etag and not node.writing):
            # With the writeback cache the kernel keeps its own size of a file it caches:
            # a file changed elsewhere becomes a new inode, which the kernel sees afresh.
            # The old one lives on for its open descriptors (they read the old version).
            self.forget_path(path)
            node = self.node_for(path, False)
        self._apply_entry(node, entry)
        return node

    def forget(self, inode: int, count: int) -> None:
        node = self.nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.opens == 0 and not node.writing and node.inode != ROOT_INODE:
            self._drop(node)

    def _drop(self, node: Node) -> None:
        self.nodes.pop(node.inode, None)
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]

    @property
    def size(self) -> int:
        return len(self.nodes)

    # -- attributes ------------------------------------------------------------------------

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self._entry_timeout(node)
        attr.attr_timeout = self.cfg.dir_entry_timeout if node.is_dir else self.cfg.attr_timeout
        meta = node.metadata
        if node.is_dir:
            default = 0o777 & ~self.cfg.umask
            attr.st_mode = stat.S_IFDIR | _int(meta.get("mode"), default, 8) & 0o7777
            attr.st_nlink = 2
            attr.st_size = 0
        else:
            kind = file_type(meta)
            if kind == stat.S_IFLNK:
                attr.st_mode = stat.S_IFLNK | 0o777  # a link's own bits mean nothing
            else:
                default = 0o666 & ~self.cfg.umask
                attr.st_mode = kind | _int(meta.get("mode"), default, 8) & 0o7777
            attr.st_nlink = 1
            attr.st_size = node.size
        attr.st_uid = _int(meta.get("uid"), self.cfg.uid)
        attr.st_gid = _int(meta.get("gid"), self.cfg.gid)
        attr.st_rdev = rdev(meta)
        attr.st_blksize = 1 << 20
        attr.st_blocks = (attr.st_size + 511) // 512
        stamp = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        return attr

    def _entry_timeout(self, node: Node) -> float:
        # A directory that another host removed is harmless to keep showing: its
        # listing is fresh by dir_timeout, and a file created in it recreates it, as
        # prefixes are implicit. So directories are revalidated far less often.
        return self.cfg.dir_entry_timeout if node.is_dir else self.cfg.entry_timeout

    async def refresh(self, node: Node, max_age: float) -> None:
        """Re-read a file's attributes from Azure if older than max_age seconds."""
        if node.is_dir or node.writing or time.monotonic() - node.checked_at < max_age:
            return
        if node.gone:
            return  # no blob has its name: what we last knew stays true for open handles
        if self.is_pending(node.path):
            return
        info = await self._head(node.path)
        if info is None or info.is_marker:
            raise FSError(errno.ENOENT)
        node.absorb(info)

    # -- lookups and listings --------------------------------------------------------------

    async def _head(self, path: str) -> BlobInfo | None:
        try:
            return await self.driver.head(self.blob_name(path))
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None

    async def resolve(self, path: str, just_looked_up: bool = False) -> Entry | None:
        """What path is in the container (or locally pending), asking Azure if needed.

        Positive answers may come from a cached listing (for dir_timeout); a negative one
        is Azure's, so a name another host just wrote is seen at once -- except by the
        create() that follows our own failed lookup (``just_looked_up``), and in a
        directory this mount made, whose absence Azure proved less than dir_timeout ago
        (localdirs.py): within the consistency contract either way."""
        parent, _, name = path.rpartition("/")
        if name in self.pending.get(parent, ()):
            node = self.by_path.get(path)
            return Entry(False, None) if node is not None else None
        if self.local.exists(path):
            return Entry(True, None)  # made here; Azure has no blob for it yet
        own = self.local.listing(parent, time.monotonic())
        if own is not None:
            entry = own.get(name)
            proven_at = self.local.proven_at(parent)
            if entry is None and proven_at is not None:
                self.absent[path] = proven_at
            return entry
        listing = self.listings.get(parent)
        if listing is not None and name in listing:
            return listing[name]
        if just_looked_up and self.absent.pop(path, None) is not None:
            return None
        flight = self._asking.get(path)
        if flight is not None:  # concurrent lookups of one name (e.g. parallel opens)
            return await flight.result()
        self.failed.check(path)
        flight = self._asking[path] = Flight()
        asked_at = time.monotonic()
        try:
            entry = await self._ask(path)
        except BaseException as exc:
            flight.fail(exc)
            if isinstance(exc, FSError):
                self.failed.note(path, exc)
            raise
        finally:
            del self._asking[path]
        flight.land(entry)
        if entry is None:
            self.absent[path] = asked_at
        return entry

    def absent_since(self, path: str) -> float | None:
        """When path was last proven absent, if that is recent (at most dir_timeout ago)."""
        return self.absent.get(path)

    async def _ask(self, path: str) -> Entry | None:
        parent, _, name = path.rpartition("/")
        if self.big_subtrees.get(parent, 0) < FLAT_LOOKUP:
            # One flat LIST of a small subtree answers this name and every lookup below
            # the parent for dir_timeout (a registry pull walks one repository this way).
            listing = await self._list_subtree_if_small(parent, FLAT_LOOKUP)
            if listing is not None:
                return listing.get(name)
        if parent in self.small_dirs:
            # One LIST answers this name and the next ones here: cheaper than HEAD + LIST.
            listing = await self._list_if_small(parent)
            if listing is not None:
                return listing.get(name)
        info = await self._head(path)
        if info is not None:
            return Entry(info.is_marker, info)
        listing = await self._list_if_small(parent)
        if listing is not None:
            return listing.get(name)
        try:
            if await self.driver.has_children(self.dir_prefix(path)):
                return Entry(True, None)
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        return None

    async def lookup(self, parent: Node, raw: bytes) -> Node:
        path = self.child_name(parent, raw)
        node = self.by_path.get(path)
        fresh = node is not None and (
            node.writing or time.monotonic() - node.checked_at < self._entry_timeout(node)
        )
        if not fresh:
            entry = await self.resolve(path)
            if entry is None:
                raise FSError(errno.ENOENT)
            node = self.remember(path, entry)
        assert node is not None
        node.lookups += 1
        return node

    async def listing(self, directory: Node) -> dict[str, Entry]:
        """Every name in a directory, from the cache when fresh; pending files merged in."""
        entries = self.local.listing(directory.path, time.monotonic())
        if entries is None:
            entries = self.listings.get(directory.path)
        if entries is None and self.big_subtrees.get(directory.path, 0) < FLAT_WALK:
            entries = await self._list_subtree_if_small(directory.path, FLAT_WALK)
        if entries is None:
            entries = await self._fetched(directory.path, self._list)
            assert entries is not None
        pending = self.pending.get(directory.path)
        unmarked = self.local.unmarked_children(directory.path)
        if pending or unmarked:
            entries = dict(entries)
            for name in pending or ():
                entries.setdefault(name, Entry(False, None))
            for name in unmarked:
                entries.setdefault(name, Entry(True, None))
        return entries

    async def _fetched(self, path: str, fetch: Callable[[str], Awaitable[dict[str, Entry] | None]],
                       attempts: int = 3) -> dict[str, Entry] | None:
        """Run a listing fetch, patch in our changes noted while it ran, and cache it."""
        entries: dict[str, Entry] | None = None
        for _ in range(attempts):
            record = _Fetch()
            self.fetching.setdefault(path, []).append(record)
            try:
                entries = await fetch(path)
            finally:
                records = self.fetching[path]
                records.remove(record)
                if not records:
                    del self.fetching[path]
            if entries is None:
                return None
            for name, entry in record.changes.items():
                if entry is None:
                    entries.pop(name, None)
                else:
                    entries[name] = entry
            if not record.invalidated:
                self.cache_listing(path, entries)
                return entries
        return entries  # changed all along: right for this caller, not worth keeping

    async def _list(self, path: str) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        try:
            async for blobs, prefixes in self.driver.list_level(self.dir_prefix(path)):
                self._add_page(path, entries, blobs, prefixes)
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        return entries

    async def _list_if_small(self, path: str) -> dict[str, Entry] | None:
        """The directory's listing when one small page holds it (and cache it), else None.

        A name that is not a blob costs a LIST anyway; listing its small parent instead
        answers the next lookups there too (a registry creates files in fresh small
        directories), while a huge directory is never listed just to miss one name."""
        return await self._fetched(path, self._small_page)

    async def _small_page(self, path: str) -> dict[str, Entry] | None:
        try:
            page = await self.driver.list_level_small(self.dir_prefix(path), SMALL_LISTING)
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        if page is None:
            self.small_dirs.pop(path, None)
            return None
        entries: dict[str, Entry] = {}
        self._add_page(path, entries, *page)
        self.small_dirs[path] = True
        return entries

    async def _list_subtree_if_small(self, path: str, limit: int) -> dict[str, Entry] | None:
        """The directory's listing from a flat LIST of everything under it, when it holds at
        most `limit` blobs; every directory below is cached too. Else None (and a subtree
        too big for `limit` is not listed flat again at that limit for a while)."""
        generation = self.generation
        try:
            blobs = await self.driver.list_subtree_small(self.dir_prefix(path), limit)
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        if blobs is None:
            self.big_subtrees[path] = limit  # more than that: not tried again soon
            return None
        listings = self._tree(path, blobs)
        if generation != self.generation:
            # We changed something while the LIST ran: it may predate that change. Only
            # the directory asked about is answered, from a fresh level listing.
            return await self._list_if_small(path)
        for directory, entries in listings.items():
            self.cache_listing(directory, entries)
            self.small_dirs[directory] = True
        return listings[path]

    def cache_listing(self, path: str, entries: dict[str, Entry]) -> None:
        """Keep a listing for dir_timeout, unless it alone is bigger than the whole cache
        (such a directory is listed again by each reader: pages, not memory)."""
        if _listing_bytes(entries) <= self.listings.maxsize:
            self.listings[path] = entries

    def _tree(self, path: str, blobs: list[BlobInfo]) -> dict[str, dict[str, Entry]]:
        """The listing of path and of every directory below it, from a flat listing."""
        prefix = self.dir_prefix(path)
        listings: dict[str, dict[str, Entry]] = {path: {}}
        for info in blobs:
            parts = info.name[len(prefix):].split("/")
            if any(not part or part in (".", "..") for part in parts):
                self._skip(info.name, "ends with '/' or has an empty or dot path segment")
                continue
            directory = path
            for part in parts[:-1]:
                entries = listings[directory]
                known = entries.get(part)
                if known is None or not known.is_dir:
                    if known is not None:
                        self._skip(self.blob_name(join(directory, part)),
                                   "a directory of the same name hides it")
                    entries[part] = Entry(True, None)
                directory = join(directory, part)
                listings.setdefault(directory, {})
            leaf, entries = parts[-1], listings[directory]
            if info.is_marker:
                entries[leaf] = Entry(True, info)
                listings.setdefault(join(directory, leaf), {})
            elif leaf in entries and entries[leaf].is_dir:
                self._skip(info.name, "a directory of the same name hides it")
            else:
                entries[leaf] = Entry(False, info)
        return listings

    def _add_page(self, path: str, entries: dict[str, Entry], blobs: list[BlobInfo],
                  prefixes: list[str]) -> None:
        prefix = self.dir_prefix(path)
        for sub in prefixes:
            name = sub[len(prefix):-1]
            if not name or name in (".", ".."):
                self._skip(sub, "it and every blob under it have an empty or dot "
                           "path segment")
                continue
            previous = entries.get(name)
            entries[name] = Entry(True, previous.info if previous else None)
        for info in blobs:
            name = info.name[len(prefix):]
            if not name or name in (".", ".."):
                self._skip(info.name, "ends with '/' or has a dot segment")
                continue
            if info.is_marker:
                entries[name] = Entry(True, info)
            elif name in entries and entries[name].is_dir:
                self._skip(info.name, "a directory of the same name hides it")
            else:
                entries[name] = Entry(False, info)

    # -- changes made through this mount ---------------------------------------------------

    def changed(self, *dir_paths: str) -> None:
        """Our own change to these directories: drop their cached listings (and those being
        fetched: they fetch again)."""
        self.generation += 1
        for path in dir_paths:
            self.listings.pop(path, None)
            for record in self.fetching.get(path, ()):
                record.invalidated = True

    def note(self, path: str, entry: Entry | None) -> None:
        """Our own change to one name: patch the parent's cached listing in place (its
        lifetime is unchanged, so other hosts' changes still show within dir_timeout)."""
        self.absent.pop(path, None)
        self.failed.forget(path)
        self.generation += 1
        self.local.note(path, entry)
        parent, _, name = path.rpartition("/")
        for record in self.fetching.get(parent, ()):
            record.changes[name] = entry
        listing = self.listings.get(parent)
        if listing is None:
            return
        if entry is None:
            listing.pop(name, None)
        else:
            listing[name] = entry

    def touch(self, *dir_paths: str) -> None:
        """An entry was added to or removed from these directories here: their mtime (and
        ctime) is now, as POSIX wants, kept in memory only -- a directory has no blob to
        hold it (its marker, if any, keeps what chmod or utime set)."""
        now = time.time()
        for path in dir_paths:
            node = self.by_path.get(path)
            if node is not None:
                node.mtime = now

    def add_pending(self, path: str) -> None:
        self.pending.setdefault(parent_of(path), set()).add(path.rpartition("/")[2])
        self.absent.pop(path, None)

    def clear_pending(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        names = self.pending.get(parent)
        if names is not None:
            names.discard(name)
            if not names:
                del self.pending[parent]

    def is_pending(self, path: str) -> bool:
        parent, _, name = path.rpartition("/")
        return name in self.pending.get(parent, ())

    def move(self, node: Node, new_path: str) -> None:
        """Re-key a node (and, for a directory, every known descendant) to a new path."""
        old_path = node.path
        victim = self.by_path.get(new_path)
        if victim is not None and victim is not node:
            del self.by_path[new_path]
            victim.former = new_path
            victim.path = f"\0moved-away/{victim.inode}"  # keeps its inode until forgotten
            self.by_path[victim.path] = victim
        moves = [node]
        if node.is_dir:
            moves += [n for n in self.nodes.values() if n.path.startswith(old_path + "/")]
        for moved in moves:
            if self.by_path.get(moved.path) is moved:
                del self.by_path[moved.path]
        for moved in moves:
            moved.path = new_path + moved.path[len(old_path):]
            self.by_path[moved.path] = moved
        if self.is_pending(old_path):
            self.clear_pending(old_path)
            self.add_pending(new_path)

    def forget_path(self, path: str) -> None:
        """The name is gone: a later lookup must not find the old node by path."""
        node = self.by_path.get(path)
        if node is not None:
            del self.by_path[path]
            node.former = path
            node.path = f"\0deleted/{node.inode}"
            self.by_path[node.path] = node
        self.clear_pending(path)

    # -- directories and their markers ----------------------------------------------------

    def made_directory(self, path: str, proven_at: float | None) -> Node:
        """mkdir: the directory exists here at once; Azure gets a marker only if it is
        still empty marker_delay seconds later (localdirs.py). `proven_at`: when its name
        was last proven absent, the start of the time its listing is exact."""
        node = self.node_for(path, True)
        node.marker = False
        node.checked_at = time.monotonic()
        node.mtime = time.time()
        self.local.made(path, proven_at, time.monotonic())
        self.note(path, Entry(True, None))
        return node

    def removed_directory(self, path: str) -> None:
        self.local.removed(path)
        self.forget_path(path)
        self.note(path, None)
        self.changed(path)

    async def is_empty(self, path: str) -> bool:
        """No name under path, judged by what we know when it is fresh (our own listing,
        a cached one with our changes patched in), else by one small LIST (kept: Go's
        RemoveAll reads the directory right after its first rmdir fails)."""
        if self.pending.get(path) or self.local.unmarked_children(path):
            return False
        known = self.local.listing(path, time.monotonic())
        if known is None:
            known = self.listings.get(path)
        if known is None:
            known = await self._list_if_small(path)
        if known is not None:
            return not known
        try:
            return not await self.driver.has_children(self.dir_prefix(path))
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None

    async def drop_markers_above(self, path: str) -> None:
        """A real blob now exists at path: ancestors need no marker (deferred ones are
        forgotten, written ones deleted, once a put in flight for one has landed)."""
        self.local.child_landed(path)
        await self._settle(list(ancestors(path)), subtrees=False)
        for ancestor in ancestors(path):
            node = self.by_path.get(ancestor)
            if node is None or not node.marker:
                continue
            node.marker = False
            self.note(ancestor, Entry(True, None))  # a cached listing must not revive it
            try:
                await self.driver.delete(self.blob_name(ancestor))
            except StorageError as exc:
                log.warning("could not remove directory marker %s: %s", ancestor, exc)

    def keep_directory(self, path: str) -> None:
        """The last child of path may be gone: it stays a directory here, and gets a marker
        later if it is still empty then (write_markers)."""
        node = self.by_path.get(path)
        if path and not (node is not None and node.marker):
            self.local.emptied(path, time.monotonic())

    @asynccontextmanager
    async def changing(self, *paths: str) -> AsyncIterator[None]:
        """Around an rmdir or a directory rename: no marker is written under these paths
        meanwhile, and the puts in flight under them land first (so the change sees, and
        removes or moves, every marker there is)."""
        self._changing.update(paths)
        try:
            await self._settle(list(paths), subtrees=True)
            yield
        finally:
            self._changing.subtract(paths)
            self._changing += Counter()  # drop the zero counts

    async def _settle(self, paths: list[str], subtrees: bool) -> None:
        """Wait for the marker puts in flight at these paths (or under them)."""
        while self._marking:
            busy = [event for marked, event in self._marking.items()
                    if any(is_under(marked, path) if subtrees else marked == path
                           for path in paths)]
            if not busy:
                return
            await busy[0].wait()

    async def write_markers(self, under: str | None = None) -> None:
        """Write the markers that are due (all of them under a path, for fsyncdir and
        unmount), for directories still empty."""
        now = time.monotonic()
        for path in self.local.due(now, under):
            if any(is_under(path, changing) for changing in self._changing):
                self.local.emptied(path, now)  # the rmdir or rename decides its fate
                continue
            self._marking[path] = done = trio.Event()
            try:
                await self._write_marker(path)
            finally:
                del self._marking[path]
                done.set()

    async def _write_marker(self, path: str) -> None:
        try:
            if not await self.is_empty(path):
                return  # a child keeps it visible
            node = self.by_path.get(path)
            # Mode, owner and times set on the directory go into its marker.
            metadata = {**(node.metadata if node is not None else {}), MARKER_KEY: "true"}
            info = await self.driver.put(self.blob_name(path), b"", metadata)
        except (FSError, StorageError) as exc:
            log.warning("directory %s: could not write its marker (retried later): %s",
                        path, getattr(exc, "message", None) or exc)
            self.local.emptied(path, time.monotonic())
            return
        if node is not None:
            node.marker = True
        self.note(path, Entry(True, info))
        await self.drop_markers_above(path)

    async def marker_task(self) -> None:
        """Background: write markers as they fall due."""
        while True:
            await trio.sleep(max(0.05, min(0.5, self.cfg.marker_delay / 4)))
            if self.local.next_due() is not None:
                await self.write_markers()


def _int(value: str | None, default: int, base: int = 10) -> int:
    if not value:
        return default
    try:
        return int(value, base)
    except ValueError:
        return default
