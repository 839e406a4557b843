"""Scans: one flat listing of a subtree, fetched page by page as a walk reaches it.

A walk (find, du, rsync, a registry's garbage-collect or catalog) reads every directory of
a subtree, in name order. Listed one by one, the directories cost a request each, and a
registry has about as many directories as files. A scan lists the subtree flat instead (no
delimiter, up to 5,000 blobs a page), fetches the next page only when the walk reaches
names past the pages it has, and caches the listing of every directory a page holds whole.
A walk costs about objects / 5,000 requests (more when Azure lists slowly: smaller pages,
below), plus one level listing for each directory that straddles a page boundary (the
ancestors of the boundary names: a handful a page).

Invariants:
- Azure lists names in order, so the names under one directory are consecutive, and page i
  holds every blob after page i-1's last name up to its own last name. A directory is whole
  in a page when neither boundary name lies under it (``whole_directories``): prefix tests,
  true in any lexicographic order. Comparing names (UTF-8 bytes, Azure's order) decides only
  which page to fetch, and whether a directory known only by its marker blob is empty.
- A directory that begins in the last page fetched and goes on past it is carried (its
  entries so far); the page after completes it, and a walk at it fetches that page rather
  than list it by level, unless it holds half a full page or more (the scan's root and its
  top directories: the next page seldom completes them, and the walk would wait for pages
  it reaches only later). A scan never answers another directory that a boundary falls in,
  nor one that a refetched page cut: the caller lists those by level.
- Each listing is cached for dir_timeout from when its page was asked for, like any other
  (listings.py). So a page is asked for no bigger than Azure lists within
  PAGE_LATENCY_SHARE of dir_timeout, as measured on the full pages so far (``page_size``,
  MIN_PAGE to 5,000): a page that comes later than dir_timeout is of no use to anyone.
- A directory whose listing expired is refreshed with what the walk will read
  next (``_refresh``): its whole page again, from the page's continuation marker, when the
  walk is fast enough to use it; else the biggest subtree around it that the page held
  whole, flat, if it holds at least a quarter of what the walk will cross in two
  dir_timeouts (at most twice the requests of the page again); else the page. Never each
  small directory by itself. The pages after a refetched page stay if its continuation
  marker is the one it had (they still begin where it ends; what it carries goes to the
  next, ``carry_to``), else they are forgotten, as their boundaries may have moved.
- A fresh page whose listings the cache pushed out (a walk bigger than
  listing_cache_size), while this mount changed nothing since it was asked for, keeps
  them again from ``made`` till its own deadline (``_keep_again``); past MADE_KEPT pages,
  its page is asked for again. Never a level listing of each directory.
- A change this mount makes under a scan while one of its pages is fetched keeps the
  directories it touched out of the cache (the page may predate the change).
- A page asked for again whose answer has the digest of the one it had, while this mount
  changed nothing since (Listings.generation), is not parsed again: the listings it made
  (``made``, the last MADE_KEPT pages) are kept anew from the new request's time. Azure
  said the same, so they are what parsing would give; a walk slower than dir_timeout asks
  for its page many times.
- A lookup's flat listing of a small subtree (Namespace._ask) is adopted as the one page
  of a scan of that subtree (``adopt``): a walk through it after its listings expired
  finds that scan, not none (which started a scan at each directory it came to).
- A directory known here as implicit (no marker blob) is answered as a directory by a page
  fetched within dir_timeout that holds a blob below it (``holds_below``): the kernel
  revalidates a walk's ancestors every dir_entry_timeout, long after their own listings
  expired, and a LIST of each is not needed to know they are still directories.
- Lookups use scans too (``for_lookup``): the one that covers the directory, or one
  started at its parent (``hot``) once lookups missed in HOT_SIBLINGS of its children within
  dir_timeout. A directory's own scan whose pages all expired (a lookup's adopted flat
  listing) counts as a miss, and a hot parent's fresh scan answers before it: else the
  small scans under blobs/sha256/<2 hex>/ hid a hot blobs/sha256/ (a LIST a manifest in
  a garbage-collect). A lookup fetches pages ahead (PAGES_AHEAD) only in a hot scan, and
  refreshes a page it needed twice within dir_timeout whole.
- With a nursery (the daemon's, ``start``), a walk does not wait for the pages it will
  need (``walked``): the page it is in is fetched again in the background before it
  expires, if the walk will still be in it and is fast enough to use it (the page rule of
  ``_refresh``), and the page after before the walk reaches it. Its pace is measured from
  the sample of names (blobs crossed since the page was asked for). One such fetch a scan
  at a time, under the scan's lock like any other; none when a request takes more than
  about a third of dir_timeout. Fetched early, a page only expires sooner: no listing
  lives longer than dir_timeout from its request.
- A scan fetches at most PAGES_AHEAD pages to reach a directory further on; past that, the
  directory gets a scan of its own (a walk that prunes big subtrees does not page through
  them).
- Memory: a scan keeps its page boundaries (two names a page and a sample of SAMPLES);
  listings live in the listing cache, bounded in bytes, and in ``made`` (MADE_KEPT pages'
  worth, mostly the same objects as the cache's: enough for the pages a garbage-collect
  alternates between, 2 to 3 each of repositories/ and blobs/sha256/). At most MAX_SCANS
  scans are kept, the least recently used dropped.

Code between two ``await``s is atomic (trio); one page of a scan is fetched at a time, under
its lock. Callers that waited for the lock while the request under it failed get that
failure (``_locked``): while Azure is unreachable, no caller waits for more than the request
it found in flight, however many are queued.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import cachetools
import trio

from ..storage.driver import LIST_PAGE, BlobInfo, StorageError
from .listings import Listings, Watch
from .nodes import Entry, FSError, ancestors, is_under, parent_of

log = logging.getLogger(__name__)

PAGES_AHEAD = 2
MIN_PAGE = 500  # the smallest flat page a scan asks for, however slow Azure lists
# Of dir_timeout, how long a flat page's LIST may take: the rest is what the walk has to
# read it before its listings expire (they live dir_timeout from the request).
PAGE_LATENCY_SHARE = 0.25
SAMPLES = 100  # names a page keeps: how far into it a walk got
MAX_SCANS = 256
MADE_KEPT = 8  # pages whose listings are kept to be made again without parsing (_fetch)
AHEAD_CHECK_EVERY = 0.01  # seconds between a walk's checks for a page to fetch ahead
HOT_SIBLINGS = 3  # children of one directory missed by lookups within dir_timeout: scan it
MAX_CARRIED = 5000  # entries a directory going on into the next page may carry
AHEAD = -1  # locate(): the names lie past the pages fetched so far
GOES_ON = -2  # locate(): the names go on past the last page fetched


@dataclass
class Page:
    marker: str | None  # the continuation that lists this page (None: the scan's first)
    last: str | None  # its last blob name (None: no page so far held a blob)
    next_marker: str | None  # None: the scan's last page
    asked_at: float  # monotonic, when its request was sent
    blobs: int = 0
    stride: int = 1
    sample: list[str] = field(default_factory=list)  # every stride-th blob name
    refreshed: tuple[float, int] | None = None  # when, and how far in, the last refresh was
    pace: float = 0.0  # blobs the walk crossed per dir_timeout, as last estimated
    generation: int = -1  # Listings.generation when it was asked for
    size: int = 0  # the blobs asked for
    digest: bytes = b""  # of the answer (ListPage.digest)
    took: float = 0.0  # seconds its request took


@dataclass
class Made:
    """What a page made: every directory's listing as parsed (``built``), and those kept
    in the listing cache (``kept``: the whole ones, with what the page before carried)."""
    page: Page
    built: dict[str, dict[str, Entry]]
    kept: dict[str, dict[str, Entry]]
    sizes: dict[str, int]  # the listing cache's size of each kept listing (put_many)
    prefixes: dict[str, str]  # each built directory's blob-name prefix


@dataclass
class Scan:
    root: str  # the directory path listed flat
    prefix: str  # its blob-name prefix
    pages: list[Page] = field(default_factory=list)
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Directories the last page's end falls in, with every entry up to it: the next page
    # completes them (a walk at such a directory fetches that page, not a level listing).
    carry: dict[str, dict[str, Entry]] = field(default_factory=dict)
    carried_at: int = -1  # Listings.generation when carried
    carry_to: int = -1  # the page that completes them
    hot: bool = False  # lookups in many of its children: they may fetch pages ahead too
    failed: tuple[float, FSError] | None = None  # when a fetch under its lock last failed
    ahead: bool = False  # a page is being fetched ahead of the walk (``walked``)

    @property
    def ended(self) -> bool:
        return bool(self.pages) and self.pages[-1].next_marker is None

    def locate(self, dir_prefix: str) -> int | None:
        """The index of the page that holds every name under dir_prefix; AHEAD if they lie
        past the pages fetched; GOES_ON if they begin in the last page fetched and go on
        past it; None if a page boundary before that falls among them."""
        previous: str | None = None
        for index, page in enumerate(self.pages):
            if _under(previous, dir_prefix):
                return None
            if _under(page.last, dir_prefix):
                if page.next_marker is None:
                    return index
                return GOES_ON if index == len(self.pages) - 1 else None
            if page.last is not None and sorts_after(page.last, dir_prefix):
                return index
            previous = page.last
        return len(self.pages) - 1 if self.ended else AHEAD


def _page(marker: str | None, blobs: list[BlobInfo], last: str | None,
          next_marker: str | None, asked_at: float, generation: int, size: int = 0,
          digest: bytes = b"") -> Page:
    """A page holding these blobs, with its sample of every stride-th name."""
    stride = max(1, len(blobs) // SAMPLES)
    return Page(marker, last, next_marker, asked_at, len(blobs), stride,
                [blob.name for blob in blobs[::stride]], generation=generation, size=size,
                digest=digest)


def _span(page: Page, dir_prefix: str) -> int:
    """About how many of the page's blobs lie under dir_prefix (from its sample)."""
    first = bisect.bisect_left(page.sample, dir_prefix)
    return (bisect.bisect_left(page.sample, dir_prefix + "\U0010ffff") - first) * page.stride


