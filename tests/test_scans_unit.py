"""Scans (azregfs/fs/scans.py) without Azure: which directories a flat page holds whole, and
what a walk costs -- pages, not directories -- over a driver that pages a sorted list of
names as List Blobs does. The same walks against Azurite are in tests/test_walks.py."""

from __future__ import annotations

import bisect
import errno
import hashlib

import pytest
import trio

from azregfs.config import Config
from azregfs.fs import scans
from azregfs.fs.namespace import Namespace
from azregfs.fs.nodes import Entry, FSError, join
from azregfs.fs.scans import AHEAD, GOES_ON, MIN_PAGE, Page, Scan, whole_directories
from azregfs.storage.blobs import BlobInfo, ListPage
from azregfs.storage.driver import StorageError


class PagedNames:
    """Blob names listed as Azure lists them: in order, `page` blobs a page, flat or by
    level; every request counted."""

    def __init__(self, names: list[str], page: int = 3, markers: tuple[str, ...] = ()) -> None:
        self.names = sorted(names)
        self.markers = set(markers)
        self.page = page
        self.requests: list[str] = []
        self.sizes: list[int] = []  # each flat page's size asked for (at most `page`)
        self.unchanged = 0  # flat pages answered as the one the caller had
        self.before_answer: list = []  # async callables run before a flat page is answered

    def info(self, name: str) -> BlobInfo:
        metadata = {"hdi_isfolder": "true"} if name in self.markers else {}
        return BlobInfo(name, 0 if metadata else 1, "e", 0.0, metadata)

    async def list_page(self, prefix: str, marker: str | None, size: int = 5000,
                        same_as: bytes = b"") -> ListPage:
        self.requests.append(f"flat {prefix} {marker}")
        for hook in self.before_answer:
            await hook()
        under = [name for name in self.names if name.startswith(prefix)]
        start = bisect.bisect_right(under, marker) if marker else 0
        size = min(size, self.page)
        self.sizes.append(size)
        chunk = under[start:start + size]
        more = start + size < len(under)
        digest = hashlib.blake2b(repr((chunk, more, sorted(self.markers))).encode()).digest()
        if same_as == digest:
            self.unchanged += 1
            return ListPage([], [], None, digest, unchanged=True)
        return ListPage([self.info(name) for name in chunk], [], chunk[-1] if more else None,
                        digest)

    async def list_subtree_small(self, prefix: str, limit: int) -> tuple[list[BlobInfo], bool]:
        self.requests.append(f"subtree {prefix}")
        under = [self.info(name) for name in self.names if name.startswith(prefix)]
        return (under, True) if len(under) <= limit else (under[:limit + 1], False)

    async def has_children(self, prefix: str) -> bool:
        self.requests.append(f"children {prefix}")
        return any(name.startswith(prefix) for name in self.names)

    async def list_level(self, prefix: str):
        self.requests.append(f"level {prefix}")
        blobs, prefixes = [], []
        for name in self.names:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                if "/" in rest:
                    sub = prefix + rest.split("/")[0] + "/"
                    if sub not in prefixes:
                        prefixes.append(sub)
                else:
                    blobs.append(self.info(name))
        yield blobs, prefixes


def truth(names: list[str], path: str) -> set[str]:
    prefix = path + "/" if path else ""
    return {name[len(prefix):].split("/")[0] for name in names if name.startswith(prefix)}


async def walk(ns: Namespace, path: str, seen: dict[str, set[str]]) -> None:
    """Depth first, in name order, as find and Go's filepath.Walk go."""
    node = ns.node_for(path, True)
    listing = await ns.listing(node)
    seen[path] = set(listing)
    for name, entry in sorted(listing.items()):
        if entry.is_dir:
            await walk(ns, join(path, name), seen)


TREE = [f"r{r}/{kind}/{i}/link" for r in range(4) for kind in ("_layers", "_manifests")
        for i in range(3)] + [f"blobs/{d:02x}/data" for d in range(10)]


