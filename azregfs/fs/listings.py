"""Directory listings: fetched from Azure, cached for dir_timeout, and kept true to this
mount's own changes.

Invariants:
- A cached listing is what Azure returned, patched with every change this mount made to
  that directory since (``note``). It lives dir_timeout from when its request was sent,
  not from the reply (a slow LIST's answer is that much older), and its lifetime is never
  extended by a patch, so another host's change still shows within dir_timeout.
- Every fetch in flight for a directory records the changes noted meanwhile and applies
  them to what Azure returned before it is cached, since the LIST may have been answered
  before or after the change landed. A whole-directory change (``changed``) while a fetch
  is in flight makes the fetch start again (at most twice more; the last result is
  returned but not cached). So a file closed on this mount is in the next readdir here,
  whatever listing was in flight when it committed.
- One flat LIST of a small subtree (at most ``limit`` blobs) fills the listing of every
  directory below it. A flat fetch that raced one of our changes (``generation`` moved)
  answers only the directory asked about, from a fresh level listing. A walk's flat pages
  (scans.py) keep out only the directories our changes touched meanwhile (``Watch``).
- A flat LIST of a subtree too big for its limit still proves what its first page holds:
  those names are kept as partial listings (``partial``), for dir_timeout, patched by our
  changes like any listing, and answer lookups with a yes only (``seen``).
- Bounded: listings in estimated bytes (``listing_cache_size``); a listing bigger than
  the whole cache is not kept (each reader lists it again: pages, not memory).
- Names the tree cannot show (empty segments, trailing '/', '.' or '..') are skipped with
  one warning each.

Code between two ``await``s is atomic (trio): the tables are only mutated synchronously.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import cachetools

from ..config import Config
from ..storage.driver import BlobInfo, Driver, StorageError
from .nodes import Entry, FSError, is_under, join

log = logging.getLogger(__name__)

SMALL_LISTING = 1000  # entries a lookup miss may list to answer from the parent's listing
# Blobs a flat LIST may bring to fill a whole subtree: a lookup miss tries one page's worth,
# a readdir (a walk: find, du, a registry's catalog) two pages'.
FLAT_LOOKUP = 1000  # blobs a lookup miss may list flat to fill its parent's whole subtree


@dataclass(eq=False)  # told apart by identity: list.remove() must take this one
class _Fetch:
    """A listing being fetched: our changes to its directory since the fetch began."""

    changes: dict[str, Entry | None] = field(default_factory=dict)  # name -> entry, or gone
    invalidated: bool = False


_SOME_DIR = Entry(True, None)  # a fetch's record: this name is a directory (keep a marker's)


@dataclass(eq=False)  # told apart by identity (watchers.remove in scans.py)
class Watch:
    """Our changes noted while a walk's flat page was fetched: the directories they touched
    (a name added or removed), and the subtrees changed whole (a directory removed or
    renamed)."""

    dirs: set[str] = field(default_factory=set)
    subtrees: set[str] = field(default_factory=set)

    def touches(self, directory: str) -> bool:
        if directory in self.dirs:
            return True
        return bool(self.subtrees) and any(is_under(directory, top) for top in self.subtrees)


class RecentSet:
    """The last `maxsize` paths added (an OrderedDict: cachetools' LRUCache costs some
    2 µs an insert, for each directory of every page a walk keeps)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._paths: OrderedDict[str, None] = OrderedDict()

    def add(self, path: str) -> None:
        paths = self._paths
        if path in paths:
            paths.move_to_end(path)
            return
        paths[path] = None
        if len(paths) > self.maxsize:
            paths.popitem(last=False)

    def discard(self, path: str) -> None:
        self._paths.pop(path, None)

    def __contains__(self, path: object) -> bool:
        return path in self._paths


def _listing_bytes(entries: dict[str, Entry]) -> int:
    """A listing's memory, estimated: names, entries and their blob properties."""
    return 256 + 600 * len(entries) + 2 * sum(map(len, entries))