def _walked_into(page: Page, dir_prefix: str) -> int:
    """About how many of the page's blobs come before dir_prefix (from its sample)."""
    return bisect.bisect_left(page.sample, dir_prefix) * page.stride


def _under(name: str | None, dir_prefix: str) -> bool:
    return name is not None and name.startswith(dir_prefix)


def sorts_after(name: str, dir_prefix: str) -> bool:
    """name comes after every name under dir_prefix in Azure's order (UTF-8 bytes)."""
    return not name.startswith(dir_prefix) and name.encode() > dir_prefix.encode()


def whole_directories(listings: dict[str, dict[str, Entry]], dir_prefix: dict[str, str],
                      previous_last: str | None, last: str | None, is_last: bool,
                      carried: Collection[str] = ()) -> list[str]:
    """The directories of one page (``listings``, built from its blobs) whose every name
    the page holds, or that it completes (`carried`: their entries from earlier pages are
    merged in). `dir_prefix` maps each directory to its blob-name prefix; the page holds
    the names after `previous_last` (None: from the first) up to `last`."""
    whole = []
    for directory, entries in listings.items():
        prefix = dir_prefix[directory]
        if _under(previous_last, prefix) and directory not in carried:
            continue  # began on an earlier page
        if not is_last:
            if last is None or last.startswith(prefix):
                continue  # goes on in the next page
            if not entries and not sorts_after(last, prefix):
                continue  # known by its marker only: its names, if any, come later
        whole.append(directory)
    return whole


