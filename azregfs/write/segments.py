"""The write session's map of a file: contiguous segments over [0, size), and the block
plan a commit makes of them. Pure bookkeeping: no Azure, no locks, no awaits (the write
session in writebuffer.py owns those, and the kinds' meaning is in its notes).

Invariants:
- ``segments`` are sorted, contiguous and cover exactly [0, size).
- A DIRTY segment's bytes are counted through ``account`` (the dirty budget) from the
  moment it is made until it is retired; a retired segment is ``alive = False``, so a
  staging task that still holds it drops its result. Appends fill DIRTY segments up to
  block_size; an overwrite's piece may be longer (the commit packs pieces into blocks).
- A frozen DIRTY segment (being staged) is never changed in place: writes over it replace it.
- A STAGED segment (its bytes only in Azure's uncommitted list) is never cut here: the
  session commits first when ``cuts_staged`` says a change would.
- A hole costs no memory: a ZERO segment of any length, and zeros written over or just past
  a hole leave it a hole.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from dataclasses import dataclass

MAX_BLOCKS = 50_000  # Azure's limit on the blocks of one blob

class Kind(enum.Enum):
    COMMITTED = "committed"
    BASE = "base"
    STAGED = "staged"
    DIRTY = "dirty"
    ZERO = "zero"


@dataclass(eq=False)
class Segment:
    start: int
    length: int
    kind: Kind
    block_id: str = ""  # COMMITTED and STAGED
    base_offset: int = 0  # COMMITTED and BASE: where the bytes are in the base blob
    data: bytearray | None = None  # DIRTY
    alive: bool = True
    # DIRTY data being staged: a worker thread reads it, so it is never changed in place;
    # later writes to its range replace the segment instead.
    frozen: bool = False
    data_offset: int = 0  # a piece of a DIRTY segment (see piece): where it starts in data

    @property
    def end(self) -> int:
        return self.start + self.length


class TooManyBlocks(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size  # bytes planned when the count went past the limit


ZERO_BLOCK = -1  # in a plan: the all-zero block, staged once per commit


def plan_blocks(segments: list[Segment], block_size: int,
                max_blocks: int = MAX_BLOCKS) -> tuple[list[str | int], list[list[Segment]]]:
    """The block list of a commit: (plan, runs).

    Each plan item is a block ID to reuse (COMMITTED, STAGED), the index of a run in runs
    to stage (pieces of BASE, DIRTY and ZERO segments, packed into full blocks: a block
    may span several segments, so small pieces never multiply the block count), or
    ZERO_BLOCK for a block that is all hole. Memory is proportional to the number of blocks,
    never to a hole's length; past max_blocks it raises TooManyBlocks at once.
    """
    plan: list[str | int] = []
    runs: list[list[Segment]] = []
    current: list[Segment] = []
    current_len = 0
    position = 0

    def add(item: str | int, count: int = 1) -> None:
        if len(plan) + count > max_blocks:
            raise TooManyBlocks(position)
        plan.extend([item] * count)

    def close_run() -> None:
        nonlocal current, current_len
        if not current:
            return
        if current_len == block_size and all(p.kind is Kind.ZERO for p in current):
            add(ZERO_BLOCK)
        else:
            add(len(runs))
            runs.append(current)
        current, current_len = [], 0

    for seg in segments:
        position = seg.start
        if seg.kind in (Kind.COMMITTED, Kind.STAGED):
            close_run()
            add(seg.block_id)
            continue
        pos = seg.start
        while pos < seg.end:
            position = pos
            if seg.kind is Kind.ZERO and not current and seg.end - pos >= block_size:
                whole = (seg.end - pos) // block_size
                add(ZERO_BLOCK, whole)
                pos += whole * block_size
                continue
            take = min(seg.end - pos, block_size - current_len)
            current.append(piece(seg, pos, take))
            current_len += take
            pos += take
            if current_len == block_size:
                close_run()
    position = segments[-1].end if segments else 0
    close_run()
    return plan, runs


def piece(seg: Segment, start: int, length: int) -> Segment:
    """Bytes [start, start+length) of a BASE, DIRTY or ZERO segment, sharing its data."""
    if start == seg.start and length == seg.length:
        return seg
    offset = start - seg.start
    part = Segment(start, length, seg.kind, base_offset=seg.base_offset + offset)
    if seg.kind is Kind.DIRTY:
        # No memoryview kept: an export would forbid the bytearray to grow later.
        part.data, part.data_offset = seg.data, seg.data_offset + offset
    return part


def all_zero(data: bytes | bytearray) -> bool:
    return data.count(0) == len(data)


class SegmentMap:
    """The segments of one file. ``account(delta)`` is told of every change in the bytes
    DIRTY segments hold; ``block_full(seg)`` of each DIRTY tail that reaches block_size."""

    def __init__(self, block_size: int, account: Callable[[int], None],
                 block_full: Callable[[Segment], None]) -> None:
        self.block_size = block_size
        self.account = account
        self.block_full = block_full
        self.segments: list[Segment] = []
        self.size = 0

    def find(self, offset: int) -> int:
        """Index of the segment containing offset (offset < size)."""
        return bisect.bisect_right(self.segments, offset, key=lambda s: s.start) - 1

    def add_dirty(self, start: int, data: bytes | bytearray) -> Segment:
        seg = Segment(start, len(data), Kind.DIRTY, data=bytearray(data))
        self.account(len(data))
        return seg

    def retire(self, seg: Segment) -> None:
        if seg.alive and seg.kind is Kind.DIRTY and seg.data is not None:
            self.account(-len(seg.data))
        seg.alive = False

    def clear(self) -> None:
        self.from_base(0)

    def from_base(self, size: int) -> None:
        """Retire every segment: the file is now the first `size` bytes of the base blob."""
        for seg in self.segments:
            self.retire(seg)
        self.segments = [Segment(0, size, Kind.BASE)] if size else []
        self.size = size

    def grow_hole(self, size: int) -> None:
        """Zeros up to size: one ZERO segment, or a longer trailing one (no memory)."""
        tail = self.segments[-1] if self.segments else None
        if tail is not None and tail.kind is Kind.ZERO:
            tail.length += size - self.size
        else:
            self.segments.append(Segment(self.size, size - self.size, Kind.ZERO))
        self.size = size

    def extend(self, data: bytes) -> None:
        """Append data at the end of the file, filling the tail block first."""
        if self.segments and self.segments[-1].kind is Kind.ZERO and all_zero(data):
            self.grow_hole(self.size + len(data))  # e.g. posix_fallocate's emulation
            return
        view = memoryview(data)
        while view:
            tail = self.segments[-1] if self.segments else None
            if tail is not None and tail.kind is Kind.DIRTY and not tail.frozen \
                    and tail.length < self.block_size:
                take = view[: self.block_size - tail.length]
                tail.data += take  # type: ignore[operator]
                tail.length += len(take)
                self.account(len(take))
            else:
                take = view[: self.block_size]
                tail = self.add_dirty(self.size, take)
                self.segments.append(tail)
            self.size += len(take)
            view = view[len(take):]
            if tail.length >= self.block_size:
                self.block_full(tail)

    def cuts_staged(self, offset: int) -> bool:
        """Would a change starting or ending at offset cut a STAGED segment?"""
        if offset >= self.size:
            return False
        seg = self.segments[self.find(offset)]
        return seg.kind is Kind.STAGED and seg.start < offset

    def overwrite(self, offset: int, data: bytes) -> None:
        """Replace bytes within [0, size); no STAGED segment may be cut (cuts_staged)."""
        end = offset + len(data)
        index = self.find(offset)
        touched = []
        i = index
        while i < len(self.segments) and self.segments[i].start < end:
            touched.append(self.segments[i])
            i += 1
        if all(s.kind is Kind.ZERO for s in touched) and all_zero(data):
            return  # zeros over a hole change nothing (posix_fallocate's emulation)
        replacement: list[Segment] = []
        for seg in touched:
            lo, hi = max(seg.start, offset), min(seg.end, end)
            part = data[lo - offset:hi - offset]
            if seg.kind is Kind.DIRTY and not seg.frozen:
                seg.data[lo - seg.start:hi - seg.start] = part  # type: ignore[index]
                replacement.append(seg)
                continue
            assert seg.kind is not Kind.STAGED or (seg.start >= offset and seg.end <= end)
            self.retire(seg)
            if seg.start < lo:
                replacement.append(self.slice(seg, seg.start, lo))
            replacement.append(self.add_dirty(lo, part))
            if hi < seg.end:
                replacement.append(self.slice(seg, hi, seg.end))
        self.segments[index:index + len(touched)] = self.merge_small(replacement)

    def cut(self, size: int) -> None:
        """Truncate to a smaller size; no STAGED segment may be cut (cuts_staged)."""
        index = self.find(size)
        seg = self.segments[index]
        tail = self.slice(seg, seg.start, size) if seg.start < size else None
        for dropped in self.segments[index:]:
            self.retire(dropped)
        self.segments = self.segments[:index] + ([tail] if tail else [])
        self.size = size

    def slice(self, seg: Segment, lo: int, hi: int) -> Segment:
        """The part [lo, hi) of a retired segment, as a segment that can stand alone."""
        if seg.kind is Kind.ZERO:
            return Segment(lo, hi - lo, Kind.ZERO)
        if seg.kind in (Kind.BASE, Kind.COMMITTED):
            return Segment(lo, hi - lo, Kind.BASE, base_offset=seg.base_offset + lo - seg.start)
        if seg.kind is Kind.DIRTY:
            assert seg.data is not None
            return self.add_dirty(lo, seg.data[lo - seg.start:hi - seg.start])
        raise AssertionError(f"cannot slice a {seg.kind} segment")

    def merge_small(self, segments: list[Segment]) -> list[Segment]:
        """Join neighbouring unfrozen DIRTY segments while they fit in one block."""
        merged: list[Segment] = []
        for seg in segments:
            prev = merged[-1] if merged else None
            if (prev is not None and prev.kind is Kind.DIRTY and seg.kind is Kind.DIRTY
                    and not prev.frozen and not seg.frozen and prev is not seg
                    and prev.length + seg.length <= self.block_size):
                prev.data += seg.data  # type: ignore[operator]
                prev.length += seg.length
                seg.alive = False
                continue
            merged.append(seg)
        return merged