class ListingCache:
    """Listings by directory path, each for `ttl` seconds from when its request was sent
    (``put``: an answer is as old as the question, not the reply), the least recently used
    dropped first past `maxsize` estimated bytes (``_listing_bytes``, taken when kept).
    cachetools' TTLCache does the same at about three times the CPU: a walk's flat page
    keeps thousands of listings at once (a registry's 5,000 blobs make some 6,700
    directories). Every listing lives for the same ttl, so the order they were kept in is
    about the order they expire in: a queue of (deadline, path) finds the expired ones
    without a scan. One kept after a slower request asked before it expires behind it: it
    is dropped when read, or when the queue reaches it. The queue holds no listing (a
    dropped one is freed at once): an entry of it whose path was dropped, or kept again
    since with a later deadline, is skipped."""

    def __init__(self, maxsize: int, ttl: float,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.timer = timer
        self.currsize = 0
        self._items: OrderedDict[str, tuple[dict[str, Entry], int, float]] = OrderedDict()
        self._deadlines: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: str) -> bool:
        return self.get(path) is not None

    def get(self, path: str) -> dict[str, Entry] | None:
        """The listing while fresh (and now the most recently used), else None."""
        item = self._items.get(path)
        if item is None:
            return None
        if self.timer() >= item[2]:
            self._drop(path)
            return None
        self._items.move_to_end(path)
        return item[0]

    def __setitem__(self, path: str, entries: dict[str, Entry]) -> None:
        self.put(path, entries)

    def put(self, path: str, entries: dict[str, Entry], asked_at: float | None = None) -> None:
        """Keep a listing until `ttl` after `asked_at` (its request's sending; None: now).
        One already that old replaces nothing and is not kept: its caller still has it."""
        self.put_many({path: entries}, self.timer() if asked_at is None else asked_at, {})

    def put_many(self, listings: dict[str, dict[str, Entry]], asked_at: float,
                 sizes: dict[str, int]) -> None:
        """``put`` for the listings of one request (a walk's page), at a fraction of the
        CPU: a garbage-collect keeps a page's thousands of listings again every dir_timeout.
        `sizes` memoizes their ``_listing_bytes`` (filled here): kept again, they are not
        counted again."""
        now = self.timer()
        self._expire(now)
        deadline = asked_at + self.ttl
        if deadline <= now:
            return
        items, deadlines, maxsize = self._items, self._deadlines, self.maxsize
        for path, entries in listings.items():
            size = sizes.get(path)
            if size is None:
                size = sizes[path] = _listing_bytes(entries)
            old = items.pop(path, None)
            if old is not None:
                self.currsize -= old[1]
            if size > maxsize:
                continue
            items[path] = (entries, size, deadline)
            deadlines.append((deadline, path))
            self.currsize += size
            while self.currsize > maxsize:
                self._drop(next(iter(items)))

    def pop(self, path: str, default: dict[str, Entry] | None = None
            ) -> dict[str, Entry] | None:
        item = self._items.get(path)
        if item is None:
            return default
        self._drop(path)
        return item[0]

    def _drop(self, path: str) -> None:
        _, size, _ = self._items.pop(path)
        self.currsize -= size

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, path = deadlines.popleft()
            item = self._items.get(path)
            if item is not None and item[2] <= now:
                self._drop(path)
        if len(deadlines) > 2 * len(self._items) + 64:
            # Replaced and dropped listings left their deadlines behind: keep the queue
            # in proportion to the listings.
            self._deadlines = deque(sorted((item[2], path) for path, item in self._items.items()))


