"""``azregfs stats`` and ``azregfs check``: the operator's view of a running mount.

Both read the daemon's snapshot (the JSON of ``MNT/.azregfs/stats``, see control.py and
metrics.py) through the mount itself, so they need no port and no
credentials, and they work for whoever may read the mount. A daemon that does not answer
blocks the reading thread, never this process: reads time out.

``check`` follows the monitoring-plugin convention: exit 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN, and one line on standard output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import threading
import time
from typing import Any

from ..fs import control

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
MiB = 1024 * 1024


class NoAnswer(Exception):
    """The mount is not an azregfs mount, is gone, or its daemon does not answer."""


def read_control(mountpoint: str, name: str, timeout: float) -> dict[str, Any]:
    """One control file of the mount (control.py) as JSON, within `timeout` seconds."""
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["value"] = control.read(mountpoint, name)
        except OSError as exc:
            result["error"] = exc

    reader = threading.Thread(target=read, daemon=True)  # a hung FUSE call stays there
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise NoAnswer(f"{mountpoint}: the daemon did not answer within {timeout:g} s")
    error = result.get("error")
    if error is not None:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise NoAnswer(f"{mountpoint} is not an azregfs mount")
        raise NoAnswer(f"{mountpoint}: {error.strerror}")
    return json.loads(result["value"])


def snapshot(mountpoint: str, timeout: float = 10.0) -> dict[str, Any]:
    if not os.path.ismount(mountpoint):
        try:
            os.stat(mountpoint)
        except OSError as exc:
            raise NoAnswer(f"{mountpoint}: {exc.strerror} (is the daemon dead?)") from None
        raise NoAnswer(f"{mountpoint} is not mounted")
    return read_control(mountpoint, "stats", timeout)


# -- check ---------------------------------------------------------------------------------

def check(mountpoint: str, timeout: float = 30.0, probe: bool = True) -> tuple[int, str]:
    """(exit status, one line) for monitoring and the systemd unit."""
    try:
        stats = snapshot(mountpoint, timeout=min(timeout, 10.0))
        if probe:
            # One cheap request now, so an idle mount is judged on the present, not on
            # its last request of an hour ago.
            read_control(mountpoint, "probe", timeout)
            stats = snapshot(mountpoint, timeout=min(timeout, 10.0))
    except NoAnswer as exc:
        return CRITICAL, f"CRITICAL: {exc}"
    except (ValueError, KeyError) as exc:
        return UNKNOWN, f"UNKNOWN: {mountpoint}: unreadable stats ({exc})"
    last = stats["driver"]["last_request"]
    failures = stats.get("commit_failures", 0)
    where = f"{mountpoint} (container {stats.get('container', '?')})"
    if last["age_seconds"] is None:
        azure = "no Azure request yet"
    else:
        azure = (f"last Azure request {last['age_seconds']:.1f} s ago "
                 f"{'succeeded' if last['ok'] else 'FAILED'} ({last['outcome']})")
    commits = f"{failures} failed commit{'s' if failures != 1 else ''} since mount"
    if last["age_seconds"] is not None and not last["ok"]:
        return CRITICAL, f"CRITICAL: {where}: daemon answers, {azure}, {commits}"
    if failures:
        return WARNING, f"WARNING: {where}: daemon answers, {azure}, {commits}"
    return OK, f"OK: {where}: daemon answers, {azure}, {commits}"


# -- stats ---------------------------------------------------------------------------------

def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What happened between two snapshots, per second (the --watch view)."""
    seconds = max(seconds, 1e-9)
    old, new = before["driver"], after["driver"]
    requests = {op: (count - old["requests"].get(op, 0)) / seconds
                for op, count in new["requests"].items()}
    hits = after["cache"]["hits"] - before["cache"]["hits"]
    misses = after["cache"]["misses"] - before["cache"]["misses"]
    return {
        "requests_per_second": {op: rate for op, rate in requests.items() if rate},
        "up_mib_per_second": (new["bytes_up"] - old["bytes_up"]) / MiB / seconds,
        "down_mib_per_second": (new["bytes_down"] - old["bytes_down"]) / MiB / seconds,
        "cache_hit_ratio": hits / (hits + misses) if hits + misses else None,
        "dirty_mib": after["dirty_bytes"] / MiB,
        "writer_wait_seconds": after["writer_wait_seconds"] - before["writer_wait_seconds"],
        "retries": new["retries"] - old["retries"],
        "throttled": new["throttled"] - old["throttled"],
    }


