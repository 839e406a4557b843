"""Pure logic, no Azure and no kernel: how a commit plans its blocks (holes cost no memory,
one zero block is reused), the size limits (EFBIG before anything changes), holes written as
zeros, a listing fetched while this mount changed its directory, and whole versions pinned
in the block cache for readers.
"""

from __future__ import annotations

import errno
import random
import tracemalloc

import pytest
import trio

from azregfs.config import Config
from azregfs.fs.namespace import Namespace
from azregfs.fs.nodes import Entry, FSError, Node
from azregfs.read.blockcache import BlockCache
from azregfs.storage.blobs import ListPage
from azregfs.storage.driver import BlobInfo, StorageError
from azregfs.write.segments import (
    MAX_BLOCKS,
    ZERO_BLOCK,
    Kind,
    Segment,
    SegmentMap,
    TooManyBlocks,
    plan_blocks,
)
from azregfs.write.writebuffer import MAX_APPEND_SIZE, WriteBuffer

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 8 * MiB


def dirty(start: int, length: int) -> Segment:
    return Segment(start, length, Kind.DIRTY, data=bytearray(b"d" * length))


def covered(plan: list, runs: list, segments: list[Segment], block: int) -> list[tuple[int, int]]:
    """The byte ranges the plan's blocks stand for, in order (checks each run's pieces)."""
    committed = iter(s for s in segments if s.kind in (Kind.COMMITTED, Kind.STAGED))
    ranges, position = [], 0
    for item in plan:
        if item == ZERO_BLOCK:
            length = block
        elif isinstance(item, str):
            seg = next(committed)
            assert seg.block_id == item and seg.start == position
            length = seg.length
        else:
            run = runs[item]
            assert run[0].start == position
            for before, after in zip(run, run[1:], strict=False):
                assert before.end == after.start
            length = sum(piece.length for piece in run)
            assert 0 < length <= block
        ranges.append((position, length))
        position += length
    assert position == (segments[-1].end if segments else 0)
    return ranges


# -- the block plan ------------------------------------------------------------------------


def test_a_two_gib_hole_is_one_zero_block_referenced_255_times():
    segments = [Segment(0, 2 * GiB - 1, Kind.ZERO), dirty(2 * GiB - 1, 1)]
    plan, runs = plan_blocks(segments, BLOCK)
    assert len(plan) == 256 and plan.count(ZERO_BLOCK) == 255
    assert len(runs) == 1 and [p.kind for p in runs[0]] == [Kind.ZERO, Kind.DIRTY]
    covered(plan, runs, segments, BLOCK)


def test_small_pieces_are_packed_into_full_blocks():
    segments = [dirty(0, 100), Segment(100, 3 * BLOCK, Kind.ZERO), dirty(3 * BLOCK + 100, 1),
                Segment(3 * BLOCK + 101, 10, Kind.COMMITTED, block_id="c1"),
                dirty(3 * BLOCK + 111, 5)]
    plan, runs = plan_blocks(segments, BLOCK)
    ranges = covered(plan, runs, segments, BLOCK)
    # [dirty 100 + zeros], 2 zero blocks, [zeros 100 + dirty 1], committed, [dirty 5]
    assert plan.count(ZERO_BLOCK) == 2 and "c1" in plan
    assert [length for _, length in ranges] == [BLOCK, BLOCK, BLOCK, 101, 10, 5]


def test_random_layouts_are_covered_in_order():
    rng = random.Random(7)
    block = 64 * 1024
    for _ in range(300):
        segments, position = [], 0
        for index in range(rng.randrange(1, 12)):
            kind = rng.choice([Kind.ZERO, Kind.DIRTY, Kind.BASE, Kind.COMMITTED, Kind.STAGED])
            length = rng.choice([1, 17, block - 1, block, block + 1, 5 * block + 3])
            if kind is Kind.DIRTY:
                seg = dirty(position, length)
            else:
                seg = Segment(position, length, kind, block_id=f"id{index:06d}",
                              base_offset=position)
            segments.append(seg)
            position += length
        plan, runs = plan_blocks(segments, block)
        covered(plan, runs, segments, block)
        for run in runs:  # DIRTY pieces point into their segment's data
            for piece in run:
                if piece.kind is Kind.DIRTY:
                    assert piece.data is not None
                    assert len(piece.data) >= piece.data_offset + piece.length


