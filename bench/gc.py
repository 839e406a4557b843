#!/usr/bin/env python3
"""Benchmark: a registry's walks on an azregfs mount -- garbage-collect, the catalog, tag
lists, find and du -- cold (a fresh mount) and warm (the same mount again).

    .venv/bin/python bench/gc.py [--repos 100] [--tags 5] [--latency MS] [-o OPTS] [--json F]

It starts its own Azurite, writes a synthetic registry straight into a container with the
SDK (testkit/synthetic.py: real sha256 digests, schema 2 manifests, tags, layer links, 10%
orphan blobs), then, for each step, mounts the container afresh through testkit's fault
proxy (which counts requests and, with --latency, delays each by MS ms), runs the step
twice, and unmounts. Steps: Debian's `docker-registry garbage-collect --dry-run`, the real
garbage-collect (last: it deletes the orphans), `/v2/_catalog` paged by 100, the tag list
of every repository, `find | wc -l` and `du -s`. Each run prints wall time, Azure requests
by type, FUSE operations by type, the daemon's CPU seconds and its peak RSS; and, for
scale, the SDK's own flat listing of the registry's prefix through the same proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from azure.storage.blob import BlobServiceClient
from common import cpu_seconds, hot_spots, proc_status_kib, profiled, start_mount, stop_mount

from azregfs.demo.azurite import Azurite
from azregfs.demo.oci import Registry, registry_config
from azregfs.fs import control
from testkit import synthetic
from testkit.faultproxy import FaultProxy

CONTAINER = "gcbench"


def stats(mount: Path) -> dict[str, Any]:
    return json.loads(control.read(mount, "stats"))


def catalog(registry: Registry) -> int:
    """Every repository through /v2/_catalog, 100 a page, following the Link header."""
    path, count = "/v2/_catalog?n=100", 0
    while path:
        with urllib.request.urlopen(registry.url + path, timeout=600) as response:
            count += len(json.load(response)["repositories"])
            link = response.headers.get("Link", "")
        path = link[link.index("<") + 1:link.index(">")] if link else ""
    return count


def tag_lists(registry: Registry, repositories: list[str]) -> int:
    count = 0
    for repository in repositories:
        with urllib.request.urlopen(f"{registry.url}/v2/{repository}/tags/list",
                                    timeout=600) as response:
            count += len(json.load(response)["tags"] or [])
    return count


def run(command: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def measure(mount: Path, pid: int, action: Callable[[], Any]) -> dict[str, Any]:
    before, cpu_before = stats(mount), cpu_seconds(pid)
    started = time.monotonic()
    result = action()
    wall = time.monotonic() - started
    after, cpu_after = stats(mount), cpu_seconds(pid)
    requests = Counter(after["driver"]["requests"]) - Counter(before["driver"]["requests"])
    fuse = Counter(after["fuse"]["operations"]) - Counter(before["fuse"]["operations"])
    return {"wall": round(wall, 2), "requests": dict(requests),
            "total_requests": sum(requests.values()), "fuse": dict(fuse),
            "daemon_cpu": round(cpu_after - cpu_before, 2),
            "peak_rss_mib": proc_status_kib(pid, "VmHWM")["VmHWM"] // 1024,
            "result": result}


def step_action(step: str, config: Path, mount: Path, registry: Registry | None,
                data: synthetic.SyntheticRegistry) -> Callable[[], Any]:
    """What one step runs; it returns what the step found (lines, repositories, tags...)."""
    if step in ("gc-dry-run", "gc"):
        command = ["docker-registry", "garbage-collect", str(config)]
        if step == "gc-dry-run":
            command.insert(2, "--dry-run")
        return lambda: len(run(command).splitlines())
    if step == "catalog":
        assert registry is not None
        return lambda: catalog(registry)
    if step == "tags":
        assert registry is not None
        return lambda: tag_lists(registry, data.repositories)
    if step == "find":
        return lambda: len(run(["find", "."], cwd=mount).splitlines())
    if step == "du":
        return lambda: run(["du", "-s", "--apparent-size", "."], cwd=mount).split()[0]
    raise SystemExit(f"unknown step {step!r}")


def walk_floor(data: synthetic.SyntheticRegistry, work: Path, objects: int
               ) -> dict[str, Any]:
    """find and du over bench/treefs.py serving the same names from memory: what the FUSE
    requests of the walk cost any pyfuse3 daemon (wall time, and its CPU)."""
    names, mount = work / "names.txt", work / "floor"
    names.write_text("".join(f"{len(content)} {name}\n"
                             for name, content in data.objects.items()))
    mount.mkdir()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("treefs.py")),
                                str(names), str(mount)], stdout=subprocess.PIPE, text=True)
    rows: dict[str, Any] = {}
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "mounted"
        for command in (["find", "."], ["du", "-s", "--apparent-size", "."]):
            for phase in ("cold", "warm"):
                cpu, started = cpu_seconds(process.pid), time.monotonic()
                out = run(command, cwd=mount)
                wall, cpu = time.monotonic() - started, cpu_seconds(process.pid) - cpu
                rows[f"{command[0]}-{phase}"] = {"wall": round(wall, 2), "cpu": round(cpu, 2)}
                result = len(out.splitlines()) if command[0] == "find" else out.split()[0]
                print(f"{'floor ' + command[0]:<16} {phase:<5} {wall:>8.2f} s        0 req "
                      f"(pyfuse3 in memory)  cpu {cpu:.2f} s ({1000 * cpu / objects:.3f} "
                      f"ms/object)  result {result}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    return rows


def print_row(step: str, phase: str, row: dict[str, Any], objects: int) -> None:
    requests = ", ".join(f"{op} {n}" for op, n in sorted(row["requests"].items()))
    fuse = ", ".join(f"{op} {n}" for op, n in sorted(row["fuse"].items(), key=lambda i: -i[1])
                     [:6])
    per_object_ms = 1000 * row["daemon_cpu"] / objects
    print(f"{step:<16} {phase:<5} {row['wall']:>8.2f} s  {row['total_requests']:>7} req "
          f"({requests})  cpu {row['daemon_cpu']:.2f} s ({per_object_ms:.3f} ms/object)  "
          f"rss {row['peak_rss_mib']} MiB  result {row['result']}")
    print(f"{'':<23}fuse: {fuse}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=100)
    parser.add_argument("--tags", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.0, metavar="MS")
    parser.add_argument("-o", dest="options", default="", help="mount options")
    parser.add_argument("--steps", default="gc-dry-run,catalog,tags,find,du,gc",
                        help="comma-separated, in order (gc deletes the orphans); `floor`: "
                             "find and du over the same names served from memory by a "
                             "bare pyfuse3 file system (bench/treefs.py)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--logs", metavar="DIR",
                        help="keep each step's mount log here (else they go with the run)")
    parser.add_argument("--log-level", default="INFO", help="the mount's (DEBUG logs "
                        "every request)")
    parser.add_argument("--profile", metavar="DIR",
                        help="sample the daemon with py-spy in each run: collapsed stacks "
                             "in DIR, and the hot spots printed")
    args = parser.parse_args()
    for folder in (args.profile, args.logs):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    if shutil.which("docker-registry") is None:
        sys.exit("docker-registry is not installed (scripts/install installs it)")
    registry_data = synthetic.build(args.repos, args.tags)
    objects = len(registry_data.objects)
    print(f"synthetic registry: {args.repos} repositories, {registry_data.manifests} "
          f"manifests, {len(registry_data.blobs)} blobs ({len(registry_data.orphans)} "
          f"orphans), {objects} objects; latency {args.latency:g} ms")
    results: dict[str, Any] = {"objects": objects, "repos": args.repos,
                               "latency_ms": args.latency, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gcbench-") as tmp, Azurite() as azurite, \
            FaultProxy(azurite.port) as proxy:
        work = Path(tmp)
        if args.latency:
            proxy.add_rule("latency", ms=args.latency)
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.create_container(CONTAINER)
        started = time.monotonic()
        synthetic.upload(container, registry_data)
        print(f"written in {time.monotonic() - started:.1f} s")
        via_proxy = BlobServiceClient.from_connection_string(
            proxy.connection_string(azurite)).get_container_client(CONTAINER)
        started = time.monotonic()
        listed = sum(1 for _ in via_proxy.list_blobs(name_starts_with=synthetic.ROOT))
        sdk = time.monotonic() - started
        results["sdk_flat_listing"] = {"wall": round(sdk, 2), "blobs": listed}
        print(f"{'sdk flat listing':<22} {sdk:>8.2f} s  {-(-listed // 5000):>7} req "
              f"({listed} blobs)")
        endpoint = SimpleNamespace(connection_string=proxy.connection_string(azurite))
        mount = work / "mnt"
        config = work / "registry.yml"
        config.write_text(registry_config(mount, 0))
        for step in args.steps.split(","):
            if step == "floor":
                results["steps"]["floor"] = walk_floor(registry_data, work, objects)
                continue
            logs = Path(args.logs) if args.logs else work
            process = start_mount(endpoint, CONTAINER, mount, args.options,  # type: ignore
                                  logs / f"{step}.log", args.log_level)
            registry = Registry(mount, work / "registry") if step in ("catalog", "tags") \
                else None
            try:
                if registry is not None:
                    registry.start()
                action = step_action(step, config, mount, registry, registry_data)
                rows = {}
                for phase in ("cold", "warm"):
                    out = Path(args.profile) / f"{step}-{phase}.txt" if args.profile else None
                    with profiled(process.pid, out):
                        rows[phase] = measure(mount, process.pid, action)
                    print_row(step, phase, rows[phase], objects)
                    if out is not None:
                        for frame, own, inclusive in hot_spots(out):
                            print(f"{'':<23}{own:6.1%} self {inclusive:6.1%} incl  {frame}")
                results["steps"][step] = rows
            finally:
                if registry is not None:
                    registry.stop()
                stop_mount(mount, process)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
