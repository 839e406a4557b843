"""The write path: per-file write sessions that stage blocks while the file is written and
commit them on flush/fsync, so no other client ever sees a half-written blob.

A session describes the file as a list of contiguous segments covering [0, size), kept by
segments.py (split, merge, cut, and the block plan of a commit: pure, unit-tested); this
module stages and commits them:

- COMMITTED: a block of the base blob whose ID can be reused in Put Block List as is;
- BASE: a byte range of the base blob that must be re-uploaded if it is to be kept
  (blobs written by one Put Blob, append blobs, block IDs of another length, or a split
  committed block) -- downloaded with If-Match on the base ETag when the commit needs it;
- STAGED: a block uploaded by this session (Put Block), not yet committed;
- DIRTY: bytes in memory, counted against the global dirty budget;
- ZERO: a hole (sparse write or truncate that grows the file).

Rules the code relies on:
- Code between two ``await``s is atomic (trio). A session's ``lock`` serialises writes,
  truncates and commits; staging tasks only flip a segment from DIRTY to STAGED and check
  ``alive`` first, so a segment replaced while it was uploading is simply dropped.
- Full blocks are staged in the background while the writer goes on; the budget bounds the
  bytes held in memory across all sessions, and a writer waits (back-pressure) when it is
  spent. A waiting writer has partial blocks of any session staged, largest first, until
  the uploads under way will free the room it needs: idle sessions cannot starve it, and
  waking again while those uploads run stages nothing more (few Put Blocks, not a storm of
  4 KiB ones).
- Data of a STAGED block lives only in Azure's uncommitted list. Reading it back, or
  overwriting part of it, first commits the session (an implicit fsync): never a torn blob,
  never lost data, at the cost of one early commit in that rare case.
- Block IDs carry a random per-session token, so two writers of one blob never mix blocks,
  and have the length of the blob's existing IDs when there are any (Azure requires one
  length per blob), so a resumed upload reuses the committed blocks and sends only new data.
- A failed stage or commit is kept in ``error`` and raised by the next flush/fsync (EIO),
  or by a write that waits for room in the budget (that session's data is no longer
  spilled: it cannot make room); the DIRTY data stays, so a later fsync can still
  succeed. The release after a failed flush does not try again behind the application's
  back: it drops the data (WARNING).
- While a commit uploads (``committing``), budget spills leave the session alone: the
  commit has planned its blocks from the segments. Reads copy memory before any await.
- An append blob rewritten as a block blob (O_TRUNC, a write before its end) cannot stage
  blocks under its name until the commit deletes it, so that data is held in memory
  outside the budget's back-pressure (a registry never does this to large files).

Size limits (``limit``), checked when a write or truncate would grow the file, so the
application gets EFBIG at once rather than at close:
- A block blob we commit is cut into blocks of ``block_size``, and Azure takes at most
  50,000 blocks: the file may grow to 50,000 x block_size (390 GiB with 8 MiB blocks;
  Azure's own ceiling, 50,000 x 4,000 MiB, needs block_size 4000M). A base blob committed
  in larger blocks by another tool may already be larger: it may be changed within its size.
- A session in append mode (appending to an append blob) sends Append Blocks of at most
  4 MiB, and an append blob holds 50,000 blocks: appends stop at 50,000 x 4 MiB (195 GiB).
  Any other change leaves append mode (the blob is rewritten as a block blob at commit), and
  the block-blob limit applies from then on.
- The commit still counts the blocks it plans before uploading any (many small staged
  blocks can exceed 50,000 below the size limit) and fails with EFBIG.

Holes cost no memory: a hole (sparse write, truncate that grows, zero bytes written just
past a hole, as glibc's posix_fallocate emulation does) is one ZERO segment whatever its
length. The commit packs what must be uploaded into full blocks, and every block that is
all hole refers to one zero block staged once per commit (Put Block List accepts an ID many
times; checked on Azurite), so a 2 GiB hole costs one block_size upload, not 256. A small
file (up to 64 MiB) goes in one Put Blob only when its holes add at most block_size to
memory. pyfuse3 3.5 does not dispatch FALLOCATE: the kernel answers EOPNOTSUPP for every
mode, and posix_fallocate falls back to writing one zero byte per 4 KiB, which lands here
as a growing hole.
"""

