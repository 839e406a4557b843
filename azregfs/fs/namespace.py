"""The namespace: inodes, paths, attributes and lookups, over the listings (listings.py),
this mount's own directories (localdirs.py) and their markers (markers.py).

Invariants:
- One Node per path the kernel knows; ``lookups`` counts the kernel's references (lookup,
  create, mkdir, and each entry ``readdir`` hands out) and ``forget`` drops the node when it
  reaches zero and no handle or write is open, so walking a huge tree leaves nothing behind.
- A path is a '/'-joined relative path ('' is the root); the blob name is the configured
  prefix plus the path. Directories are name prefixes, or marker blobs (zero length,
  metadata hdi_isfolder=true) for empty directories. Markers never show as files.
- Files created but not yet committed exist only here (``pending``): listings merge them in.
- Positive answers may come from a listing cached for dir_timeout; a missing name is asked
  of Azure, except right after our own failed lookup and in a directory made here while
  the proof of its absence is younger than dir_timeout (``resolve``). So a file closed on
  any host opens here within dir_timeout of its close.
- Our own changes reach every table at once (``note``, ``changed``).

Code between two ``await``s is atomic (trio): the tables are only mutated synchronously.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections import deque

import cachetools
import pyfuse3

from ..config import Config
from ..storage.driver import MAX_NAME, BlobInfo, Driver, StorageError
from ..storage.flight import Flight
from ..storage.recent import RecentFailures
from .filetypes import file_type, rdev
from .listings import FLAT_LOOKUP, Listings
from .localdirs import LocalDirs
from .markers import Markers
from .nodes import Entry, FSError, Node, join, mtime_of, parent_of
from .scans import Scans

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
MAX_SEGMENTS = 254
NAME_MAX = 255


class Namespace:
    def __init__(self, cfg: Config, driver: Driver) -> None:
        self.cfg = cfg
        self.driver = driver
        self.prefix = cfg.prefix
        self.started = time.time()
        root = Node(ROOT_INODE, "", True, mtime=self.started, lookups=1)
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.created: deque[int] = deque()  # inodes in the order made (budget.py), or gone
        self.by_path: dict[str, Node] = {"": root}
        self.next_inode = ROOT_INODE + 1
        self.lists = Listings(cfg, driver)
        self.scans = Scans(self.lists, cfg.dir_timeout)  # walks list subtrees flat
        # path -> the lookup asking Azure about it
        self._asking: dict[str, Flight[Entry | None]] = {}
        self.failed: RecentFailures[str] = RecentFailures()  # paths whose lookup just failed
        self.pending: dict[str, set[str]] = {}  # dir path -> names created, not committed
        # Paths just proven absent -> when (monotonic): the create() that the kernel sends
        # right after its failed lookup need not ask again, and a mkdir knows how long the
        # new directory's listing is exact. Never used to answer a lookup.
        self.absent: cachetools.TTLCache[str, float] = cachetools.TTLCache(
            maxsize=4096, ttl=min(1.0, max(cfg.dir_timeout, 0.001)))
        # Directories made here (their exact listing, for dir_timeout from the proof of
        # their absence) and those whose marker blob is deferred: see localdirs.py.
        self.local: LocalDirs[Entry] = LocalDirs(cfg.dir_timeout, cfg.marker_delay)
        self.markers = Markers(self)

    # -- names -----------------------------------------------------------------------------

    def blob_name(self, path: str) -> str:
        return self.prefix + path

    def dir_prefix(self, path: str) -> str:
        return self.lists.dir_prefix(path)

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
            self.created.append(node.inode)
            if len(self.created) > 2 * len(self.nodes) + 1024:  # mostly dropped ones
                self.created = deque(inode for inode in self.nodes if inode != ROOT_INODE)
        return node

    def _apply_entry(self, node: Node, entry: Entry) -> None:
        if node.writing:
            return
        if entry.is_dir:
            node.marker = entry.info is not None
            if entry.info is not None:
                # The marker keeps the directory's mode, owner and times (chmod, chown, utime).
                node.metadata = dict(entry.info.metadata)
                node.mtime = mtime_of(entry.info)
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
            attr.st_nlink = 0 if node.gone else 1  # unlinked while open, as POSIX says
            attr.st_size = node.size
        attr.st_uid = _int(meta.get("uid"), self.cfg.uid)
        attr.st_gid = _int(meta.get("gid"), self.cfg.gid)
        attr.st_rdev = rdev(meta)
        attr.st_blksize = 1 << 20
        attr.st_blocks = (attr.st_size + 511) // 512
        # utimensat's nanoseconds survive: the metadata strings are read exactly, the float
        # only when it is newer than them (a write, a change to a directory).
        mtime = _exact_ns(meta.get("mtime"), node.mtime)
        attr.st_mtime_ns = mtime
        attr.st_ctime_ns = max(mtime, round(node.changed_at * 1e9))
        atime = meta.get("atime")
        attr.st_atime_ns = _exact_ns(atime, None) if atime else mtime
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

        Positive answers may come from a cached listing, whole or partial (for dir_timeout;
        listings.py); a negative one is Azure's, so a name another host just wrote is seen
        at once -- except by the create() that follows our own failed lookup
        (``just_looked_up``), and in a directory this mount made, whose absence Azure
        proved less than dir_timeout ago (localdirs.py): within the consistency contract
        either way."""
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
        listing = self.lists.get(parent)
        if listing is not None and name in listing:
            return listing[name]
        seen = self.lists.seen(path)
        if seen is not None:
            return seen
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
        node = self.by_path.get(path)
        implicit = node is not None and node.is_dir and not node.marker
        if implicit and self.scans.holds_below(path):
            # Still a directory: a fresh flat page holds blobs below it. Only for one known
            # to have no marker blob, whose mode and times a marker would carry.
            return Entry(True, None)
        listing = await self.scans.for_lookup(parent)
        if listing is not None:  # a flat page held the parent whole (scans.py)
            return listing.get(name)
        if self.lists.may_list_flat(parent, FLAT_LOOKUP):
            # One flat LIST of a small subtree answers this name and every lookup below
            # the parent for dir_timeout (a registry pull walks one repository this way).
            listing = await self.lists.subtree_if_small(
                parent, FLAT_LOOKUP,
                lambda blobs, at, generation: self.scans.adopt(parent, blobs, at, generation))
            if listing is not None:
                return listing.get(name)
            seen = self.lists.seen(path)  # too big, but its first page may show the name
            if seen is not None:
                return seen
        if self.lists.is_small(parent):
            # One LIST answers this name and the next ones here: cheaper than HEAD + LIST.
            listing = await self.lists.level_if_small(parent)
            if listing is not None:
                return listing.get(name)
        if implicit and await self._has_children(path):
            # One request (is any blob below?) where a HEAD and a listing of its big parent
            # took two: the kernel revalidates a walk's ancestors every dir_entry_timeout.
            return Entry(True, None)
        info = await self._head(path)
        if info is not None:
            return Entry(info.is_marker, info)
        listing = await self.lists.level_if_small(parent)
        if listing is not None:
            return listing.get(name)
        if not implicit and await self._has_children(path):
            return Entry(True, None)
        return None

    async def _has_children(self, path: str) -> bool:
        try:
            return await self.driver.has_children(self.dir_prefix(path))
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None

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
            entries = self.lists.get(directory.path)
            if entries is None:
                entries = await self.scans.listing(directory.path)
            self.scans.walked(directory.path)  # pages fetched ahead of the walk
        if entries is None:
            entries = await self.lists.level(directory.path)
        pending = self.pending.get(directory.path)
        unmarked = self.local.unmarked_children(directory.path)
        if pending or unmarked:
            entries = dict(entries)
            for name in pending or ():
                entries.setdefault(name, Entry(False, None))
            for name in unmarked:
                entries.setdefault(name, Entry(True, None))
        return entries

    # -- changes made through this mount ---------------------------------------------------

    def changed(self, *dir_paths: str) -> None:
        """Our own change to these whole directories (listings.py)."""
        self.lists.changed(*dir_paths)

    def note(self, path: str, entry: Entry | None) -> None:
        """Our own change to one name: what is known of it (absent, failed, listed, made
        here) follows at once."""
        self.absent.pop(path, None)
        self.failed.forget(path)
        self.local.note(path, entry)
        self.lists.note(path, entry)

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
            known = self.lists.get(path)
        if known is None:
            known = await self.lists.level_if_small(path)
        if known is not None:
            return not known
        try:
            return not await self.driver.has_children(self.dir_prefix(path))
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None

    def keep_directory(self, path: str) -> None:
        """The last child of path may be gone: it stays a directory here, and gets a marker
        later if it is still empty then (markers.py)."""
        node = self.by_path.get(path)
        if path and not (node is not None and node.marker):
            self.local.emptied(path, time.monotonic())


def time_text(ns: int) -> str:
    """A time in metadata: seconds with all nine decimals, so that nanoseconds survive."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _exact_ns(text: str | None, current: float | None) -> int:
    """Nanoseconds from a metadata time, if it is what `current` holds (None: any); else
    `current` itself (0 if None)."""
    fallback = round(current * 1e9) if current is not None else 0
    if not text:
        return fallback
    seconds, _, fraction = text.partition(".")
    try:
        exact = int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])
    except ValueError:
        return fallback
    if current is not None and abs(exact - fallback) > 1000:
        return fallback  # changed since (a write, an entry added here)
    return exact


def _int(value: str | None, default: int, base: int = 10) -> int:
    if not value:
        return default
    try:
        return int(value, base)
    except ValueError:
        return default
