"""Listings being fetched are told apart by identity (no Azure): two fetches of one
directory that overlap, the first asked ending last, each keep the changes noted while it
ran. Compared by value, the first one's end removed the second's record (both empty, so
equal); a change then noted went to the wrong fetch, and the second one's end raised
ValueError, which stopped the daemon (seen in CI after an outage)."""

from __future__ import annotations

import trio

from azregfs.config import Config
from azregfs.fs.listings import Listings
from azregfs.fs.nodes import Entry


def test_overlapping_fetches_of_one_directory_keep_their_own_changes() -> None:
    lists = Listings(Config(connection_string="UseDevelopmentStorage=true", container="c"),
                     None)  # type: ignore[arg-type]
    results: dict[str, dict[str, Entry] | None] = {}

    async def main() -> None:
        first_may_end = trio.Event()

        async def first_fetch(path: str) -> dict[str, Entry]:
            await first_may_end.wait()
            return {}

        async def second_fetch(path: str) -> dict[str, Entry]:
            await trio.sleep(0.01)
            return {}

        async def fetch(name: str, how) -> None:
            results[name] = await lists._fetched("d", how)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "first", first_fetch)
            await trio.sleep(0)
            nursery.start_soon(fetch, "second", second_fetch)
            await trio.sleep(0.05)  # the second ended; the first is still listing
            lists.note("d/new", Entry(False, None))  # our own change meanwhile
            first_may_end.set()

    trio.run(main)
    assert "new" in results["first"]  # the change reached the fetch still running
    assert lists.fetching == {}