def test_a_page_holds_whole_the_directories_no_boundary_falls_in() -> None:
    listings = {"": {"a": Entry(True, None)}, "a": {"x": Entry(True, None)},
                "a/x": {"1": Entry(False, None)}, "a/y": {}, "b": {}, "m": {}}
    prefixes = {directory: directory + "/" for directory in listings}
    prefixes[""] = ""
    # The page holds names after "a/w/9" up to "a/z": "a" began earlier and goes on.
    whole = whole_directories(listings, prefixes, "a/w/9", "a/z", is_last=False)
    assert whole == ["a/x", "a/y"]  # "a/y" (a marker, empty) sorts before "a/z": whole
    # "b" is known by its marker only, past the page's last name: its names come later.
    assert "b" not in whole_directories(listings, prefixes, None, "a/z", is_last=False)
    assert set(whole_directories(listings, prefixes, None, "a/z", is_last=True)) == set(
        listings)


def test_locate_finds_the_page_or_says_ahead_or_straddling() -> None:
    scan = Scan("", "", [Page(None, "a/b/3", "m1", 0.0), Page("m1", "c/1", "m2", 0.0)])
    assert scan.locate("a/a/") == 0
    assert scan.locate("a/b/") is None  # page 0 ends inside it
    assert scan.locate("a/") is None
    assert scan.locate("b/") == 1
    assert scan.locate("c/") == GOES_ON  # page 1 ends inside it; the next page may hold more
    assert scan.locate("d/") == AHEAD
    scan.pages[-1].next_marker = None
    assert scan.locate("d/") == 1  # past the last name of the last page: empty