class Listings:
    def __init__(self, cfg: Config, driver: Driver) -> None:
        self.driver = driver
        self.prefix = cfg.prefix
        # Bounded in (estimated) bytes: one flat listing may fill many directories at once.
        self.cache = ListingCache(cfg.listing_cache_size, max(cfg.dir_timeout, 0.001))
        # Names the first page of a subtree too big to list flat showed (``seen``).
        self.partial = ListingCache(cfg.listing_cache_size // 4, max(cfg.dir_timeout, 0.001))
        # Directories whose subtree was too big for a flat listing: the limit it exceeded.
        self.big_subtrees: cachetools.TTLCache[str, int] = cachetools.TTLCache(
            maxsize=4096, ttl=300)
        # Directories whose last listing fit in one small page: lookups there list them.
        self.small_dirs = RecentSet(4096)
        self.generation = 0  # bumped by each change we note: a flat fetch checks it
        self.fetching: dict[str, list[_Fetch]] = {}  # dir path -> listings being fetched
        self.watchers: list[Watch] = []  # a walk's flat pages being fetched (scans.py)
        self.warned: cachetools.LRUCache[str, bool] = cachetools.LRUCache(maxsize=10000)

    def dir_prefix(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def get(self, path: str) -> dict[str, Entry] | None:
        """The cached listing of a directory, while fresh."""
        return self.cache.get(path)

    def may_list_flat(self, path: str, limit: int) -> bool:
        """Not known to hold more than `limit` blobs below it."""
        return self.big_subtrees.get(path, 0) < limit

    def is_small(self, path: str) -> bool:
        return path in self.small_dirs

    def _skip(self, full_name: str, why: str) -> None:
        if full_name not in self.warned:
            self.warned[full_name] = True
            log.warning("blob %r is not shown: %s", full_name, why)

    # -- fetches ---------------------------------------------------------------------------

    async def level(self, path: str) -> dict[str, Entry]:
        """The whole listing of one directory, page after page (and cache it)."""
        entries = await self._fetched(path, self._list)
        assert entries is not None
        return entries

    async def _fetched(self, path: str, fetch: Callable[[str], Awaitable[dict[str, Entry] | None]],
                       attempts: int = 3) -> dict[str, Entry] | None:
        """Run a listing fetch, patch in our changes noted while it ran, and cache it."""
        entries: dict[str, Entry] | None = None
        for _ in range(attempts):
            record = _Fetch()
            self.fetching.setdefault(path, []).append(record)
            asked_at = time.monotonic()
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
                elif entry is _SOME_DIR:  # a directory above a name that landed
                    if name not in entries or not entries[name].is_dir:
                        entries[name] = Entry(True, None)
                else:
                    entries[name] = entry
            if not record.invalidated:
                self.keep(path, entries, asked_at)
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

    async def level_if_small(self, path: str) -> dict[str, Entry] | None:
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
            self.small_dirs.discard(path)
            return None
        entries: dict[str, Entry] = {}
        self._add_page(path, entries, *page)
        self.small_dirs.add(path)
        return entries

    async def subtree_if_small(
        self, path: str, limit: int,
        listed: Callable[[list[BlobInfo], float, int], None] | None = None,
    ) -> dict[str, Entry] | None:
        """The directory's listing from a flat LIST of everything under it, when it holds at
        most `limit` blobs; every directory below is cached too, and `listed` is told the
        blobs, when they were asked for and the generation then. Else None (and a subtree
        too big for `limit` is not listed flat again at that limit for a while)."""
        generation, asked_at = self.generation, time.monotonic()
        try:
            blobs, whole = await self.driver.list_subtree_small(self.dir_prefix(path), limit)
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        if not whole:
            self.big_subtrees[path] = limit  # more than that: not tried again soon
            if blobs and generation == self.generation:
                self._keep_first_page(path, blobs, limit, asked_at)
            return None
        listings = self.tree(path, blobs)
        if generation != self.generation:
            # We changed something while the LIST ran: it may predate that change. Only
            # the directory asked about is answered, from a fresh level listing.
            return await self.level_if_small(path)
        for directory, entries in listings.items():
            self.keep(directory, entries, asked_at)
            self.small_dirs.add(directory)
        if listed is not None:
            listed(blobs, asked_at, generation)
        return listings[path]

    def _keep_first_page(self, path: str, blobs: list[BlobInfo], limit: int,
                         asked_at: float) -> None:
        """A flat LIST of path brought only its first blobs (more than `limit` lie below).
        Every name they hold exists, with its blob (a directory's marker sorts before its
        names, so a directory seen here shows its marker too, if it has one): kept as
        partial listings, for lookups (``seen``). A directory that holds the first and the
        last of them holds as many: no flat LIST of it within `limit` is tried either."""
        first, last = blobs[0].name, blobs[-1].name
        for directory, entries in self.tree(path, blobs).items():
            self.partial.put(directory, entries, asked_at)
            prefix = self.dir_prefix(directory)
            if first.startswith(prefix) and last.startswith(prefix) and \
                    self.big_subtrees.get(directory, 0) < limit:
                self.big_subtrees[directory] = limit

    def seen(self, path: str) -> Entry | None:
        """What a partial listing (``_keep_first_page``) fetched within dir_timeout shows at
        path: a yes only (None says nothing)."""
        parent, _, name = path.rpartition("/")
        listing = self.partial.get(parent)
        return listing.get(name) if listing is not None else None

    def keep(self, path: str, entries: dict[str, Entry], asked_at: float) -> None:
        """Keep a listing until dir_timeout after its request was sent (`asked_at`), unless
        it alone is bigger than the whole cache (such a directory is listed again by each
        reader: pages, not memory)."""
        self.cache.put(path, entries, asked_at)

    def keep_walked(self, listings: dict[str, dict[str, Entry]], asked_at: float,
                    sizes: dict[str, int]) -> None:
        """Directories' whole listings from a walk's flat page (scans.py); `sizes`
        memoizes their sizes (``ListingCache.put_many``)."""
        self.cache.put_many(listings, asked_at, sizes)
        small_dirs = self.small_dirs
        for path, entries in listings.items():
            if len(entries) <= SMALL_LISTING:
                small_dirs.add(path)

    def tree(self, path: str, blobs: list[BlobInfo]) -> dict[str, dict[str, Entry]]:
        """The listing of path and of every directory below it, from a flat listing."""
        start = len(self.dir_prefix(path))
        listings: dict[str, dict[str, Entry]] = {path: {}}
        directories = {"": path}  # a directory's name relative to path -> its path
        for info in blobs:
            relative = info.name[start:]
            framed = f"/{relative}/"
            if "//" in framed or "/./" in framed or "/../" in framed:
                self._skip(info.name, "ends with '/' or has an empty or dot path segment")
                continue
            parent, _, leaf = relative.rpartition("/")
            directory = directories.get(parent)
            if directory is None:
                directory = self._directory(parent, directories, listings)
            entries = listings[directory]
            if info.is_marker:
                entries[leaf] = Entry(True, info)
                listings.setdefault(join(directory, leaf), {})
            elif leaf in entries and entries[leaf].is_dir:
                self._skip(info.name, "a directory of the same name hides it")
            else:
                entries[leaf] = Entry(False, info)
        return listings

    def _directory(self, relative: str, directories: dict[str, str],
                   listings: dict[str, dict[str, Entry]]) -> str:
        """The path of a directory named relative to tree()'s root, entered in its parent's
        listing (and its parents', the first time each is met)."""
        parent_relative, _, name = relative.rpartition("/")
        parent = directories.get(parent_relative)
        if parent is None:
            parent = self._directory(parent_relative, directories, listings)
        entries = listings[parent]
        known = entries.get(name)
        if known is None or not known.is_dir:
            if known is not None:
                self._skip(self.prefix + join(parent, name), "a directory of the same name "
                           "hides it")
            entries[name] = Entry(True, None)
        directory = directories[relative] = join(parent, name)
        listings.setdefault(directory, {})
        return directory

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

    # -- our own changes -------------------------------------------------------------------

    def changed(self, *dir_paths: str) -> None:
        """Our own change to these directories: drop their cached listings (and those being
        fetched: they fetch again)."""
        self.generation += 1
        for watch in self.watchers:
            watch.subtrees.update(dir_paths)
        for path in dir_paths:
            self.cache.pop(path, None)
            self.partial.pop(path, None)
            for record in self.fetching.get(path, ()):
                record.invalidated = True

    def note(self, path: str, entry: Entry | None) -> None:
        """Our own change to one name: patch the parent's cached listing in place (its
        lifetime is unchanged, so other hosts' changes still show within dir_timeout). A
        name that lands also makes every directory above it exist in their listings (a
        file committed in a directory made here makes that directory a prefix in Azure)."""
        self.generation += 1
        parent, _, name = path.rpartition("/")
        self._patch(parent, name, entry)
        if entry is None:
            return
        while parent:
            parent, _, name = parent.rpartition("/")
            self._patch(parent, name, None, ensure_dir=True)

    def _patch(self, parent: str, name: str, entry: Entry | None,
               ensure_dir: bool = False) -> None:
        for watch in self.watchers:
            watch.dirs.add(parent)
        for record in self.fetching.get(parent, ()):
            if not ensure_dir:
                record.changes[name] = entry
            elif name not in record.changes:
                record.changes[name] = _SOME_DIR
        partial = self.partial.get(parent)
        if partial is not None and name in partial and not ensure_dir:
            if entry is None:
                del partial[name]
            else:
                partial[name] = entry
        listing = self.cache.get(parent)
        if listing is None:
            return
        if ensure_dir:
            known = listing.get(name)
            if known is None or not known.is_dir:
                listing[name] = Entry(True, None)
        elif entry is None:
            listing.pop(name, None)
        else:
            listing[name] = entry
