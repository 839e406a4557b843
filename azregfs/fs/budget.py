"""The inode budget: past ``max_inodes`` nodes, the kernel is asked to drop the oldest
entries it holds (``pyfuse3.invalidate_entry``); its FORGETs then drop the nodes.

A node lives while the kernel holds its inode (namespace.py). After ``find`` or a
garbage-collect over a million blobs the kernel may hold them all until memory gets tight,
and the daemon would hold a node for each (about 0.4 KB). With the budget, the daemon's
nodes stay near ``max_inodes`` whatever the size of the walk.

Invariants:
- Entries are asked for in the order their nodes were made (the order a walk made them),
  each node at most once: the kernel may keep an entry in use (a cwd, an open file), and
  asking again and again would spin.
- Never asked for: the root, a node open or being written, a node whose name is gone
  (deleted or renamed over: the kernel holds it by inode only), one whose parent has no
  node.
- Asked from a worker thread, never the event loop's: invalidate_entry waits while the
  kernel handles a request about that directory, which this loop may be answering.
- Only the kernel's copy goes: a dropped entry is looked up again from the listings (no
  request to Azure while they are fresh), with the same answers.
"""

from __future__ import annotations

import errno
import logging
from collections import deque

import pyfuse3
import trio

from .namespace import ROOT_INODE, Namespace
from .nodes import parent_of

log = logging.getLogger(__name__)


class InodeBudget:
    def __init__(self, ns: Namespace, max_inodes: int, interval: float = 1.0) -> None:
        self.ns = ns
        self.max_inodes = max_inodes
        self.interval = interval
        self.asked = 0  # entries the kernel was asked to drop
        self.not_held = 0  # of those, ones the kernel no longer had

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            await self.enforce()

    async def enforce(self) -> None:
        """One round: down to 90% of the budget (a round is not spent on one entry)."""
        excess = self.ns.size - self.max_inodes
        if excess <= 0:
            return
        victims = self._oldest(excess + self.max_inodes // 10)
        if not victims:
            return
        # Counted before asking: the kernel's FORGETs arrive while the thread still asks, so
        # the nodes may be under budget before it returns.
        self.asked += len(victims)
        not_held = await trio.to_thread.run_sync(_invalidate, victims, abandon_on_cancel=True)
        self.not_held += not_held
        log.debug("inode budget: %d nodes, max_inodes %d: asked the kernel to drop %d "
                  "entries (%d it no longer held)", self.ns.size, self.max_inodes,
                  len(victims), not_held)

    def _oldest(self, count: int) -> list[tuple[int, bytes]]:
        """(parent inode, name) of up to `count` of the oldest nodes that may go."""
        created: deque[int] = self.ns.created
        victims: list[tuple[int, bytes]] = []
        while created and len(victims) < count:
            node = self.ns.nodes.get(created.popleft())
            if (node is None or node.inode == ROOT_INODE or node.opens or node.writing
                    or node.gone):
                continue
            parent = self.ns.by_path.get(parent_of(node.path))
            if parent is not None:
                victims.append((parent.inode, node.path.rpartition("/")[2].encode()))
        return victims


def _invalidate(victims: list[tuple[int, bytes]]) -> int:
    """Ask the kernel to drop each entry; the count of those it did not hold."""
    not_held = 0
    for parent, name in victims:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("invalidate_entry %d/%r: %s", parent, name, exc)
            not_held += 1
    return not_held