def test_a_walk_costs_pages_and_straddling_directories_not_directories() -> None:
    async def main() -> None:
        driver = PagedNames(TREE, page=5)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}
        await walk(ns, "", seen)
        directories = {"/".join(name.split("/")[:depth]) for name in TREE
                       for depth in range(name.count("/") + 1)}
        assert set(seen) == directories
        for path, names in seen.items():
            assert names == truth(TREE, path), path
        flat = [r for r in driver.requests if r.startswith("flat")]
        level = [r for r in driver.requests if r.startswith("level")]
        assert len(flat) == -(-len(TREE) // 5)  # every page once
        assert len(level) < len(flat) * 3  # the straddlers, not the 48 directories
        assert len(directories) == 48
        requests = len(driver.requests)
        await walk(ns, "", {})
        assert len(driver.requests) == requests  # all fresh: no request

    trio.run(main)


def test_an_expired_directory_refreshes_its_whole_page_once() -> None:
    async def main() -> None:
        driver = PagedNames(TREE, page=100)  # one page: the scan is the whole tree
        ns = Namespace(Config(dir_timeout=0.2), driver)  # type: ignore[arg-type]
        await walk(ns, "", {})
        assert driver.requests == ["flat  None"]
        await trio.sleep(0.25)
        seen: dict[str, set[str]] = {}
        await walk(ns, "", seen)
        assert driver.requests == ["flat  None", "subtree "]  # 48 directories, one request
        assert seen[""] == truth(TREE, "")

    trio.run(main)


def test_a_slow_walk_refreshes_the_subtree_it_is_in_and_a_fast_one_the_page() -> None:
    async def main() -> None:
        names = [f"r{r:02}/{kind}/{i}/link" for r in range(40)
                 for kind in ("_layers", "_manifests") for i in range(3)]
        driver = PagedNames(names, page=1000)
        ns = Namespace(Config(dir_timeout=0.2), driver)  # type: ignore[arg-type]
        await ns.listing(ns.node_for("", True))
        await trio.sleep(0.25)  # a walk that took a whole dir_timeout to get to r02
        await ns.listing(ns.node_for("r02/_layers/1", True))
        assert driver.requests[-1] == "subtree r02/"  # what it will read next, not all
        assert ns.lists.get("r02/_manifests/0") is not None and ns.lists.get("r03") is None
        await ns.listing(ns.node_for("r10/_layers", True))  # 48 blobs on, at once: fast
        assert driver.requests[-1] == "flat  None"  # the page again
        await trio.sleep(0.25)
        await ns.listing(ns.node_for("r00/_layers", True))  # started again (a catalog does)
        assert driver.requests[-1] == "flat  None"  # as fast as it last went: the page

    trio.run(main)


def test_a_slow_walk_through_small_directories_refreshes_pages_not_each_directory() -> None:
    """Directories of one link file each, walked slower than dir_timeout allows for the
    page (a registry's _layers, a garbage-collect reading every link): once listings
    expire, each directory's own subtree is a single blob. Listing each by itself cost a
    request per directory (77 requests here before the fix, 18 after, in a walk of about
    19 dir_timeouts); the page again costs one per dir_timeout or so."""
    async def main() -> None:
        count, dir_timeout = 400, 0.05
        names = [f"w/d{i:04}/link" for i in range(count)]
        driver = PagedNames(names, page=1000)
        ns = Namespace(Config(dir_timeout=dir_timeout), driver)  # type: ignore[arg-type]
        started = trio.current_time()
        seen: dict[str, set[str]] = {}
        for path in ("", "w"):  # as a walk comes to them
            seen[path] = set(await ns.listing(ns.node_for(path, True)))
        for i in range(count):
            path = f"w/d{i:04}"
            seen[path] = set(await ns.listing(ns.node_for(path, True)))
            await trio.sleep(0.0015)  # the walk reads the link before going on
        windows = (trio.current_time() - started) / dir_timeout
        assert seen["w"] == {f"d{i:04}" for i in range(count)}
        assert all(seen[f"w/d{i:04}"] == {"link"} for i in range(count))
        assert windows > 4  # the listings expired several times during the walk
        assert len(driver.requests) <= 2 + 2 * windows, driver.requests

    trio.run(main)


class SlowPages(PagedNames):
    """Flat pages that take `per_blob` seconds a blob they hold to come (Azurite with many
    blobs: 5,000 in about a second)."""

    def __init__(self, names: list[str], page: int, per_blob: float) -> None:
        super().__init__(names, page)
        self.per_blob = per_blob

    async def list_page(self, prefix: str, marker: str | None, size: int = 5000,
                        same_as: bytes = b"") -> ListPage:
        under = [name for name in self.names if name.startswith(prefix)]
        start = bisect.bisect_right(under, marker) if marker else 0
        await trio.sleep(len(under[start:start + min(size, self.page)]) * self.per_blob)
        return await super().list_page(prefix, marker, size, same_as)


def test_flat_pages_shrink_to_what_azure_lists_within_a_share_of_dir_timeout() -> None:
    """A page of 5,000 that takes longer than dir_timeout is stale when it comes: the walk
    waited for it and may keep none of it (listings live dir_timeout from the request). The
    scan measures how fast full pages come and asks for as many as come within a quarter of
    dir_timeout (here 0.2 s at 10,000 blobs a second: 500), and the walk still sees all."""
    async def main() -> None:
        count = 6000
        names = [f"r/d{i:04}/f" for i in range(count)]
        driver = SlowPages(names, page=5000, per_blob=0.0001)  # 5,000: 0.5 s
        ns = Namespace(Config(dir_timeout=0.2), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}
        await walk(ns, "", seen)
        assert seen["r"] == {f"d{i:04}" for i in range(count)}
        assert all(seen[f"r/d{i:04}"] == {"f"} for i in range(count))
        assert driver.sizes[0] == 5000  # nothing measured yet: a whole page
        assert driver.sizes[1:] and all(size == MIN_PAGE for size in driver.sizes[1:]), \
            driver.sizes
        # Each 500-blob page (0.05 s) serves the walk for the rest of dir_timeout.
        assert len(driver.requests) <= 2 * (1 + count // MIN_PAGE), driver.requests

    trio.run(main)


def test_a_page_asked_for_again_with_the_same_answer_is_not_parsed_again() -> None:
    """A walk slower than dir_timeout asks for its page again and again (a continuation
    cannot start where the walk is). When Azure's answer is the one the page had and this
    mount changed nothing, the listings it made are kept anew, not rebuilt; a change by
    another host (a new answer) or by this mount (a listing patched since) is parsed."""
    async def main() -> None:
        names = [f"w/d{i:03}/f" for i in range(40)] + [f"x/d{i:03}/f" for i in range(40)]
        driver = PagedNames(names, page=1000)  # one page holds it all
        ns = Namespace(Config(dir_timeout=0.05), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}
        for top in ("", "w", "x"):
            seen[top] = set(await ns.listing(ns.node_for(top, True)))
        assert driver.requests == ["flat  None"]
        for i in range(40):
            await trio.sleep(0.01)  # expires about every five directories
            path = f"w/d{i:03}"
            seen[path] = set(await ns.listing(ns.node_for(path, True)))
        refetched = sum(request == "flat  None" for request in driver.requests)
        assert refetched >= 4 and driver.unchanged == refetched - 1, driver.requests
        assert all(seen[f"w/d{i:03}"] == {"f"} for i in range(40))
        # Another host adds a file: a new answer, parsed.
        driver.names = sorted(driver.names + ["x/d005/g"])
        await trio.sleep(0.06)
        unchanged = driver.unchanged
        assert set(await ns.listing(ns.node_for("x/d005", True))) == {"f", "g"}
        assert driver.unchanged == unchanged
        # This mount removes a file: its own change, never undone by a page made earlier.
        await trio.sleep(0.06)
        listing = await ns.listing(ns.node_for("x/d006", True))
        assert set(listing) == {"f"}
        ns.lists.note("x/d006/f", None)
        driver.names.remove("x/d006/f")
        assert set(await ns.listing(ns.node_for("x/d006", True))) == set()
        await trio.sleep(0.06)
        assert set(await ns.listing(ns.node_for("x/d006", True))) == set()
        assert set(await ns.listing(ns.node_for("x/d007", True))) == {"f"}

    trio.run(main)


def test_pages_two_walks_alternate_between_are_not_parsed_again() -> None:
    """A garbage-collect alternates between pages of repositories/ and of blobs/sha256/
    (its mark phase reads manifests between a repository's readdirs): the pages it
    refreshes in turn are all reused while their answers stay the same."""
    async def main() -> None:
        names = [f"{top}/d{i:03}/f" for top in ("blobs", "repos") for i in range(60)]
        driver = PagedNames(names, page=20)  # three pages each
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        both = [ns.scans._start("blobs"), ns.scans._start("repos")]
        for scan in both:
            for index in range(3):
                await ns.scans._fetch(scan, index)
        for _ in range(2):
            for index in range(3):
                for scan in both:
                    await ns.scans._fetch(scan, index)
        assert driver.unchanged == 12, driver.unchanged

    trio.run(main)


def test_a_walks_ancestors_are_still_directories_while_its_page_is_fresh() -> None:
    """A registry's catalog walks docker/registry/v2/repositories again and again, its own
    scan; the kernel asks about each ancestor every dir_entry_timeout, when their listings
    have long expired. A fresh page with blobs below them answers, with no LIST; once it is
    stale, Azure is asked again, in one request. A directory with a marker blob is always
    asked about."""
    async def main() -> None:
        names = [f"top/mid/repos/r{i}/link" for i in range(10)]
        driver = PagedNames(names, page=1000, markers=("marked/",))
        driver.names.insert(0, "marked/")
        ns = Namespace(Config(dir_timeout=0.3), driver)  # type: ignore[arg-type]
        for path in ("top", "top/mid"):  # known as implicit directories (looked up once)
            ns.node_for(path, True)
        ns.node_for("marked", True).marker = True
        await ns.listing(ns.node_for("top/mid/repos", True))  # the walk's own scan
        await trio.sleep(0.35)
        # The walk, deep in its page, has it fetched again (a catalog's walks do).
        await ns.listing(ns.node_for("top/mid/repos/r9", True))
        assert driver.requests[-1] == "flat top/mid/repos/ None"
        asked = len(driver.requests)
        assert await ns.resolve("top") == Entry(True, None)
        assert await ns.resolve("top/mid") == Entry(True, None)
        assert len(driver.requests) == asked, driver.requests[asked:]
        await ns.resolve("marked")
        assert len(driver.requests) > asked  # its marker's mode and times: asked of Azure
        await trio.sleep(0.35)  # the page is stale too
        asked = len(driver.requests)
        assert (await ns.resolve("top/mid")).is_dir
        assert len(driver.requests) == asked + 1, driver.requests[asked:]

    trio.run(main)


def test_a_walk_that_jumps_far_ahead_starts_a_scan_there() -> None:
    async def main() -> None:
        driver = PagedNames(TREE, page=2)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        await ns.listing(ns.node_for("", True))
        listing = await ns.listing(ns.node_for("r3/_manifests", True))
        assert set(listing) == {"0", "1", "2"}
        assert "flat r3/_manifests/ None" in driver.requests
        # The root's first page, the next one (the root goes on past it: listed by level
        # then), and two more to reach r3 before a scan of its own starts there.
        assert len([r for r in driver.requests if r.startswith("flat  ")]) == 4

    trio.run(main)


def test_a_directory_we_change_while_its_page_is_fetched_is_not_cached_from_it() -> None:
    async def main() -> None:
        driver = PagedNames(TREE, page=100)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]

        async def commit_meanwhile() -> None:
            driver.before_answer.clear()
            ns.note("r1/_layers/new", Entry(True, None))

        driver.before_answer.append(commit_meanwhile)
        await ns.listing(ns.node_for("", True))
        assert ns.lists.get("r1/_layers") is None  # the page may predate our change
        assert ns.lists.get("r1/_manifests") is not None
        listing = await ns.listing(ns.node_for("r1/_layers", True))
        assert set(listing) == {"0", "1", "2"} and driver.requests[-1] == "level r1/_layers/"

    trio.run(main)


def test_an_empty_directory_at_a_page_end_is_not_taken_for_empty_too_soon() -> None:
    async def main() -> None:
        names = ["a/1", "a/2", "b", "b/x/1", "c/1"]  # "b" is a marker with a child after it
        driver = PagedNames(names, page=3, markers=("b",))
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}
        await walk(ns, "", seen)
        assert seen["b"] == {"x"} and seen["b/x"] == {"1"}

    trio.run(main)


