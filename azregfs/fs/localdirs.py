"""What this mount knows about directories better than Azure does, for a bounded time.

Pure bookkeeping, no I/O: the namespace asks, then acts (lists, writes markers). Two tables:

- **Created directories.** A directory this mount made with ``mkdir`` had an empty prefix
  when the lookup before it asked Azure (or a created parent's listing that was still
  exact). Until ``window`` (``dir_timeout``) seconds after that proof, its listing is
  exactly what this mount noted into it, so a name missing from it is missing without a
  request. That is the consistency contract and no more: a file another host closes in
  that directory is seen here within ``dir_timeout`` of its close, as in every other
  directory. A child made in a created directory inherits its parent's proof time, never a
  later one. Bounded: at most ``max_created`` directories of at most ``max_entries`` names
  each; one over either bound is simply forgotten (asked of Azure).

- **Unmarked directories.** Directories that exist here although Azure may hold no blob
  under them: made by ``mkdir`` and still without a committed child, or emptied by our own
  unlink or rename. Azure shows an empty directory only by a marker blob; writing one for
  every ``mkdir -p`` and deleting it when the first file lands costs two requests a level,
  so the marker is written only for a directory still unmarked ``marker_delay`` seconds
  later, on ``fsyncdir``, or at unmount -- and only for leaves (a marker below makes the
  parent visible). A committed child, or ``rmdir``, takes a directory (and its ancestors,
  for a child) out of the table. Until its marker is written, another host does not see
  an empty directory made here; a daemon killed meanwhile loses it (files are never lost).
  Bounded by ``max_unmarked``: beyond it the oldest are due at once.

  Every ancestor of an unmarked directory exists here too, whatever Azure says (its last
  file may have been renamed away): ``exists`` and ``children`` answer for them, so that
  ``rmdir`` of such an ancestor is ENOTEMPTY and a listing shows the way down.

  A directory whose marker is being written stays in the table (``due`` hands it out
  once; ``visible`` or ``postpone`` ends the write) until Azure shows it: a listing made
  while the put is in flight still shows it and its ancestors, and the put's own note of
  the marker patches any listing made before. Dropped when the put began, the directory
  was missing from a parent's listing for as long as the put took.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .nodes import ancestors, is_under, parent_of

E = TypeVar("E")  # what a listing maps names to (the namespace's Entry)


@dataclass
class _Created(Generic[E]):
    proven_at: float  # when Azure (or an exact parent) showed the prefix empty
    until: float
    names: dict[str, E] = field(default_factory=dict)


class LocalDirs(Generic[E]):
    def __init__(self, window: float, marker_delay: float, max_created: int = 4096,
                 max_entries: int = 1000, max_unmarked: int = 10000) -> None:
        self.window = window
        self.marker_delay = marker_delay
        self.max_created = max_created
        self.max_entries = max_entries
        self.max_unmarked = max_unmarked
        self._created: OrderedDict[str, _Created[E]] = OrderedDict()
        self._unmarked: dict[str, float] = {}  # path -> when its marker is due
        self._writing: set[str] = set()  # unmarked directories whose marker is being put
        self._holding: Counter[str] = Counter()  # path -> unmarked directories below it

    # -- created directories -------------------------------------------------------------

    def made(self, path: str, proven_at: float | None, now: float) -> None:
        """mkdir through this mount: it is unmarked, and its listing is ours while the proof
        of its absence (taken at `proven_at`; None: no proof) is younger than the window."""
        self._set_unmarked(path, now + self.marker_delay)
        if proven_at is None or proven_at + self.window <= now:
            return
        self._created[path] = _Created(proven_at, proven_at + self.window)
        self._created.move_to_end(path)
        while len(self._created) > self.max_created:
            self._created.popitem(last=False)

    def listing(self, path: str, now: float) -> dict[str, E] | None:
        """The complete listing of a directory created here, while its window lasts."""
        created = self._created.get(path)
        if created is None:
            return None
        if now >= created.until:
            del self._created[path]
            return None
        return created.names

    def proven_at(self, path: str) -> float | None:
        """When the exact listing of a created directory was proven (for its children)."""
        created = self._created.get(path)
        return created.proven_at if created is not None else None

    def note(self, path: str, entry: E | None) -> None:
        """Our own change to one name: keep a created parent's listing exact."""
        created = self._created.get(parent_of(path)) if path else None
        if created is None:
            return
        name = path.rpartition("/")[2]
        if entry is None:
            created.names.pop(name, None)
        else:
            created.names[name] = entry
            if len(created.names) > self.max_entries:
                del self._created[parent_of(path)]

    # -- unmarked directories ------------------------------------------------------------

    def _set_unmarked(self, path: str, due: float) -> None:
        if path not in self._unmarked:
            for ancestor in ancestors(path):
                self._holding[ancestor] += 1
        self._unmarked[path] = due

    def _drop_unmarked(self, path: str) -> None:
        self._writing.discard(path)
        if self._unmarked.pop(path, None) is None:
            return
        for ancestor in ancestors(path):
            self._holding[ancestor] -= 1
            if not self._holding[ancestor]:
                del self._holding[ancestor]

    def exists(self, path: str) -> bool:
        """A directory that exists here though Azure may show nothing for it: unmarked, or
        the ancestor of an unmarked one."""
        return path in self._unmarked or path in self._holding

    def unmarked_children(self, path: str) -> list[str]:
        """Names in path of the directories that exist here only (listings must show them:
        Azure does not)."""
        if path and not self.exists(path) or not self._unmarked:
            return []
        prefix = path + "/" if path else ""
        return sorted({p[len(prefix):].partition("/")[0] for p in self._unmarked
                       if p.startswith(prefix)})

    def emptied(self, path: str, now: float) -> None:
        """Our unlink/rename/rmdir may have taken the last blob under path."""
        if path and path not in self._unmarked:
            self._set_unmarked(path, now + self.marker_delay)

    def child_landed(self, path: str) -> None:
        """A blob now exists at path: every ancestor shows in Azure by its prefix."""
        for ancestor in ancestors(path):
            self._drop_unmarked(ancestor)

    def removed(self, path: str) -> None:
        """rmdir, or a directory renamed away: forget it and everything under it."""
        for known in [p for p in self._unmarked if is_under(p, path)]:
            self._drop_unmarked(known)
        for known in [p for p in self._created if is_under(p, path)]:
            del self._created[known]

    def moved(self, old: str, new: str, now: float) -> None:
        """A directory renamed: its unmarked directories follow it (no blob moved for
        them); what this mount made under either name is no longer known exactly."""
        moving = [p for p in self._unmarked if is_under(p, old)]
        for path in moving:
            self._drop_unmarked(path)
        self.removed(new)
        for path in moving:
            self._set_unmarked(new + path[len(old):], now + self.marker_delay)
        for known in [p for p in self._created if is_under(p, old)]:
            del self._created[known]

    def due(self, now: float, under: str | None = None) -> list[str]:
        """Unmarked leaves whose marker is due now (all of them `under` a path, for fsyncdir
        and unmount), handed out once: each stays in the table until ``visible`` (its
        marker, or a child, shows it in Azure) or ``postpone`` (not written after all)."""
        overflow = len(self._unmarked) - self.max_unmarked
        oldest = sorted(self._unmarked.values())[overflow - 1] if overflow > 0 else None
        ready = [path for path, when in self._unmarked.items()
                 if path not in self._writing and (
                     (under is not None and is_under(path, under)) or when <= now
                     or (oldest is not None and when <= oldest))]
        leaves = [path for path in ready if path not in self._holding]
        self._writing.update(leaves)
        return leaves

    def handed_out(self, path: str) -> bool:
        """Handed out by ``due`` and still waiting for its marker (not removed, moved or
        postponed since)."""
        return path in self._writing

    def visible(self, path: str) -> None:
        """Azure now shows path (its marker landed, or a child was found under it): it and
        its ancestors leave the table."""
        self._drop_unmarked(path)
        self.child_landed(path)

    def postpone(self, path: str, now: float) -> None:
        """The marker handed out by ``due`` was not written (the put failed, or an rmdir or
        rename of the path is under way and decides): due again after the delay."""
        self._writing.discard(path)
        if path in self._unmarked:
            self._unmarked[path] = now + self.marker_delay

    def next_due(self) -> float | None:
        return min((when for path, when in self._unmarked.items()
                    if path not in self._writing), default=None)

    @property
    def unmarked_count(self) -> int:
        return len(self._unmarked)