def test_a_plan_past_the_block_limit_fails_at_once_without_memory():
    tracemalloc.start()
    try:
        with pytest.raises(TooManyBlocks):
            plan_blocks([Segment(0, 10**15, Kind.ZERO), dirty(10**15, 1)], BLOCK)
        plan, _ = plan_blocks([Segment(0, MAX_BLOCKS * BLOCK, Kind.ZERO)], BLOCK)
        assert len(plan) == MAX_BLOCKS
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB  # a list of 50,000 references, not pieces or bytes
    with pytest.raises(TooManyBlocks):  # many small staged blocks below the size limit
        plan_blocks([Segment(i, 1, Kind.STAGED, block_id=f"s{i:07d}")
                     for i in range(MAX_BLOCKS + 1)], BLOCK)


# -- sessions: limits and holes (no driver call happens on these paths) --------------------


def session(base: BlobInfo | None = None, block: int = BLOCK):
    buffer = WriteBuffer(None, None, block, 32 * block)  # type: ignore[arg-type]
    return buffer, buffer.open(Node(2, "f", False), "f", base)


def test_limits_give_efbig_before_anything_changes():
    async def main() -> None:
        buffer, s = session()
        await s.write(0, b"abc")
        for huge in (999_999_999_999_999, MAX_BLOCKS * BLOCK + 1):
            with pytest.raises(FSError) as caught:
                await s.truncate(huge)
            assert caught.value.errno == errno.EFBIG and "raise block_size" in caught.value.message
            with pytest.raises(FSError) as caught:
                await s.write(huge - 1, b"xy")
            assert caught.value.errno == errno.EFBIG
        assert s.size == 3 and len(s.map.segments) == 1 and buffer.budget.used == 3
        await s.truncate(MAX_BLOCKS * BLOCK)  # exactly the limit is fine
        assert s.size == MAX_BLOCKS * BLOCK and len(s.map.segments) == 2

    trio.run(main)


def test_append_blob_limit_and_foreign_larger_blobs():
    async def main() -> None:
        appended = BlobInfo("f", MAX_APPEND_SIZE - 10, "e", 0.0, {}, "AppendBlob")
        _, s = session(appended)
        await s.write(MAX_APPEND_SIZE - 10, b"0123456789")  # up to the limit: fine
        with pytest.raises(FSError) as caught:
            await s.write(MAX_APPEND_SIZE, b"x")
        assert caught.value.errno == errno.EFBIG and "append blob" in caught.value.message
        # A block blob another tool committed in larger blocks may be larger than ours.
        foreign = BlobInfo("f", MAX_BLOCKS * BLOCK + 5, "e", 0.0, {}, "BlockBlob")
        _, s = session(foreign)
        assert s.limit() == MAX_BLOCKS * BLOCK + 5
        with pytest.raises(FSError):
            await s.truncate(MAX_BLOCKS * BLOCK + 6)

    trio.run(main)


def test_zero_writes_past_a_hole_and_into_it_stay_a_hole():
    """glibc's posix_fallocate emulation: one zero byte every 4 KiB."""
    async def main() -> None:
        buffer, s = session()
        for offset in range(4095, 64 * MiB, 4096):
            await s.write(offset, b"\0")
        assert s.size == 64 * MiB and [g.kind for g in s.map.segments] == [Kind.ZERO]
        await s.truncate(128 * MiB)
        for offset in range(4095, 128 * MiB, 4096):
            await s.write(offset, b"\0")
        assert len(s.map.segments) == 1 and buffer.budget.peak == 0
        await s.write(2 * GiB - 1, b"Z")
        assert [g.kind for g in s.map.segments] == [Kind.ZERO, Kind.DIRTY]
        assert buffer.budget.used == 1

    trio.run(main)


# -- a listing fetched while this mount changed the directory ------------------------------