def test_a_directory_a_page_ends_in_is_completed_by_the_next_page() -> None:
    async def main() -> None:
        driver = PagedNames(["a/1", "a/2", "a/3", "b/1", "b/2"], page=2)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}
        await walk(ns, "", seen)
        assert seen == {"": {"a", "b"}, "a": {"1", "2", "3"}, "b": {"1", "2"}}
        # Only the scan's root, which every page boundary falls in, is listed by level.
        assert driver.requests == ["flat  None", "flat  a/2", "level ", "flat  b/1"]

    trio.run(main)


def test_what_a_page_carried_is_dropped_when_this_mount_changes_anything_meanwhile() -> None:
    async def main() -> None:
        driver = PagedNames(["a/1", "a/2", "a/3", "a/4", "b/1"], page=2)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        await ns.listing(ns.node_for("", True))
        assert "a" in ns.scans.covering("a").carry  # a/1 to a/4 so far, more may follow
        driver.names.remove("a/1")
        ns.note("a/1", None)  # deleted here after its page was listed
        listing = await ns.listing(ns.node_for("a", True))
        assert set(listing) == {"2", "3", "4"}
        assert driver.requests == ["flat  None", "flat  a/2", "level ", "flat  a/4",
                                   "level a/"]  # not the stale carry

    trio.run(main)


