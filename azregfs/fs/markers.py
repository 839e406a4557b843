"""Directory markers: the zero-length blobs (metadata hdi_isfolder=true) that keep an empty
directory visible in Azure, written late and removed early.

Invariants:
- A marker is written only for a directory still empty when it falls due
  (``marker_delay`` after it was made or emptied here, at its ``fsyncdir`` or at unmount;
  which directories and when: localdirs.py), and only for leaves. One whose files are
  still being created is neither marked nor forgotten: Azure shows nothing under it until
  their commit, so this mount keeps showing it (postponed, looked at again later).
- A real blob landing under a directory deletes the markers above it (``drop_above``), so a
  registry's tree carries none.
- No marker put races an rmdir or a rename of its directory: those run inside
  ``changing``, which keeps new puts away from their paths and waits for the ones in
  flight, so they see, and remove or move, every marker there is. A put that fell due
  under a path being changed goes back to localdirs, for the change to decide; one whose
  directory was removed after it was handed out (the puts are written one after another)
  is dropped.
- A failed put is logged once per attempt and tried again later; it never fails the
  operation that made the directory.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from ..storage.blobs import MARKER_KEY
from ..storage.driver import StorageError
from .nodes import Entry, FSError, ancestors, is_under

if TYPE_CHECKING:
    from .namespace import Namespace

log = logging.getLogger(__name__)


class Markers:
    def __init__(self, namespace: Namespace) -> None:
        self.ns = namespace
        # Marker puts in flight, and directories an rmdir or rename is changing: no marker
        # is written under those, and they wait for the puts in flight under them first.
        self._marking: dict[str, trio.Event] = {}
        self._changing: Counter[str] = Counter()

    async def drop_above(self, path: str) -> None:
        """A real blob now exists at path: ancestors need no marker (deferred ones are
        forgotten, written ones deleted, once a put in flight for one has landed)."""
        self.ns.local.child_landed(path)
        await self._settle(list(ancestors(path)), subtrees=False)
        for ancestor in ancestors(path):
            node = self.ns.by_path.get(ancestor)
            if node is None or not node.marker:
                continue
            node.marker = False
            self.ns.note(ancestor, Entry(True, None))  # a cached listing must not revive it
            try:
                await self.ns.driver.delete(self.ns.blob_name(ancestor))
            except StorageError as exc:
                log.warning("could not remove directory marker %s: %s", ancestor, exc)

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

    async def write_due(self, under: str | None = None) -> None:
        """Write the markers that are due (all of them under a path, for fsyncdir and
        unmount), for directories still empty."""
        now = time.monotonic()
        for path in self.ns.local.due(now, under):
            if not self.ns.local.handed_out(path):
                # Removed (rmdir, rename) while the puts before it ran: it had none in
                # flight for that rmdir to wait for, and must get none now.
                continue
            if any(is_under(path, changing) for changing in self._changing):
                self.ns.local.postpone(path, now)  # the rmdir or rename decides its fate
                continue
            self._marking[path] = done = trio.Event()
            try:
                await self._write_marker(path)
            finally:
                del self._marking[path]
                done.set()

    async def _write_marker(self, path: str) -> None:
        if self.ns.pending.get(path):
            # Files being created in it are not in Azure until committed: it stays shown
            # from here (their commit ends that, drop_above), and is looked at again later.
            self.ns.local.postpone(path, time.monotonic())
            return
        try:
            if not await self.ns.is_empty(path):
                self.ns.local.visible(path)  # a child keeps it visible
                return
            node = self.ns.by_path.get(path)
            # Mode, owner and times set on the directory go into its marker.
            metadata = {**(node.metadata if node is not None else {}), MARKER_KEY: "true"}
            info = await self.ns.driver.put(self.ns.blob_name(path), b"", metadata)
        except (FSError, StorageError) as exc:
            log.warning("directory %s: could not write its marker (retried later): %s",
                        path, getattr(exc, "message", None) or exc)
            self.ns.local.postpone(path, time.monotonic())
            return
        if node is not None:
            node.marker = True
        self.ns.note(path, Entry(True, info))  # before it leaves localdirs: no gap between
        self.ns.local.visible(path)
        await self.drop_above(path)

    async def task(self) -> None:
        """Background: write markers as they fall due."""
        while True:
            await trio.sleep(max(0.05, min(0.5, self.ns.cfg.marker_delay / 4)))
            if self.ns.local.next_due() is not None:
                await self.write_due()