def totals_table(stats: dict[str, Any]) -> Any:
    from rich.table import Table

    azure = stats["driver"]
    table = Table(title=f"azregfs: container {stats['container']}, up "
                        f"{stats['uptime_seconds']:.0f} s", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for op, count in sorted(azure["requests"].items(), key=lambda item: -item[1]):
        table.add_row(f"Azure {op}", f"{count:,}")
    table.add_row("Azure requests, all", f"{sum(azure['requests'].values()):,}")
    table.add_row("retries / throttled", f"{azure['retries']:,} / {azure['throttled']:,}")
    table.add_row("MiB up / down", f"{azure['bytes_up'] / MiB:,.1f} / "
                                   f"{azure['bytes_down'] / MiB:,.1f}")
    cache = stats["cache"]
    lookups = cache["hits"] + cache["misses"]
    table.add_row("cache hit ratio", f"{cache['hits'] / lookups:.1%}" if lookups else "-")
    table.add_row("cache MiB (memory / disk)", f"{stats['cache_bytes'] / MiB:,.1f} / "
                                               f"{stats['cache_disk_bytes'] / MiB:,.1f}")
    table.add_row("dirty MiB / budget", f"{stats['dirty_bytes'] / MiB:,.1f} / "
                                        f"{stats['dirty_budget'] / MiB:,.0f}")
    table.add_row("writers waited (s)", f"{stats['writer_wait_seconds']:.2f}")
    table.add_row("commits (failed)", f"{stats['commits']:,} ({stats['commit_failures']})")
    table.add_row("open handles / write sessions",
                  f"{stats['open_handles']} / {stats['write_sessions']}")
    table.add_row("inodes", f"{stats['inodes']:,}")
    return table


def rates_table(mountpoint: str, figures: dict[str, Any], interval: float) -> Any:
    from rich.table import Table

    table = Table(title=f"azregfs {mountpoint}: last {interval:g} s", show_header=False)
    table.add_column("what")
    table.add_column("per second", justify="right")
    per_op = sorted(figures["requests_per_second"].items(), key=lambda item: -item[1])
    for op, rate in per_op:
        table.add_row(f"Azure {op}/s", f"{rate:,.1f}")
    table.add_row("Azure requests/s, all", f"{sum(r for _, r in per_op):,.1f}")
    table.add_row("MiB/s up / down", f"{figures['up_mib_per_second']:,.1f} / "
                                     f"{figures['down_mib_per_second']:,.1f}")
    ratio = figures["cache_hit_ratio"]
    table.add_row("cache hit ratio", "-" if ratio is None else f"{ratio:.1%}")
    table.add_row("dirty MiB", f"{figures['dirty_mib']:,.1f}")
    table.add_row("writers waited (s)", f"{figures['writer_wait_seconds']:.2f}")
    table.add_row("retries / throttled", f"{figures['retries']} / {figures['throttled']}")
    return table


def show_stats(mountpoint: str, as_json: bool, watch: float | None,
               count: int | None = None) -> int:
    """Print totals once, or with `watch` the rates of every interval (`count` times)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        stats = snapshot(mountpoint)
        if watch is None:
            if as_json:
                print(json.dumps(stats, indent=1, sort_keys=True))
            else:
                console.print(totals_table(stats))
            return 0
        # On a terminal the table is redrawn in place; into a pipe or file, one per interval.
        live = Live(console=console, auto_refresh=False) if console.is_terminal and \
            not as_json else None
        with live or contextlib.nullcontext():
            shown = 0
            taken = time.monotonic()
            while count is None or shown < count:
                time.sleep(watch)
                current, now = snapshot(mountpoint), time.monotonic()
                figures = rates(stats, current, now - taken)
                if as_json:
                    print(json.dumps({"interval_seconds": round(now - taken, 3), **figures},
                                     sort_keys=True), flush=True)
                elif live is not None:
                    live.update(rates_table(mountpoint, figures, round(now - taken, 1)),
                                refresh=True)
                else:
                    console.print(rates_table(mountpoint, figures, round(now - taken, 1)))
                stats, taken = current, now
                shown += 1
    except NoAnswer as exc:
        print(f"azregfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