def test_lookups_missing_in_many_children_of_one_directory_scan_it() -> None:
    async def main() -> None:
        names = [f"blobs/{d:02x}/{h}{d:02x}/data" for d in range(40) for h in "abc"]
        driver = PagedNames(names, page=1000)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        for d in range(2):  # two children of blobs/: each asked by itself
            assert await ns.scans.for_lookup(f"blobs/{d:02x}") is None
        listing = await ns.scans.for_lookup("blobs/02")  # the third: blobs/ is scanned
        assert set(listing) == {"a02", "b02", "c02"}
        assert driver.requests == ["flat blobs/ None"]
        assert ns.lists.get("blobs/27") is not None  # the page's: a lookup's yes there
        # A cached listing never says no to a lookup: that is Azure's to say.
        assert await ns.scans.for_lookup("blobs/27") is None
        assert driver.requests == ["flat blobs/ None"]

    trio.run(main)


def test_small_scans_adopted_by_lookups_do_not_hide_their_hot_parent() -> None:
    """A garbage-collect reads blobs/sha256/<2 hex>/<digest>/data in no order a walk
    follows: each first lookup lists its <2 hex> flat, adopted as a scan of its own. Once
    those expire, lookups in many of them scan the parent (a page for all), not each again."""
    async def main() -> None:
        names = [f"blobs/{d:02x}/{h}{d:02x}/data" for d in range(40) for h in "abc"]
        driver = PagedNames(names, page=1000)
        ns = Namespace(Config(dir_timeout=0.05), driver)  # type: ignore[arg-type]
        for d in range(40):  # one at a time, slower than dir_timeout: each by itself
            assert (await ns.resolve(f"blobs/{d:02x}/a{d:02x}")).is_dir
            await trio.sleep(0.06)
        assert ns.scans.covering("blobs/05").root == "blobs/05"  # adopted
        driver.requests.clear()
        for d in range(40):  # now quickly, each small scan expired
            assert (await ns.resolve(f"blobs/{d:02x}/b{d:02x}")).is_dir
        assert "flat blobs/ None" in driver.requests
        assert len(driver.requests) <= 6, driver.requests  # was 40: one per <2 hex>

    trio.run(main)