from __future__ import annotations

import errno
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import trio

from ..fs.nodes import FSError, Node
from ..read.blockcache import BlockCache
from ..storage.driver import BlobInfo, Driver, StorageError
from .segments import (
    MAX_BLOCKS,
    ZERO_BLOCK,
    Kind,
    Segment,
    SegmentMap,
    TooManyBlocks,
    plan_blocks,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SHUTDOWN_COMMITS = 16  # sessions committed at once when the daemon stops
MAX_BLOCK_BYTES = 4000 * MiB  # Put Block's largest block
APPEND_CHUNK = 4 * MiB
MAX_APPEND_SIZE = MAX_BLOCKS * APPEND_CHUNK
SINGLE_PUT_MAX = 64 * MiB
ID_INDEX_DIGITS = 8
DEFAULT_ID_LENGTH = 32


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class DirtyBudget:
    """Bytes of not-yet-staged data held in memory, across all sessions.

    ``used`` is changed only by ``adjust``, at the very places data enters or leaves
    memory, so it always equals the sum of the sessions' ``dirty_bytes``. ``wait_for_room``
    is the gate a writer passes first; it may overshoot by the writes already past it.
    A waiting writer asks ``spill(need)`` for uploads that will free ``need`` bytes; the
    buffer counts the uploads already under way, so waking again while they run stages
    nothing more. Every stage that ends, landed or failed, wakes the waiters to look again.
    """

    def __init__(self, limit: int, spill: Callable[[int], None]) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waited_seconds = 0.0  # writers' time spent in wait_for_room (back-pressure)
        self._spill = spill
        self._changed = trio.Event()

    async def wait_for_room(self, amount: int, check: Callable[[], None]) -> None:
        """Wait until `amount` more bytes fit; `check` raises to stop waiting (the
        writer's own staging failed: its data waits for the commit, so cannot make room)."""
        if not (self.used and self.used + amount > self.limit):
            return
        started = time.monotonic()
        try:
            while self.used and self.used + amount > self.limit:
                check()
                self._spill(self.used + amount - self.limit)
                await self._changed.wait()
        finally:
            self.waited_seconds += time.monotonic() - started

    def adjust(self, delta: int) -> None:
        self.used += delta
        self.peak = max(self.peak, self.used)
        if delta < 0:
            self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class WriteBuffer:
    """Owns every open write session, the dirty budget and the staging tasks."""

    def __init__(self, driver: Driver, cache: BlockCache, block_size: int, budget: int,
                 upload_concurrency: int = 8) -> None:
        self.driver = driver
        self.cache = cache
        self.block_size = block_size
        self.budget = DirtyBudget(budget, self.spill)
        self.upload_limiter = trio.CapacityLimiter(upload_concurrency)
        self.staging_bytes = 0  # DIRTY bytes whose Put Block is under way
        self.sessions: dict[int, WriteSession] = {}  # inode -> session
        self.commits = 0  # files committed, and commits that failed (since the mount)
        self.commit_failures = 0
        self.nursery: trio.Nursery | None = None
        # Called after each commit with (node, info); the namespace hooks markers in here.
        self.on_commit: Callable[[Node, BlobInfo], Awaitable[None]] | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    def session(self, node: Node) -> WriteSession | None:
        return self.sessions.get(node.inode)

    def open(self, node: Node, name: str, base: BlobInfo | None, *, truncate: bool = False,
             exclusive: bool = False) -> WriteSession:
        session = self.sessions.get(node.inode)
        if session is None:
            session = WriteSession(self, node, name, base)
            self.sessions[node.inode] = session
            truncate = truncate or base is None  # a new file must be committed, even empty
        session.holders += 1
        if truncate:
            session.truncate_now(0)
        if exclusive:
            session.exclusive = True
        return session

    async def close(self, session: WriteSession) -> None:
        """A handle is released: the last one ends the session (data already committed)."""
        session.holders -= 1
        if session.holders > 0:
            return
        if session.changed and not session.deleted and session.failed_commit:
            # The application was told (EIO from flush/fsync); committing now, behind its
            # back, could replace a blob it believes unchanged.
            log.warning("discarding unsaved data of %s after its failed commit", session.name)
        elif session.changed and not session.deleted:
            try:
                await session.commit()
            except FSError as exc:
                log.error("discarding unsaved data of %s: %s", session.name, exc.message or exc)
        session.discard()
        self.sessions.pop(session.node.inode, None)

    def unsaved(self) -> int:
        """Files with changes not committed."""
        return sum(1 for session in self.sessions.values()
                   if session.changed and not session.deleted)

    def spill(self, need: int) -> None:
        """Back-pressure: stage partial blocks, largest first, until the uploads under way
        will free ``need`` bytes. Largest first, so a spill costs few Put Blocks: staging
        every session's partial block on every wake made thousands of 4 KiB blocks."""
        if self.staging_bytes >= need:
            return
        candidates = [(len(seg.data), index, session, seg)  # type: ignore[arg-type]
                      for index, session in enumerate(self.sessions.values())
                      for seg in session.spillable()]
        candidates.sort(key=lambda candidate: candidate[:2], reverse=True)
        for _, _, session, seg in candidates:
            session.stage_soon(seg)
            if self.staging_bytes >= need:
                return

    async def commit_all(self, retry_failed: bool = True) -> int:
        """Commit every session with changes (shutdown), all at once; returns how many
        failed. During an outage each commit fails within its own request bounds, so a
        stop costs about one commit's bound, not one per file. ``retry_failed=False``
        leaves alone a session whose last commit failed (already tried and reported)."""
        failed = 0

        async def commit(session: WriteSession) -> None:
            nonlocal failed
            async with limiter:
                try:
                    await session.commit()
                except FSError as exc:
                    failed += 1
                    log.error("could not commit %s at shutdown: %s", session.name,
                              exc.message or exc)

        limiter = trio.CapacityLimiter(SHUTDOWN_COMMITS)
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions.values()):
                if session.changed and not session.deleted and (
                        retry_failed or not session.failed_commit):
                    nursery.start_soon(commit, session)
        return failed


