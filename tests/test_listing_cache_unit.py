"""The listing cache (azregfs/fs/listings.py, ListingCache) on a clock of its own: each
listing lives dir_timeout from when its request was sent (or from when it was kept, when
not told), the least recently used goes first past the byte budget, and a replaced
listing's old deadline never takes the new one."""

from __future__ import annotations

from azregfs.fs.listings import ListingCache, _listing_bytes
from azregfs.fs.nodes import Entry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def listing(*names: str) -> dict[str, Entry]:
    return {name: Entry(False, None) for name in names}


def test_a_listing_is_answered_for_ttl_from_when_it_was_kept() -> None:
    clock = Clock()
    cache = ListingCache(maxsize=1 << 20, ttl=1.0, timer=clock)
    cache["d"] = listing("a")
    clock.now += 0.99
    assert cache.get("d") == listing("a")  # a get does not make it live longer
    clock.now += 0.01
    assert cache.get("d") is None and "d" not in cache
    assert cache.currsize == 0 and len(cache) == 0


def test_a_listing_lives_ttl_from_when_its_request_was_sent_not_from_its_reply() -> None:
    clock = Clock()
    cache = ListingCache(maxsize=1 << 20, ttl=1.0, timer=clock)
    asked_at = clock.now
    clock.now += 0.7  # a slow LIST
    cache.put("d", listing("a"), asked_at)
    clock.now += 0.29
    assert cache.get("d") == listing("a")
    clock.now += 0.01  # 1 s after the request was sent, 0.3 s after the reply
    assert cache.get("d") is None


def test_a_reply_older_than_ttl_is_not_kept_and_replaces_nothing() -> None:
    clock = Clock()
    cache = ListingCache(maxsize=1 << 20, ttl=1.0, timer=clock)
    slow_asked_at = clock.now
    clock.now += 0.5
    cache.put("d", listing("fresh"), clock.now)  # asked later, answered first
    clock.now += 0.6
    cache.put("d", listing("stale"), slow_asked_at)  # 1.1 s old on arrival
    assert cache.get("d") == listing("fresh")
    cache.put("e", listing("stale"), slow_asked_at)
    assert cache.get("e") is None and len(cache) == 1


def test_a_listing_kept_out_of_deadline_order_still_expires_on_time() -> None:
    clock = Clock()
    cache = ListingCache(maxsize=1 << 20, ttl=1.0, timer=clock)
    early = clock.now
    clock.now += 0.5
    cache.put("late", listing("a"))  # deadline early + 1.5
    cache.put("early", listing("b"), early)  # deadline early + 1.0, queued behind
    clock.now = early + 1.0
    cache.put("other", listing("c"))
    assert cache.get("early") is None and cache.get("late") == listing("a")
    assert cache.currsize == _listing_bytes(listing("a")) + _listing_bytes(listing("c"))


def test_a_replaced_listing_lives_from_its_own_keeping_not_the_old_ones() -> None:
    clock = Clock()
    cache = ListingCache(maxsize=1 << 20, ttl=1.0, timer=clock)
    cache["d"] = listing("a")
    clock.now += 0.6
    cache["d"] = listing("a", "b")
    clock.now += 0.6  # past the first deadline, within the second
    cache["other"] = listing("x")  # expiry runs as listings are kept
    assert cache.get("d") == listing("a", "b")
    assert cache.currsize == _listing_bytes(listing("a", "b")) + _listing_bytes(listing("x"))
    clock.now += 0.5
    assert cache.get("d") is None


def test_past_the_byte_budget_the_least_recently_used_goes_first() -> None:
    clock = Clock()
    one = _listing_bytes(listing("a"))
    cache = ListingCache(maxsize=3 * one, ttl=10.0, timer=clock)
    for path in ("p", "q", "r"):
        cache[path] = listing("a")
    assert cache.get("p") is not None  # p is now more recent than q
    cache["s"] = listing("a")
    assert [path for path in "pqrs" if cache.get(path) is not None] == ["p", "r", "s"]
    assert cache.currsize == 3 * one


def test_a_listing_bigger_than_the_cache_is_not_kept_and_drops_nothing_else() -> None:
    cache = ListingCache(maxsize=_listing_bytes(listing("a", "b")), ttl=10.0, timer=Clock())
    cache["small"] = listing("a")
    cache["huge"] = listing(*(f"n{i}" for i in range(100)))
    assert cache.get("huge") is None and cache.get("small") == listing("a")


def test_pop_forgets_a_listing_and_its_bytes() -> None:
    cache = ListingCache(maxsize=1 << 20, ttl=10.0, timer=Clock())
    cache["d"] = listing("a")
    assert cache.pop("d") == listing("a")
    assert cache.pop("d") is None
    assert cache.currsize == 0


def test_the_deadline_queue_stays_in_proportion_to_the_listings() -> None:
    cache = ListingCache(maxsize=1 << 30, ttl=10.0, timer=Clock())
    for round_ in range(1000):
        cache["d"] = listing(str(round_))  # replaced again and again
    assert len(cache) == 1 and len(cache._deadlines) <= 2 * len(cache) + 65
    assert cache.get("d") == listing("999")


class Listing(dict):
    """A listing that can be watched with a weak reference (a plain dict cannot)."""


def test_a_listing_dropped_for_room_is_freed_at_once_not_held_until_its_deadline() -> None:
    import gc
    import weakref

    one = _listing_bytes(listing("a"))
    cache = ListingCache(maxsize=one, ttl=60.0, timer=Clock())
    first = Listing(listing("a"))
    watch = weakref.ref(first)
    cache["first"] = first
    del first
    cache["second"] = listing("b")  # no room for both: the first goes
    gc.collect()
    assert watch() is None and cache.get("first") is None


def test_a_pages_listings_kept_at_once_live_as_if_kept_one_by_one() -> None:
    """put_many (a walk's page keeping thousands of listings again and again): the same
    deadlines, sizes and least-recently-used order as put; sizes counted once."""
    clock = Clock()
    one = listing("a")
    size = _listing_bytes(one)
    cache = ListingCache(maxsize=3 * size + 1, ttl=1.0, timer=clock)
    cache.put("old", listing("z"))
    asked_at = clock.now
    clock.now += 0.5
    sizes: dict[str, int] = {}
    cache.put_many({"d1": one, "d2": listing("b"), "d3": listing("c")}, asked_at, sizes)
    assert "old" not in cache  # the least recently used went first past the budget
    assert cache.currsize == 3 * size and sizes == {"d1": size, "d2": size, "d3": size}
    sizes["d1"] = size + 1  # memoized: not counted again
    cache.put_many({"d1": one}, clock.now, sizes)
    assert cache.currsize == 3 * size + 1
    assert cache.get("d2") is not None
    clock.now = asked_at + 1.0  # d2 and d3: ttl from their request
    assert cache.get("d2") is None and cache.get("d3") is None
    assert cache.get("d1") is one  # kept again later: its later deadline
    cache.put_many({"late": one}, clock.now - 1.0, {})  # as old as ttl on arrival
    assert "late" not in cache