def test_lookups_in_a_hot_scan_fetch_the_pages_ahead_they_need() -> None:
    """A hot directory's scan (lookups missed in many of its children) answers lookups past
    its first page too: a page for many children, not a flat listing of each."""
    async def main() -> None:
        names = [f"blobs/{d:02x}/{h}{d:02x}/data" for d in range(40) for h in "abc"]
        driver = PagedNames(names, page=40)  # 3 pages of 40 names
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        for d in (0, 1):
            assert await ns.scans.for_lookup(f"blobs/{d:02x}") is None
        assert set(await ns.scans.for_lookup("blobs/02")) == {"a02", "b02", "c02"}
        driver.requests.clear()
        for d in range(3, 40):
            entry = await ns.resolve(f"blobs/{d:02x}/a{d:02x}")
            assert entry is not None and entry.is_dir
        assert [r for r in driver.requests if r.startswith("flat")] == [
            "flat blobs/ blobs/0d/a0d/data", "flat blobs/ blobs/1a/b1a/data"]
        assert len(driver.requests) <= 4, driver.requests  # was 2 a child: 74

    trio.run(main)


def test_a_page_refetched_with_the_continuation_it_had_keeps_the_pages_after_it() -> None:
    async def main() -> None:
        names = [f"d{d}/f{f}" for d in range(6) for f in range(4)]
        driver = PagedNames(names, page=8)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        await walk(ns, "", {})
        scan = ns.scans.covering("d5")
        assert len(scan.pages) == 3
        await ns.scans._fetch(scan, 0)  # the same answer: pages 1 and 2 still follow it
        assert [page.marker for page in scan.pages] == [None, "d1/f3", "d3/f3"]
        driver.names = sorted(driver.names + ["d0/f00"])  # page 0 now ends a name earlier
        await ns.scans._fetch(scan, 0)
        assert [page.marker for page in scan.pages] == [None]  # they may not follow it
        assert scan.pages[0].next_marker == "d1/f2"

    trio.run(main)


class WithHeads(PagedNames):
    """PagedNames with the requests a lookup miss may add: HEAD and a small level page."""

    async def head(self, name: str) -> BlobInfo | None:
        self.requests.append(f"head {name}")
        return self.info(name) if name in self.names else None

    async def list_level_small(self, prefix: str, limit: int):
        async for blobs, prefixes in self.list_level(prefix):
            return (blobs, prefixes) if len(blobs) + len(prefixes) <= limit else None
        return None


def test_the_first_page_of_a_subtree_too_big_to_list_flat_answers_lookups_below() -> None:
    """The first lookups into a big registry (docker, registry, v2, blobs, ...) each cost a
    flat LIST too big to keep, a HEAD and a level LIST. The flat LIST's first page shows
    the way down: one request for the whole descent, while it is fresh."""
    async def main() -> None:
        names = [f"docker/registry/v2/blobs/sha256/{d:02x}/{h}{d:02x}/data"
                 for d in range(256) for h in "abcde"]
        names += [f"docker/registry/v2/repositories/r{r}/_layers/link" for r in range(3)]
        driver = WithHeads(names, page=5000)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        blob = "docker/registry/v2/blobs/sha256/00/a00/data"
        for path in ("docker", "docker/registry", "docker/registry/v2",
                     "docker/registry/v2/blobs", blob):
            entry = await ns.resolve(path)
            assert entry is not None and entry.is_dir == (path != blob), path
        assert driver.requests == ["subtree "]
        # Past the page: asked of Azure (the page held blobs/ only, and more than 1,000:
        # no flat LIST of v2, which holds them all).
        assert (await ns.resolve("docker/registry/v2/repositories")).is_dir
        assert driver.requests[1:] == ["head docker/registry/v2/repositories",
                                       "level docker/registry/v2/"]
        # A name the page showed and this mount removed is no longer seen there.
        ns.note(blob, None)
        assert ns.lists.seen(blob) is None
        assert ns.lists.seen("docker/registry/v2/blobs/sha256/00/b00/data") is not None

    trio.run(main)