class WriteSession:
    def __init__(self, buffer: WriteBuffer, node: Node, name: str, base: BlobInfo | None) -> None:
        self.buffer = buffer
        self.driver = buffer.driver
        self.node = node
        self.name = name
        self.base = base
        self.block_size = buffer.block_size
        self.map = SegmentMap(self.block_size, self._account, self._block_full)
        self.laid_out = base is None or base.size == 0  # segments built from the base?
        self.map.from_base(base.size if base else 0)
        self.append_mode = base is not None and base.is_append
        self.appended = base.size if base and base.is_append else 0
        self.target_is_append = base is not None and base.is_append
        self.token = secrets.token_hex(DEFAULT_ID_LENGTH)[: DEFAULT_ID_LENGTH - ID_INDEX_DIGITS]
        self.next_index = 0
        self.lock = trio.Lock()
        self.inflight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.error: StorageError | None = None
        self.changed = False
        self.failed_commit = False  # the last commit raised, and nothing was written since
        self.committing = False  # a commit is uploading: background staging must keep off
        self.exclusive = False
        self.deleted = False
        self.holders = 0
        self.dirty_bytes = 0
        # A new file starts from what create() put on the node (its mode).
        self.metadata: dict[str, str] = dict(base.metadata if base else node.metadata)
        self.metadata_changed = False
        self.content_type = base.content_type if base else None
        node.writing = True

    # -- layout ----------------------------------------------------------------------------

    async def _lay_out(self) -> None:
        """Turn the base blob into reusable COMMITTED blocks where its block list allows."""
        if self.laid_out:
            return
        self.laid_out = True
        assert self.base is not None
        if self.base.is_append:
            return
        try:
            blocks = await self.driver.get_block_list(self.name)
        except StorageError as exc:
            raise FSError(errno.EIO, f"reading block list of {self.name}: {exc}") from None
        if not blocks or sum(b.size for b in blocks) != self.base.size:
            return
        lengths = {len(b.block_id) for b in blocks}
        if len(lengths) != 1:
            return
        id_length = lengths.pop()
        if id_length - ID_INDEX_DIGITS < 6:
            return  # cannot make unique IDs of that length: restage as BASE
        self.token = secrets.token_hex(id_length)[: id_length - ID_INDEX_DIGITS]
        # Only the untouched base range can become blocks (writes may already have cut it).
        base_segments = [s for s in self.map.segments if s.kind is Kind.BASE]
        if len(base_segments) != 1 or base_segments[0].start != 0:
            return
        whole = base_segments[0]
        committed: list[Segment] = []
        offset = 0
        for block in blocks:
            if offset + block.size > whole.end:
                break
            committed.append(Segment(offset, block.size, Kind.COMMITTED, block.block_id, offset))
            offset += block.size
        rest = [Segment(offset, whole.end - offset, Kind.BASE, base_offset=offset)] \
            if offset < whole.end else []
        index = self.map.segments.index(whole)
        whole.alive = False
        self.map.segments[index:index + 1] = committed + rest

    def _new_block_id(self) -> str:
        index = self.next_index
        self.next_index += 1
        return f"{self.token}{index:0{ID_INDEX_DIGITS}d}"

    @property
    def size(self) -> int:
        return self.map.size

    def _account(self, delta: int) -> None:
        self.dirty_bytes += delta
        self.buffer.budget.adjust(delta)

    def _block_full(self, seg: Segment) -> None:
        if not self.append_mode:  # append mode sends Append Blocks at commit instead
            self.stage_soon(seg)

    # -- writing ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        if self.deleted or not data:
            # Unlinked while open: nothing will ever be committed, so nothing is kept (and
            # the base blob is gone, so it cannot be laid out).
            return len(data)
        if self._appends_at_once(offset, len(data)):
            # The common case (a stream of writes at the end) without a checkpoint: taking
            # the lock would yield to the scheduler on every write, a third of the cost of
            # a 4 KiB write. Nothing here awaits, so it is atomic like the locked path.
            self._check_growth(offset + len(data), False)
            self.map.extend(data)
            self._written()
            return len(data)
        if not self.target_is_append or self.append_mode:
            await self.buffer.budget.wait_for_room(len(data), self._raise_staging_error)
        async with self.lock:
            self._check_growth(offset + len(data), self.append_mode and offset == self.map.size)
            if self.append_mode and offset != self.map.size:
                await self._leave_append_mode()
            if not self.append_mode:
                await self._lay_out()
            await self._write_locked(offset, data)
        self._written()
        if self.append_mode and self.map.size - self.appended >= self.block_size:
            async with self.lock:
                await self._append_pending(force_all=False)
        return len(data)

    def _appends_at_once(self, offset: int, length: int) -> bool:
        """Can this write be appended with no await: at the end of a block-blob session
        that is laid out, not locked (no commit or truncate under way), within budget?"""
        budget = self.buffer.budget
        return (offset == self.map.size and self.laid_out and not self.target_is_append
                and not self.lock.locked()
                and (not budget.used or budget.used + length <= budget.limit))

    def _written(self) -> None:
        self.changed = True
        self.failed_commit = False
        self.metadata.pop("mtime", None)  # a write after utime() sets mtime to now, as POSIX
        self.node.size = self.map.size
        self.node.mtime = time.time()

    async def _write_locked(self, offset: int, data: bytes) -> None:
        if offset > self.map.size:
            self.map.grow_hole(offset)
        end = offset + len(data)
        overlap_end = min(end, self.map.size)
        if offset < overlap_end:
            await self._overwrite(offset, data[: overlap_end - offset])
        if end > self.map.size:
            self.map.extend(data[max(0, self.map.size - offset):])

    async def _overwrite(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        while self.map.cuts_staged(offset) or self.map.cuts_staged(end):
            await self._commit_locked()  # makes STAGED blocks COMMITTED, hence cuttable
            await self._lay_out()
        self.map.overwrite(offset, data)

    def truncate_now(self, size: int) -> None:
        """Truncate to zero (open with O_TRUNC): synchronous, nothing needed from Azure."""
        assert size == 0
        self.map.clear()
        self.laid_out = True
        self.append_mode = False
        self.changed = True
        self.failed_commit = False
        self.node.size = 0

    async def truncate(self, size: int) -> None:
        if self.deleted:
            return
        async with self.lock:
            self._check_growth(size)
            if size == 0:
                self.truncate_now(0)
            elif size > self.map.size:
                await self._leave_append_mode()
                self.map.grow_hole(size)
            elif size < self.map.size:
                await self._leave_append_mode()
                await self._lay_out()
                if self.map.cuts_staged(size):
                    # An uncommitted block cannot be cut: commit, then cut the committed one.
                    await self._commit_locked()
                    await self._lay_out()
                self.map.cut(size)
            self.changed = True
            self.failed_commit = False
            self.node.size = self.map.size
            self.node.mtime = time.time()

    # -- limits ----------------------------------------------------------------------------

    def limit(self, appending: bool = False) -> int:
        """The largest size the file may grow to (see "Size limits" in the module notes)."""
        if appending:
            return MAX_APPEND_SIZE
        limit = MAX_BLOCKS * min(self.block_size, MAX_BLOCK_BYTES)
        if self.base is not None and not self.base.is_append:
            limit = max(limit, self.base.size)  # committed in larger blocks elsewhere
        return limit

    def _check_growth(self, size: int, appending: bool = False) -> None:
        """EFBIG, before anything changes, for a size the blob could never be committed at."""
        if size <= self.map.size or size <= (limit := self.limit(appending)):
            return
        if appending:
            why = (f"an append blob holds at most {MAX_BLOCKS:,} blocks of 4 MiB "
                   f"({_human(limit)})")
        elif self.block_size >= MAX_BLOCK_BYTES:
            why = f"Azure's largest block blob is {_human(limit)}"
        else:
            why = (f"with block_size {_human(self.block_size)} a blob holds at most "
                   f"{MAX_BLOCKS:,} blocks ({_human(limit)}); raise block_size (up to 4000M) "
                   "for larger files")
        raise FSError(errno.EFBIG, f"{self.name} cannot grow to {size:,} bytes: {why}")

    # -- staging ---------------------------------------------------------------------------

    def stage_soon(self, seg: Segment) -> None:
        if self.target_is_append or self.buffer.nursery is None or seg.frozen:
            return
        seg.frozen = True  # no copy: the bytes stay in the bytearray, never changed again
        self.inflight += 1
        self.idle = trio.Event() if self.inflight == 1 else self.idle
        self.buffer.staging_bytes += len(seg.data)  # type: ignore[arg-type]
        self.buffer.nursery.start_soon(self._stage, seg)

    def spillable(self) -> list[Segment]:
        """The DIRTY segments budget pressure may upload now, full or not: none while a
        commit plans its blocks from the segments, nor after a stage failed (the commit
        stages them again, and reports the failure; spilled again at once, a refused stage
        would loop as fast as Azure answers)."""
        if self.append_mode or self.committing or self.target_is_append or self.error:
            return []
        return [seg for seg in self.map.segments if seg.kind is Kind.DIRTY and not seg.frozen]

    async def _stage(self, seg: Segment) -> None:
        block_id = self._new_block_id()
        size = len(seg.data)  # type: ignore[arg-type]
        try:
            async with self.buffer.upload_limiter:
                await self.driver.stage_block(self.name, block_id, seg.data)  # type: ignore[arg-type]
        except StorageError as exc:
            # WARNING: the next flush/fsync reports it (as ERROR) to the application.
            log.warning("staging a block of %s failed: %s", self.name, exc)
            self.error = exc
            if seg.alive:
                seg.frozen = False  # kept as DIRTY: the next commit stages it again
        else:
            if seg.alive:
                self._account(-len(seg.data))  # type: ignore[arg-type]
                seg.kind, seg.block_id, seg.data = Kind.STAGED, block_id, None
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
            self.buffer.staging_bytes -= size
            self.buffer.budget.wake()  # a failed stage freed nothing: waiters look again

    # -- append blobs ----------------------------------------------------------------------

    async def _append_pending(self, force_all: bool) -> None:
        """Append Block the data past what the append blob already holds, in order."""
        while self.appended < self.map.size:
            pending = [s for s in self.map.segments if s.end > self.appended]
            data = b"".join(
                bytes(s.data[max(0, self.appended - s.start):])  # type: ignore[index]
                for s in pending if s.kind is Kind.DIRTY
            )
            chunk = data[:APPEND_CHUNK]
            if not force_all and len(chunk) < APPEND_CHUNK:
                return
            try:
                etag = await self.driver.append(self.name, chunk, self.appended)
            except StorageError as exc:
                raise FSError(errno.EIO, f"appending to {self.name}: {exc}") from None
            self._consume_appended(len(chunk), etag)

    def _consume_appended(self, count: int, etag: str) -> None:
        """Bytes now in the append blob leave memory and become part of the BASE range."""
        self.appended += count
        kept: list[Segment] = []
        for seg in self.map.segments:
            if seg.kind is Kind.DIRTY and seg.start < self.appended:
                cut = self.appended - seg.start
                if cut >= seg.length:
                    self.map.retire(seg)
                    continue
                self._account(-cut)
                seg.data = bytearray(seg.data[cut:])  # type: ignore[index]
                seg.start += cut
                seg.length -= cut
            kept.append(seg)
        head = [Segment(0, self.appended, Kind.BASE)]
        self.map.segments = head + [s for s in kept if s.kind is not Kind.BASE]
        if self.base is not None:
            self.base.etag = etag
            self.base.size = self.appended
        self.node.etag = etag

    async def _leave_append_mode(self) -> None:
        """Any change but an append turns the append blob into a block blob at commit."""
        if self.append_mode:
            self.append_mode = False
            self.laid_out = True

    # -- reading back ----------------------------------------------------------------------

    async def read(self, offset: int, size: int, cache: BlockCache) -> bytes:
        """Read your writes: unflushed data from memory, the rest from the base blob."""
        async with self.lock:
            end = min(offset + size, self.map.size)
            if offset >= end:
                return b""
            if any(s.kind is Kind.STAGED and s.start < end and s.end > offset
                   for s in self.map.segments):
                await self._commit_locked()
            # Memory is copied before the first await: a background stage may turn a DIRTY
            # segment STAGED (data gone) while a base range is being fetched.
            base = self.base
            parts: list[bytes | tuple[int, int]] = []  # bytes, or a (start, length) of base
            index = self.map.find(offset)
            while index < len(self.map.segments) and self.map.segments[index].start < end:
                seg = self.map.segments[index]
                lo, hi = max(seg.start, offset), min(seg.end, end)
                if seg.kind is Kind.DIRTY:
                    parts.append(bytes(seg.data[lo - seg.start:hi - seg.start]))  # type: ignore[index]
                elif seg.kind is Kind.ZERO:
                    parts.append(bytes(hi - lo))
                else:
                    parts.append((seg.base_offset + lo - seg.start, hi - lo))
                index += 1
            for i, part in enumerate(parts):
                if isinstance(part, tuple):
                    assert base is not None
                    parts[i] = await self._read_base(cache, base, *part)
            return b"".join(parts)  # type: ignore[arg-type]

    async def _read_base(self, cache: BlockCache, base: BlobInfo, start: int,
                         length: int) -> bytes | memoryview:
        try:
            return await cache.read(self.name, base.etag, base.size, start, length)
        except StorageError as exc:
            raise FSError(exc.errno if exc.errno == errno.ESTALE else errno.EIO,
                          f"reading {self.name}: {exc}") from None

    # -- commit ----------------------------------------------------------------------------

    async def commit(self) -> None:
        async with self.lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        try:
            await self._commit_unguarded()
        except FSError:
            self.failed_commit = True
            self.buffer.commit_failures += 1
            raise

    def _reported(self, doing: str, error: StorageError) -> FSError:
        # EACCES tells the operator the credential is read-only; anything else is EIO.
        code = errno.EACCES if error.errno == errno.EACCES else errno.EIO
        return FSError(code, f"{doing} {self.name}: {error}")

    def _raise_staging_error(self) -> None:
        """A background stage failed since the last flush: report it once."""
        if self.error is not None:
            error, self.error = self.error, None
            raise self._reported("writing", error)

    async def _commit_unguarded(self) -> None:
        self._raise_staging_error()
        if self.deleted or not (self.changed or self.metadata_changed):
            return
        await self.idle.wait()
        self._raise_staging_error()
        if not self.metadata_changed:
            self.metadata.pop("mtime", None)
        self.committing = True
        try:
            if self.append_mode:
                await self._append_pending(force_all=True)
                info = await self.driver.head(self.name)
                if self.metadata_changed:
                    await self.driver.set_metadata(self.name, self.metadata)
                    info = await self.driver.head(self.name)
                assert info is not None
            else:
                info = await self._commit_blocks()
        except StorageError as exc:
            raise self._reported("committing", exc) from None
        finally:
            self.committing = False
        self._committed(info)
        self.buffer.commits += 1
        if self.buffer.on_commit is not None:
            await self.buffer.on_commit(self.node, info)

    async def relocate(self, new_name: str, move: Callable[[], Awaitable[BlobInfo]]) -> None:
        """Rename while open: pending data is committed, moved, and the session follows."""
        async with self.lock:
            await self._commit_locked()  # a new file is `changed`, so it exists to be moved
            info = await move()
            self.name = new_name
            self._committed(info)

    async def _commit_blocks(self) -> BlobInfo:
        if self.target_is_append:
            # Azure refuses Put Block, and Put Blob too, over an append blob (Azurite does
            # not): this change replaces it by delete + create, not atomically.
            await self._absorb_base()
            log.warning("rewriting append blob %s as a block blob", self.name)
            await self.driver.delete(self.name)
            self.target_is_append = False
        dirty_only = all(s.kind in (Kind.DIRTY, Kind.ZERO) for s in self.map.segments)
        holes = sum(s.length for s in self.map.segments if s.kind is Kind.ZERO)
        if dirty_only and self.map.size <= SINGLE_PUT_MAX and holes <= self.block_size:
            data = b"".join(
                bytes(s.data) if s.kind is Kind.DIRTY else bytes(s.length)  # type: ignore[arg-type]
                for s in self.map.segments
            )
            return await self.driver.put(self.name, data, self.metadata, self.content_type,
                                         exclusive=self.exclusive)
        block_ids = await self._stage_all()
        return await self.driver.commit_blocks(self.name, block_ids, self.map.size, self.metadata,
                                               self.content_type, exclusive=self.exclusive)

    async def _absorb_base(self) -> None:
        """Bring every BASE/COMMITTED range into memory (before the base blob goes away)."""
        assert self.base is not None
        for i, seg in enumerate(self.map.segments):
            if seg.kind in (Kind.BASE, Kind.COMMITTED):
                data = await self.driver.read(self.name, seg.base_offset, seg.length,
                                              self.base.etag)
                seg.alive = False
                self.map.segments[i] = self.map.add_dirty(seg.start, data)

    async def _stage_all(self) -> list[str]:
        """Stage whatever is not yet a block (see ``plan_blocks``); the zero block once."""
        try:
            plan, runs = plan_blocks(self.map.segments, self.block_size)
        except TooManyBlocks as exc:
            raise FSError(errno.EFBIG, f"{self.name} would need more than {MAX_BLOCKS:,} "
                          f"blocks (Azure's limit) at {exc.size:,} bytes; raise block_size "
                          "or write it in larger pieces") from None
        run_ids: dict[int, str] = {}
        errors: list[StorageError] = []

        async def stage(number: int, run: list[Segment] | None) -> None:
            async with self.buffer.upload_limiter:
                try:
                    if run is None:
                        data = bytes(self.block_size)
                    else:
                        data = b"".join([await self._bytes_of(piece) for piece in run])
                    block_id = self._new_block_id()
                    await self.driver.stage_block(self.name, block_id, data)
                    run_ids[number] = block_id
                except StorageError as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            if ZERO_BLOCK in plan:
                nursery.start_soon(stage, ZERO_BLOCK, None)
            for number, run in enumerate(runs):
                nursery.start_soon(stage, number, run)
        if errors:
            raise errors[0]
        return [item if isinstance(item, str) else run_ids[item] for item in plan]

    async def _bytes_of(self, piece: Segment) -> bytes:
        if piece.kind is Kind.DIRTY:
            assert piece.data is not None
            with memoryview(piece.data) as view:
                return bytes(view[piece.data_offset:piece.data_offset + piece.length])
        if piece.kind is Kind.ZERO:
            return bytes(piece.length)
        assert self.base is not None
        return await self.driver.read(self.name, piece.base_offset, piece.length, self.base.etag)

    def _committed(self, info: BlobInfo) -> None:
        """The blob now is exactly our segments: they all become reusable committed data."""
        self.map.from_base(info.size)
        self.base = info
        self.laid_out = info.size == 0
        self.append_mode = info.is_append
        self.target_is_append = info.is_append
        self.appended = info.size if info.is_append else 0
        self.changed = False
        self.failed_commit = False
        self.metadata_changed = False
        self.exclusive = False
        self.node.absorb(info)

    def discard(self) -> None:
        self.map.clear()
        self.node.writing = False