class SlowListing:
    """A driver whose LIST waits for the test to let it answer (with what it had)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.release = trio.Event()
        self.started = trio.Event()
        self.lists = 0

    async def list_subtree_small(self, prefix: str, limit: int):
        return [], False  # too big to list flat: the level listing below is what is tested

    async def list_page(self, prefix: str, marker: str | None, size: int = 5000,
                        same_as: bytes = b"") -> ListPage:
        # A walk's first flat page, with more to come: the directory is listed by level.
        return ListPage([BlobInfo(prefix + "zz/deep", 1, "e", 0.0)], [], "more")

    async def list_level(self, prefix: str):
        self.lists += 1
        answer = [BlobInfo(prefix + name, 1, "e", 0.0) for name in self.names]
        self.started.set()
        await self.release.wait()
        yield answer, []


def test_changes_noted_while_a_listing_is_fetched_are_applied():
    async def main() -> None:
        driver = SlowListing(["a", "gone"])
        ns = Namespace(Config(), driver)  # type: ignore[arg-type]
        directory = ns.by_path[""]
        result = {}
        async with trio.open_nursery() as nursery:
            async def fetch() -> None:
                result["listing"] = await ns.listing(directory)
            nursery.start_soon(fetch)
            await driver.started.wait()
            # Committed and deleted on this mount while the LIST was in flight.
            ns.note("new", Entry(False, BlobInfo("new", 3, "e2", 0.0)))
            ns.note("gone", None)
            driver.release.set()
        assert sorted(result["listing"]) == ["a", "new"]
        assert sorted(ns.lists.get("")) == ["a", "new"]  # and cached that way

    trio.run(main)


def test_a_directory_changed_while_listed_is_listed_again():
    async def main() -> None:
        driver = SlowListing(["a"])
        ns = Namespace(Config(), driver)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ns.listing, ns.by_path[""])
            await driver.started.wait()
            ns.changed("")  # e.g. a rename: the answer in flight cannot be patched
            driver.names = ["a", "b"]
            driver.release.set()
        assert driver.lists == 2 and sorted(ns.lists.get("")) == ["a", "b"]
        assert not ns.lists.fetching

    trio.run(main)


# -- whole versions pinned for readers -----------------------------------------------------


class Versions:
    """A driver holding one blob whose version can be replaced."""

    def __init__(self, data: bytes) -> None:
        self.data, self.etag, self.reads = data, "v1", 0

    async def read(self, name: str, offset: int, length: int, etag: str | None = None) -> bytes:
        await trio.sleep(0)
        if etag and etag != self.etag:
            raise StorageError(errno.ESTALE, "changed")
        self.reads += 1
        return self.data[offset:offset + length]

    async def read_blocks(self, name: str, offset: int, length: int, etag: str,
                          piece: int) -> list[bytearray]:
        data = await self.read(name, offset, length, etag)
        return [bytearray(data[at:at + piece]) for at in range(0, len(data), piece)]


def test_a_pinned_version_outlives_its_blob():
    async def main() -> None:
        block = 64 * 1024
        old = random.Random(1).randbytes(5 * block + 7)
        driver = Versions(old)
        cache = BlockCache(driver, block, 64 * block, 8 * block, stats_interval=0)  # type: ignore[arg-type]
        assert cache.whole_max == 8 * block and cache.pin_budget == 16 * block
        assert await cache.read("f", "v1", len(old), block, 10) == old[block:block + 10]
        reads = driver.reads
        assert await cache.pin("f", "v1", len(old))
        assert driver.reads == reads + 1  # the blocks nobody held, in one GET
        assert await cache.pin("f", "v1", len(old))  # a second holder shares it
        driver.data, driver.etag = b"new", "v2"
        cache.blocks.clear()  # even evicted from the LRU
        assert await cache.read("f", "v1", len(old), 0, len(old)) == old
        cache.unpin("f", "v1")
        assert await cache.read("f", "v1", len(old), 3 * block, 5) == old[3 * block:3 * block + 5]
        cache.unpin("f", "v1")
        assert not cache.pins and cache.pinned_bytes == 0
        with pytest.raises(StorageError):
            await cache.read("f", "v1", len(old), 0, 10)
        with pytest.raises(StorageError):
            await cache.pin("f", "v1", len(old))
        assert not await cache.pin("f", "v2", 9 * block)  # larger than whole_max: refused

    trio.run(main)


def test_a_flat_listing_fills_every_directory_below():
    ns = Namespace(Config(), SlowListing([]))  # type: ignore[arg-type]
    blobs = [BlobInfo(name, 1, "e", 0.0) for name in (
        "r/a/f1", "r/a/sub/f2", "r/b", "r/empty", "r/x", "r/x/hidden-by-dir", "r/bad//name")]
    blobs[3].metadata = {"hdi_isfolder": "true"}
    listings = ns.lists.tree("r", blobs)
    assert sorted(listings) == ["r", "r/a", "r/a/sub", "r/empty", "r/x"]
    assert {name: entry.is_dir for name, entry in listings["r"].items()} == {
        "a": True, "b": False, "empty": True, "x": True}
    assert listings["r/a"]["f1"].info is blobs[0] and listings["r/a"]["sub"].is_dir
    assert listings["r/empty"] == {} and listings["r/x"] == {"hidden-by-dir": listings["r/x"][
        "hidden-by-dir"]}


# -- the segment map: split, merge, cut, and what it accounts --------------------------------


class Recorder:
    def __init__(self) -> None:
        self.dirty = 0
        self.full: list[Segment] = []

    def map(self, block: int = 16) -> SegmentMap:
        return SegmentMap(block, self.account, self.full.append)

    def account(self, delta: int) -> None:
        self.dirty += delta


def content(segments: SegmentMap) -> bytes:
    """The file's bytes (BASE/COMMITTED/STAGED shown as 'b', 'c', 's'; holes as 0)."""
    out = bytearray()
    for seg in segments.segments:
        if seg.kind is Kind.DIRTY:
            assert seg.data is not None and len(seg.data) == seg.length
            out += seg.data
        elif seg.kind is Kind.ZERO:
            out += bytes(seg.length)
        else:
            out += seg.kind.value[0].encode() * seg.length
    return bytes(out)