def test_a_known_directory_in_a_big_parent_is_asked_about_in_one_request() -> None:
    """The kernel revalidates a directory it knows every dir_entry_timeout. In a parent too
    big to list, that cost a HEAD (no blob of that name), a level LIST too big to keep, then
    a LIST of one name below it. Known to be a directory without a marker: the last alone."""
    async def main() -> None:
        names = [f"big/d{n:04}/f" for n in range(1200)]
        driver = WithHeads(names, page=5000)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        ns.node_for("big/d1100", True)  # looked up before: an implicit directory
        assert await ns.resolve("big/d1100") == Entry(True, None)
        # The flat LIST's first page (d0000 to d0999) does not hold it.
        assert driver.requests == ["subtree big/", "children big/d1100/"]
        driver.requests.clear()
        ns.node_for("big/d1101", True)
        assert await ns.resolve("big/d1101") == Entry(True, None)
        assert driver.requests == ["children big/d1101/"]

    trio.run(main)


def test_a_name_that_lands_makes_its_directories_exist_in_cached_listings() -> None:
    async def main() -> None:
        driver = PagedNames(["a/old"], page=100)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        await walk(ns, "", {})
        assert set(ns.lists.get("a")) == {"old"}
        # A file committed in directories made here (no blob of theirs in Azure).
        ns.note("a/new/deeper/f", Entry(False, BlobInfo("a/new/deeper/f", 1, "e", 0.0)))
        assert ns.lists.get("a")["new"].is_dir

    trio.run(main)