class Scans:
    def __init__(self, listings: Listings, dir_timeout: float) -> None:
        self.lists = listings
        self.dir_timeout = dir_timeout
        self.scans: cachetools.LRUCache[str, Scan] = cachetools.LRUCache(maxsize=MAX_SCANS)
        self.list_rate: float | None = None  # blobs a second full flat pages came in at
        # The listings the last MADE_KEPT pages fetched made (Listings.tree), and those of
        # them kept in the listing cache, by page: one
        # asked for again with the same answer makes them again without parsing (_fetch).
        self.made: OrderedDict[int, Made] = OrderedDict()
        # directory -> its children in which lookups just missed (for_lookup)
        self.missed_under: cachetools.TTLCache[str, set[str]] = cachetools.TTLCache(
            maxsize=4096, ttl=max(dir_timeout, 0.001))
        self.nursery: trio.Nursery | None = None  # where pages are fetched ahead (walked)
        self.checked_at = 0.0  # when walked last looked for a page to fetch ahead

    def start(self, nursery: trio.Nursery) -> None:
        """Fetch pages ahead of walks in this nursery (the daemon's); without one, a walk
        waits for every page it needs."""
        self.nursery = nursery

    def covering(self, path: str) -> Scan | None:
        """The deepest scan whose subtree holds path."""
        probe: str | None = path
        while probe is not None:
            scan = self.scans.get(probe)
            if scan is not None:
                return scan
            probe = parent_of(probe) if probe else None
        return None

    async def listing(self, path: str) -> dict[str, Entry] | None:
        """A walk's (readdir's) listing of the directory, from the scan that covers it
        (started here if none does), or None: the caller lists it by level."""
        scan = self.covering(path) or self._start(path)
        return await self._answer(scan, path, walking=True)

    def adopt(self, path: str, blobs: list[BlobInfo], asked_at: float, generation: int) -> None:
        """A lookup's flat listing of a whole small subtree (Namespace._ask) becomes the one
        page of a scan of it. Without one, a walk through that subtree found no scan once its
        listings expired, and started one at each directory: a request per directory."""
        self._start(path).pages.append(_page(
            None, blobs, blobs[-1].name if blobs else None, None, asked_at, generation))

    def holds_below(self, path: str) -> bool:
        """A page fetched within dir_timeout holds a blob below path: path is a directory
        (an ancestor of a walk, which the kernel asks about again every
        dir_entry_timeout while its own listing has long expired)."""
        dir_prefix, now = self.lists.dir_prefix(path), time.monotonic()
        for root in list(self.scans):
            scan: Scan = cachetools.Cache.__getitem__(self.scans, root)  # no LRU reorder
            inside = is_under(root, path)  # the whole scan lies below path
            if not inside and not is_under(path, root):
                continue
            for page in scan.pages:
                if page.blobs and now - page.asked_at < self.dir_timeout and (
                        inside or _span(page, dir_prefix) > 0):
                    return True
        return False

    async def for_lookup(self, path: str) -> dict[str, Entry] | None:
        """A lookup's listing of the directory, from a scan that covers it or one started
        at its parent once lookups missed in HOT_SIBLINGS of the parent's children within
        dir_timeout (a garbage-collect reads manifests under blobs/sha256/<2 hex>/ in no
        order a walk follows); else None. A lookup fetches pages ahead only in a hot scan."""
        scan = self.covering(path)
        if scan is None or (path and scan.root == path and self._expired(scan)):
            # No scan, or only this directory's own whose pages all expired (most often a
            # lookup's adopted flat listing): a miss toward the parent's hotness. Else the
            # small scans adopted under blobs/sha256/<2 hex>/ hid a hot blobs/sha256/.
            if not path:
                return None
            parent = parent_of(path)
            above = self.scans.get(parent)
            if above is not None and above.hot and not self._expired(above):
                scan = above  # the parent was scanned for hot siblings just now
            else:
                missed = self.missed_under.setdefault(parent, set())
                missed.add(path)
                if len(missed) >= HOT_SIBLINGS:
                    del self.missed_under[parent]
                    scan = above or self._start(parent)
                    scan.hot = True
                elif scan is None:
                    return None
        return await self._answer(scan, path, walking=False)

    def walked(self, path: str) -> None:
        """A walk read the directory's listing. Fetch in the background the page it will
        need before it needs it (``_ahead_of``): the walk goes on from the listings it has
        while Azure answers, instead of waiting for every page, and every refetch of the
        page it is in. Listings still live dir_timeout from their request: a page fetched
        ahead is only ever younger than one fetched when the walk came to it."""
        if self.nursery is None:
            return
        now = time.monotonic()
        if now - self.checked_at < AHEAD_CHECK_EVERY:
            return
        self.checked_at = now
        scan = self.covering(path)
        if scan is None or scan.ahead or scan.lock.locked():
            return
        ahead = self._ahead_of(scan, path, now)
        if ahead is not None:
            index, done = ahead
            scan.ahead = True
            old = scan.pages[index] if index < len(scan.pages) else None
            self.nursery.start_soon(self._fetch_ahead, scan, index, old, done)

    def _ahead_of(self, scan: Scan, path: str, now: float) -> tuple[int, int] | None:
        """The page a walk at path will need within the time a request takes (and how far
        into it the walk is): the page it is in, if it expires before the walk leaves it
        and the walk is fast enough to use much of it again (the page rule of
        ``_refresh``); else the page after, if the walk reaches it before it would come
        and it is not fetched, or would be expired by then. None: nothing, or Azure lists
        too slowly (a request taking about a third of dir_timeout) for it to pay."""
        dir_prefix = self.lists.dir_prefix(path)
        where = scan.locate(dir_prefix)
        if where is None or where < 0:
            return None
        page = scan.pages[where]
        lead = 1.5 * page.took + AHEAD_CHECK_EVERY  # how early a request starts to be in time
        if not page.blobs or not page.took or 2 * lead > self.dir_timeout:
            return None
        done = _walked_into(page, dir_prefix)
        if now - (page.refreshed or (page.asked_at, 0))[0] < lead:
            return None  # too soon to measure a pace
        pace = self._pace(page, done, now)
        if not pace:
            return None  # the walk is no further on than when the pace was last measured
        left = page.blobs - done
        leaves_in = left * self.dir_timeout / pace  # seconds
        expires_in = page.asked_at + self.dir_timeout - now
        if expires_in < max(lead, self.dir_timeout / 4) and leaves_in > expires_in:
            return (where, done) if 2 * pace >= left / 2 else None
        # The page after: early rather than late (a walk goes in bursts: a directory's
        # files, then the next); fetched early, it only expires a little sooner.
        if leaves_in < self.dir_timeout / 2 and where + 1 < len(scan.pages) + (not scan.ended):
            following = scan.pages[where + 1] if where + 1 < len(scan.pages) else None
            if following is None or \
                    following.asked_at + self.dir_timeout < now + leaves_in + lead:
                return where + 1, 0
        return None

    async def _fetch_ahead(self, scan: Scan, index: int, old: Page | None, done: int) -> None:
        """Fetch page `index` of the scan for a walk on its way to it (``walked``), unless
        someone fetched it meanwhile; a failure is the walk's to meet, when it gets there."""
        try:
            async with self._locked(scan):
                current = scan.pages[index] if index < len(scan.pages) else None
                if current is not old or index > len(scan.pages):
                    return
                log.debug("page %d of the scan of %r fetched ahead of a walk", index, scan.root)
                asked_at = time.monotonic()
                await self._fetch(scan, index)
                if index < len(scan.pages):
                    # The walk's pace in it is measured from where it was at the request.
                    scan.pages[index].refreshed = (asked_at, done)
        except FSError as exc:
            log.debug("page %d of the scan of %r, fetched ahead of a walk: %s", index,
                      scan.root, exc)
        except Exception:  # a bug here must not take the mount down with it
            log.exception("page %d of the scan of %r, fetched ahead of a walk, failed "
                          "unexpectedly", index, scan.root)
        finally:
            scan.ahead = False

    def _expired(self, scan: Scan) -> bool:
        """Every page of the scan was asked for dir_timeout ago or more."""
        now = time.monotonic()
        return all(now - page.asked_at >= self.dir_timeout for page in scan.pages)

    @asynccontextmanager
    async def _locked(self, scan: Scan) -> AsyncIterator[None]:
        """The scan's lock: one fetch at a time. A caller that waited while the holder's
        request failed (Azure unreachable: every retry timed out) gets that failure, not a
        request of its own after it: no caller waits out two requests' worst cases (or,
        queued behind others, many)."""
        waited_from = time.monotonic()
        async with scan.lock:
            failed = scan.failed
            if failed is not None and failed[0] >= waited_from:
                error = FSError(failed[1].errno, failed[1].message)
                error.repeated = True  # logged once, by the caller whose request it was
                raise error
            try:
                yield
            except FSError as exc:
                scan.failed = (time.monotonic(), exc)
                raise

    async def _answer(self, scan: Scan, path: str, walking: bool) -> dict[str, Entry] | None:
        """The listing for a walk; for a lookup, only one fetched by this call (a missing
        name is asked of Azure: a cached listing may only answer it with a yes)."""
        dir_prefix = self.lists.dir_prefix(path)
        cached = self.lists.get(path)

        def usable(entries: dict[str, Entry] | None) -> dict[str, Entry] | None:
            return entries if walking or entries is not cached else None

        async with self._locked(scan):
            for _ in range(PAGES_AHEAD):
                entries = usable(self.lists.get(path))
                if entries is not None:
                    return entries
                if walking and path in scan.carry:
                    last = scan.pages[scan.carry_to - 1]
                    if last.blobs >= MIN_PAGE and _span(last, dir_prefix) * 2 >= last.blobs:
                        # Half a full page or more (the scan's root, its top directories):
                        # the next page seldom completes it. By level, and the walk goes on
                        # rather than wait for pages it reaches later (or ahead of it).
                        return None
                    await self._fetch(scan, scan.carry_to)  # completes it, most often
                    if path in scan.carry:
                        return None  # a big directory: listed by level
                    continue
                where = scan.locate(dir_prefix)
                if where is None or where == GOES_ON:
                    if walking and self._kept_by_a_page(scan, path):
                        continue  # completed by the page after the boundary: kept again
                    return None  # a page boundary falls in it
                if where == AHEAD and not walking and scan.pages and not scan.hot:
                    return None  # a lookup pages through nothing, but in a hot scan
                if where == AHEAD:
                    await self._fetch(scan, len(scan.pages))
                    continue
                if time.monotonic() - scan.pages[where].asked_at >= self.dir_timeout:
                    await self._refresh(scan, where, path, walking)
                elif walking and self.lists.get(path) is None and \
                        scan.pages[where].generation == self.lists.generation and \
                        not self._keep_again(scan.pages[where]):
                    # Fresh, and nothing changed here since, but not in the listing cache:
                    # pushed out by what came after it (a walk bigger than
                    # listing_cache_size), and no longer in ``made``. The page again (one
                    # request for what the walk reads next), not a level listing of each
                    # directory left in it.
                    log.debug("listing of %r pushed out of the listing cache: page %d of "
                              "the scan of %r again", path, where, scan.root)
                    await self._fetch(scan, where)
                return usable(self.lists.get(path))  # None if we changed it meanwhile
            entries = usable(self.lists.get(path))
            if entries is not None or path == scan.root or not walking:
                return entries
        # Far past this scan's pages (the walk skipped a subtree): a scan of its own.
        return await self._answer(self._start(path), path, walking)

    async def _refresh(self, scan: Scan, where: int, path: str, walking: bool) -> None:
        """The listing of path expired: refresh what the walk will read next. A walk that
        will cross much of the rest of the page within two dir_timeouts gets the whole page
        again (one request for all of it); a slower one (a garbage-collect reads files
        between its readdirs) the biggest subtree around path that it will still be in.
        The pace is measured between refreshes (from the page's fetch, for the first), and
        kept when the walk starts again. Lookups in no order get the page when they needed
        a second refresh in it within dir_timeout."""
        page = scan.pages[where]
        now = time.monotonic()
        done = _walked_into(page, self.lists.dir_prefix(path))
        pace = self._pace(page, done, now)
        if pace is None:  # the walk started again (a registry's catalog does, page after page)
            pace = page.pace
        if not walking and page.refreshed is not None and \
                now - page.refreshed[0] < self.dir_timeout:
            pace = page.blobs  # lookups needed it twice within dir_timeout: a hot page
        page.refreshed, page.pace = (now, done), pace
        need = 2 * pace  # blobs the walk will cross in the next two dir_timeouts
        if need < (page.blobs - done) / 2:
            # The biggest subtree around path, held whole by the page, that the walk will
            # still be in: its size estimated from the page's sample of names.
            top = path
            for ancestor in ancestors(path):
                prefix = self.lists.dir_prefix(ancestor)
                if not is_under(ancestor, scan.root) or ancestor == scan.root or \
                        scan.locate(prefix) != where or _span(page, prefix) > need:
                    break
                top = ancestor
            # A subtree that covers less than a quarter of what the walk will cross costs
            # more than twice the requests of the page again (which serves all of it): a
            # walk through many small directories would list each by itself.
            if _span(page, self.lists.dir_prefix(top)) * 4 >= need and \
                    await self.lists.subtree_if_small(top, LIST_PAGE) is not None:
                return
        await self._fetch(scan, where)
        if where < len(scan.pages):
            scan.pages[where].refreshed, scan.pages[where].pace = (now, done), pace

    def _pace(self, page: Page, done: int, now: float) -> float | None:
        """Blobs of the page a walk now `done` blobs into it crosses a dir_timeout: since the
        page's last refresh (when and how far in the walk was then), or since it was asked
        for. None if the walk is no further on than then (it started again)."""
        since, before = page.refreshed or (page.asked_at, 0)
        if page.refreshed is not None and done <= before:
            return None
        return (done - before) * self.dir_timeout / max(now - since, 1e-3)

    def _keep_again(self, page: Page) -> bool:
        """Keep again the listings a fresh page kept, while this mount changed nothing
        since it was asked for: they are what it would say, till its own deadline."""
        made = self.made.get(id(page))
        if made is None or made.page is not page or page.generation != self.lists.generation:
            return False
        self.lists.keep_walked(made.kept, page.asked_at, made.sizes)
        self.made.move_to_end(id(page))
        return True

    def _kept_by_a_page(self, scan: Scan, path: str) -> bool:
        """A fresh page of the scan kept the directory (one it completed, that a boundary
        falls in) and keeps it again (``_keep_again``)."""
        now = time.monotonic()
        for page in scan.pages:
            made = self.made.get(id(page))
            if made is not None and path in made.kept and \
                    now - page.asked_at < self.dir_timeout and self._keep_again(page):
                return True
        return False

    def page_size(self) -> int:
        """The blobs to ask of a flat page: as many as Azure lists within
        PAGE_LATENCY_SHARE of dir_timeout, at the rate full pages came in so far, between
        MIN_PAGE and LIST_PAGE. A page of 5,000 that takes longer than dir_timeout (Azurite
        with many blobs) is stale on arrival: the walk would wait for it, get nothing it
        may keep, and ask for it again."""
        if self.list_rate is None:
            return LIST_PAGE
        wanted = int(self.list_rate * self.dir_timeout * PAGE_LATENCY_SHARE)
        return max(MIN_PAGE, min(LIST_PAGE, wanted))

    def _measured(self, blobs: int, took: float) -> None:
        """A full flat page of `blobs` came in `took` seconds after it was asked for."""
        rate = blobs / max(took, 1e-3)
        self.list_rate = rate if self.list_rate is None else (self.list_rate + rate) / 2

    def _start(self, path: str) -> Scan:
        scan = self.scans[path] = Scan(path, self.lists.dir_prefix(path))
        return scan

    async def _fetch(self, scan: Scan, index: int) -> None:
        """(Re)fetch page `index` of a scan; cache every directory it holds whole.

        A page asked for again (its listings expired under the walk) whose answer is the
        one it had, while this mount changed nothing since, is neither parsed nor turned
        into listings again: the listings it made (``made``) are kept anew, from this
        request's time. What Azure said is the same, so they are what parsing would give."""
        marker = scan.pages[index - 1].next_marker if index else None
        # Carried entries hold while this mount changed nothing since they were listed.
        carried = scan.carry if index == scan.carry_to and \
            scan.carried_at == self.lists.generation else {}
        scan.carry = {}
        size = self.page_size()
        old = scan.pages[index] if index < len(scan.pages) else None
        if old is not None and old.size and size >= old.size * 0.8:
            size = old.size  # the same request again: its answer may be the same (``made``)
        # Held by ``made``, a page's id is not reused while it is there.
        made = self.made.pop(id(old), None) if old is not None else None
        if made is not None and (old.size != size or old.generation != self.lists.generation):
            made = None
        changed = Watch()
        self.lists.watchers.append(changed)
        asked_at, generation = time.monotonic(), self.lists.generation
        try:
            page = await self.lists.driver.list_page(
                scan.prefix, marker, size, old.digest if made is not None else b"")
        except StorageError as exc:
            raise FSError(exc.errno, str(exc)) from None
        finally:
            self.lists.watchers.remove(changed)
        took = time.monotonic() - asked_at
        previous_last = scan.pages[index - 1].last if index else None
        if page.unchanged and made is not None and old is not None:
            log.debug("page %d of the scan of %r asked for again: unchanged, not parsed",
                      index, scan.root)
            built, sizes, prefixes = made.built, made.sizes, made.prefixes
            last, next_marker = old.last, old.next_marker
            new = replace(old, asked_at=asked_at, generation=generation, refreshed=None,
                          pace=0.0, took=took)
        else:
            if page.next_marker is not None:  # a full page: its size set how long it took
                self._measured(len(page.blobs), took)
            built = self.lists.tree(scan.root, page.blobs)
            sizes, prefixes = {}, {directory: self.lists.dir_prefix(directory)
                                   for directory in built}
            last = page.blobs[-1].name if page.blobs else previous_last
            next_marker = page.next_marker
            new = _page(marker, page.blobs, last, next_marker, asked_at, generation, size,
                        page.digest)
            new.took = took
        # The pages after it still begin where it ends if its continuation is the one it
        # had: they stay (a walk refetching pages in order carries from one to the next).
        later = scan.pages[index + 1:] if old is not None and next_marker is not None \
            and next_marker == old.next_marker else []
        del scan.pages[index:]
        scan.pages.append(new)
        scan.pages.extend(later)
        listings = dict(built)  # built stays as parsing made it: carried entries go here
        built_prefixes = prefixes
        if carried:
            prefixes = dict(prefixes)
            for directory, entries in carried.items():
                listings[directory] = {**entries, **listings.get(directory, {})}
                prefixes[directory] = self.lists.dir_prefix(directory)
        whole = whole_directories(listings, prefixes, previous_last, last,
                                  next_marker is None, carried)
        touches = changed.touches if changed.dirs or changed.subtrees else None
        kept = {directory: listings[directory] for directory in whole
                if not (touches and touches(directory))}
        self.lists.keep_walked(kept, asked_at, sizes)
        for directory in carried:
            sizes.pop(directory, None)  # merged for this fetch only
        # The one it replaces left above; what was carried is not built (made again).
        self.made[id(new)] = Made(new, built, kept, sizes, built_prefixes)
        while len(self.made) > MADE_KEPT:
            self.made.popitem(last=False)
        if next_marker is not None and last is not None:
            for directory in listings.keys() - set(whole):
                began_here = not _under(previous_last, prefixes[directory])
                if (began_here or directory in carried) and last.startswith(
                        prefixes[directory]) and len(listings[directory]) <= MAX_CARRIED \
                        and not changed.touches(directory):
                    scan.carry[directory] = listings[directory]
        scan.carried_at, scan.carry_to = self.lists.generation, index + 1