def check_invariants(segments: SegmentMap, recorder: Recorder) -> None:
    position = 0
    for seg in segments.segments:
        assert seg.start == position and seg.length > 0 and seg.alive
        position = seg.end
    assert position == segments.size
    assert recorder.dirty == sum(s.length for s in segments.segments if s.kind is Kind.DIRTY)


def test_extend_fills_blocks_and_reports_each_full_one() -> None:
    recorder = Recorder()
    segments = recorder.map()
    segments.extend(b"a" * 10)
    segments.extend(b"b" * 30)
    assert [s.length for s in segments.segments] == [16, 16, 8]
    assert [s.start for s in recorder.full] == [0, 16]
    assert content(segments) == b"a" * 10 + b"b" * 30
    check_invariants(segments, recorder)


def test_overwrite_splits_base_and_merges_small_dirty_pieces() -> None:
    recorder = Recorder()
    segments = recorder.map()
    segments.segments, segments.size = [Segment(0, 40, Kind.BASE)], 40
    segments.overwrite(5, b"xy")
    segments.overwrite(6, b"yz")  # in place over "y", and a new piece merged beside it
    assert content(segments) == b"b" * 5 + b"xyz" + b"b" * 32
    assert [s.kind for s in segments.segments] == [Kind.BASE, Kind.DIRTY, Kind.BASE]
    assert segments.segments[2].base_offset == 8  # where its bytes are in the base blob
    check_invariants(segments, recorder)


def test_zeros_over_a_hole_stay_a_hole_and_cost_nothing() -> None:
    recorder = Recorder()
    segments = recorder.map()
    segments.grow_hole(1 << 40)  # a TiB of hole: one segment
    segments.overwrite(12345, bytes(100))
    segments.extend(bytes(4096))
    assert len(segments.segments) == 1 and segments.size == (1 << 40) + 4096
    assert recorder.dirty == 0


def test_cuts_staged_and_cut() -> None:
    recorder = Recorder()
    segments = recorder.map()
    segments.segments = [Segment(0, 16, Kind.STAGED, block_id="s0"),
                         Segment(16, 16, Kind.COMMITTED, block_id="c1")]
    segments.size = 32
    assert segments.cuts_staged(5) and not segments.cuts_staged(0)
    assert not segments.cuts_staged(16) and not segments.cuts_staged(20)
    assert not segments.cuts_staged(32)
    segments.cut(20)  # a committed block cut becomes a BASE range
    assert [(s.kind, s.length) for s in segments.segments] == [(Kind.STAGED, 16),
                                                              (Kind.BASE, 4)]
    segments.overwrite(0, b"q" * 16)  # a whole STAGED block replaced: no commit needed
    assert content(segments) == b"q" * 16 + b"bbbb"
    check_invariants(segments, recorder)


def test_random_changes_keep_the_map_whole_and_the_budget_exact() -> None:
    rng = random.Random(5)
    for _ in range(200):
        recorder = Recorder()
        segments = recorder.map()
        model = bytearray()
        for _ in range(30):
            action = rng.choice(["extend", "overwrite", "hole", "cut"])
            if action == "extend":
                data = bytes(rng.choice([0, 97 + rng.randrange(3)]) for _ in
                             range(rng.randrange(1, 40)))
                segments.extend(data)
                model += data
            elif action == "overwrite" and model:
                offset = rng.randrange(len(model))
                data = bytes([98]) * rng.randrange(1, len(model) - offset + 1)
                segments.overwrite(offset, data)
                model[offset:offset + len(data)] = data
            elif action == "hole":
                size = len(model) + rng.randrange(1, 50)
                segments.grow_hole(size)
                model += bytes(size - len(model))
            elif action == "cut" and model:
                size = rng.randrange(len(model))
                if size == 0:
                    segments.clear()
                else:
                    segments.cut(size)
                del model[size:]
            assert content(segments) == bytes(model)
            check_invariants(segments, recorder)
        segments.clear()
        assert recorder.dirty == 0