@pytest.mark.parametrize("made_kept", [scans.MADE_KEPT, 1])
def test_a_walk_bigger_than_the_listing_cache_lists_no_directory_again(
        made_kept: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listings of a fresh page pushed out of the listing cache by the walk's next pages (a
    registry bigger than listing_cache_size, with a long dir_timeout) are kept again from
    what the page made; past MADE_KEPT pages, the page is asked for again. Never a level
    listing of each directory: 946 LISTs for a catalog of 1,000 repositories once
    (bench/gc.py -o dir_timeout=10)."""
    monkeypatch.setattr(scans, "MADE_KEPT", made_kept)

    async def main() -> None:
        names = [f"repositories/p{p}/a{a}/{kind}/{i}/link" for p in range(6) for a in range(10)
                 for kind in ("_layers", "_manifests") for i in range(6)]
        driver = PagedNames(names, page=300)
        # Room for about two pages of listings: each page pushes out an earlier one.
        ns = Namespace(Config(dir_timeout=60, listing_cache_size=600 * 1000),  # type: ignore[arg-type]
                       driver)
        for _ in range(2):  # a catalog walks from the first repository again on every page
            seen: dict[str, set[str]] = {}
            await walk(ns, "", seen)
            assert all(seen[path] == truth(names, path) for path in seen)
        levels = [request for request in driver.requests if request.startswith("level")]
        assert len(levels) <= 4, levels  # the directories pages straddle, not each one
        if made_kept >= 3:  # the walk's 3 pages: the second walk asks for nothing
            assert len(driver.requests) == 4, driver.requests
        else:  # each page again, a few times
            assert len(driver.requests) <= 20, driver.requests

    trio.run(main)


class LatentPages(PagedNames):
    """Flat pages that take `latency` seconds to come; each request noted as the walk's own
    (made while it waited in a listing) or made ahead of it."""

    def __init__(self, names: list[str], page: int, latency: float) -> None:
        super().__init__(names, page)
        self.latency = latency
        self.walk_waiting = False
        self.waited: list[str] = []  # flat requests the walk waited for

    async def list_page(self, prefix: str, marker: str | None, size: int = 5000,
                        same_as: bytes = b"") -> ListPage:
        if self.walk_waiting:
            self.waited.append(f"flat {prefix} {marker}")
        await trio.sleep(self.latency)
        return await super().list_page(prefix, marker, size, same_as)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_walk_does_not_wait_for_the_pages_it_will_need(
        ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk slower than dir_timeout a page waits for every page it comes to and for every
    refresh of the page it is in (a find: 25 requests, each waited for, in 11 s over 13,357
    objects). With a nursery to fetch in, the page it will need is fetched while it reads
    the listings it has: it waits only for the first. The directories that span pages
    (here the root and w/, as a registry's top directories) are listed by level, without
    fetching the pages they go on into."""
    monkeypatch.setattr(scans, "MIN_PAGE", 50)  # pages of 50 count as full ones

    async def main() -> None:
        count, dir_timeout = 400, 0.2
        names = [f"w/d{i:04}/f" for i in range(count)]
        driver = LatentPages(names, page=50, latency=0.02)
        ns = Namespace(Config(dir_timeout=dir_timeout), driver)  # type: ignore[arg-type]
        seen: dict[str, set[str]] = {}

        async def listing(path: str) -> None:
            driver.walk_waiting = True
            try:
                seen[path] = set(await ns.listing(ns.node_for(path, True)))
            finally:
                driver.walk_waiting = False

        async with trio.open_nursery() as nursery:
            if ahead:
                ns.scans.start(nursery)
            started = trio.current_time()
            await listing("")
            await listing("w")
            for i in range(count):
                await listing(f"w/d{i:04}")
                if i % 5 == 4:
                    await trio.sleep(0.025)  # 0.25 s a page of 50: longer than dir_timeout
            windows = (trio.current_time() - started) / dir_timeout
            nursery.cancel_scope.cancel()
        assert seen["w"] == {f"d{i:04}" for i in range(count)}
        assert all(seen[f"w/d{i:04}"] == {"f"} for i in range(count))
        assert windows > 6  # the walk outlived its pages' listings several times
        flat = [request for request in driver.requests if request.startswith("flat")]
        if ahead:
            assert len(driver.waited) <= 2, driver.waited  # the first page (and the root's)
            assert len(flat) <= 2 * (count // 50 + windows), driver.requests
        else:
            assert len(driver.waited) >= count // 50, driver.waited

    trio.run(main)


class Unreachable(PagedNames):
    """Flat pages that fail after `seconds` (every retry of a request timed out)."""

    def __init__(self, names: list[str], seconds: float) -> None:
        super().__init__(names, page=1000)
        self.seconds = seconds

    async def list_page(self, prefix: str, marker: str | None, size: int = 5000,
                        same_as: bytes = b"") -> ListPage:
        self.requests.append(f"flat {prefix} {marker}")
        await trio.sleep(self.seconds)
        raise StorageError(errno.EIO, "cannot reach the storage service")


def test_callers_waiting_for_a_page_that_fails_get_its_failure_not_a_request_each() -> None:
    """Lookups and walks under one scan fetch its pages one at a time. While Azure is
    unreachable each request fails only after its retries; a caller queued behind it that
    then asked on its own waited for two (a stat of 39 s in test_faults' outage, against
    a bound of one request), and the last of n callers for n."""
    async def main() -> None:
        driver = Unreachable(TREE, seconds=0.2)
        ns = Namespace(Config(dir_timeout=60), driver)  # type: ignore[arg-type]
        ns.scans._start("")
        failures: list[tuple[int, float]] = []

        async def walk_to(path: str) -> None:
            started = trio.current_time()
            with pytest.raises(FSError) as raised:
                await ns.scans.listing(path)
            failures.append((raised.value.errno, trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for path in ("r0", "r1", "r2", "blobs"):
                nursery.start_soon(walk_to, path)
        assert driver.requests == ["flat  None"]  # one request, whose failure all got
        assert [code for code, _ in failures] == [errno.EIO] * 4
        assert max(seconds for _, seconds in failures) < 0.35  # one request's time, not 4
        # A caller that comes after the failure asks again (Azure may be back).
        with pytest.raises(FSError):
            await ns.scans.listing("r3")
        assert len(driver.requests) == 2

    trio.run(main)
