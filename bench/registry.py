"""Registry push/pull wall times and Azure requests: docker-registry on an azregfs mount next
to docker-registry on a local directory, and the SDK's own upload/download of the biggest
layer as Azurite's ceiling, all in one run against one Azurite.

    .venv/bin/python bench/registry.py [--layers 1,32,256] [--latency MS] [--repeat 1] [-o OPTS]
                                       [--clients 8] [--profile DIR] [--json out.json]
                                       [--workdir DIR]

To measure another checkout of the daemon, run from that checkout with
``PYTHONPATH=<checkout>``: the mount is ``python -m azregfs`` in the current directory.

The mount reaches Azurite through testkit.faultproxy, which counts the requests by Azure
operation and, with ``--latency MS``, delays each one by MS milliseconds (a stand-in for
the 5-30 ms of a real Azure region; Azurite on loopback answers in about 1 ms). The image
is one layer per ``--layers`` size in MiB plus its config and manifest. The push is timed
from skopeo's start to its end; its requests also include what the unmount after it
flushed. The pull is cold: the mount is remounted between the two (the remount's own
requests are in neither column). "sdk ... via proxy" is the same SDK call through the proxy,
so the proxy's own cost (it shares the machine's cores with Azurite) shows next to it.

After the cold pull, the same mount pulls again ("mount pull warm": its page cache, block
cache and listings), then a fresh mount serves `--clients` pulls of the image at once
("mount pull x8": do they share their GETs?). Last, "mount pull run-in": a cold pull (every
byte from Azure) by a fresh mount that has first read other data as large as its block
cache, as a long-running mount has: its memory is already faulted in. `--profile DIR`
samples the daemon with py-spy during each mount step and prints where its seconds went.

The CPU table gives the seconds each process spent during each push and pull: Azurite,
the registry, the daemon, skopeo, and this process (the proxy runs in it). Their sum over
the machine's cores is the step's floor: when every process shares a few cores, no design
of the mount can make the step take less wall time than that. "daemon / skopeo CPU" is the
daemon's CPU per byte moved against the client's, for the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from azure.storage.blob import BlobServiceClient
from common import CpuMeter, hot_spots, process_tree, profiled

from azregfs.config import Config, apply, parse_mount_options
from azregfs.demo.azurite import Azurite
from azregfs.demo.oci import Image, MiB, Registry, build_image, read_image, skopeo_copy
from testkit.faultproxy import FaultProxy


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


class Mount:
    def __init__(self, connection_string: str, container: str, path: Path,
                 options: str = "") -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": connection_string}
        self.log = open(path.parent / f"{path.name}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "azregfs", "mount", "--foreground",
             *(["-o", options] if options else []), container, str(path)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount failed, see {self.log.name}")
            time.sleep(0.05)

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        self.process.wait(timeout=600)
        self.log.close()


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Proxy counters between two snapshots."""
    requests = {op: n - before["requests"].get(op, 0) for op, n in after["requests"].items()}
    return {"requests": {op: n for op, n in requests.items() if n},
            "bytes_up": after["bytes_up"] - before["bytes_up"],
            "bytes_down": after["bytes_down"] - before["bytes_down"]}


def push_pull(image: Image, registry: Registry, workdir: Path, label: str,
              results: dict[str, Any], processes: Callable[[], dict[str, list[int]]],
              remount: Callable[[], Registry] | None = None,
              profile: Path | None = None) -> None:
    """Push then pull; wall times, and the CPU each process spent (``processes()`` names
    the ones running at the time: the registry, the daemon, Azurite). With `profile`, the
    daemon (``processes()["daemon"]``) is sampled with py-spy during each."""
    def spied(step: str) -> contextlib.AbstractContextManager[None]:
        if profile is None:
            return contextlib.nullcontext()
        out = profile / f"{label}-{step}.txt"
        results.setdefault("profile_files", {})[f"{label} {step}"] = str(out)
        return profiled(processes()["daemon"][0], out)

    reference = f"docker://{registry.address}/bench/{label}:{image.tag}"
    with spied("push"), CpuMeter(processes()) as cpu:
        results[f"{label} push"] = timed(
            lambda: skopeo_copy(f"oci:{image.layout}:{image.tag}", reference))
    results["cpu"][f"{label} push"] = cpu.used
    if remount is not None:  # a cold pull: nothing of the image in the daemon's cache
        registry = remount()
        reference = f"docker://{registry.address}/bench/{label}:{image.tag}"
    pulled = workdir / f"pulled-{label}"
    shutil.rmtree(pulled, ignore_errors=True)
    with spied("pull"), CpuMeter(processes()) as cpu:
        results[f"{label} pull"] = timed(
            lambda: skopeo_copy(reference, f"oci:{pulled}:{image.tag}"))
    results["cpu"][f"{label} pull"] = cpu.used
    assert read_image(pulled, image.tag).digests == image.digests


def cache_bytes(options: str) -> int:
    """The mount's cache_size under these -o options (read as the CLI reads them)."""
    cfg = Config()
    apply(cfg, parse_mount_options(options)[0], "-o")
    return cfg.cache_size


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def pull_once(registry: Registry, image: Image, label: str, into: Path) -> None:
    shutil.rmtree(into, ignore_errors=True)
    skopeo_copy(f"docker://{registry.address}/bench/{label}:{image.tag}", f"oci:{into}:{image.tag}")
    assert read_image(into, image.tag).digests == image.digests


def pull_concurrently(registry: Registry, image: Image, label: str, workdir: Path,
                      clients: int) -> None:
    """`clients` skopeo pulls of the same image at once, each into its own layout."""
    reference = f"docker://{registry.address}/bench/{label}:{image.tag}"
    targets = [workdir / f"pulled-{label}-client{n}" for n in range(clients)]
    for target in targets:
        shutil.rmtree(target, ignore_errors=True)
    processes = [subprocess.Popen(["skopeo", "--insecure-policy", "copy", "--preserve-digests",
                                   "--quiet", "--src-tls-verify=false", reference,
                                   f"oci:{target}:{image.tag}"]) for target in targets]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"skopeo exited {process.returncode}")
    for target in targets:
        assert read_image(target, image.tag).digests == image.digests


def sdk_round_trip(connection_string: str, path: Path, label: str,
                   results: dict[str, Any]) -> None:
    service = BlobServiceClient.from_connection_string(connection_string)
    sdk = service.get_container_client("bench-sdk")
    with open(path, "rb") as handle:
        results[f"sdk upload (big layer){label}"] = timed(
            lambda: sdk.upload_blob("layer", handle, max_concurrency=4, overwrite=True))
    results[f"sdk download (big layer){label}"] = timed(
        lambda: sdk.download_blob("layer", max_concurrency=4).readall())
    service.close()


def run(layers_mib: list[float], latency_ms: float, workdir: Path,
        options: str = "", clients: int = 8, profile: Path | None = None) -> dict[str, Any]:
    proxy_log = logging.FileHandler(workdir / "proxy.log")
    proxy_log.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(message)s"))
    logging.getLogger("testkit.faultproxy").addHandler(proxy_log)
    logging.getLogger("testkit.faultproxy").setLevel(logging.DEBUG)
    try:
        return measure(layers_mib, latency_ms, workdir, options, clients, profile)
    finally:
        logging.getLogger("testkit.faultproxy").removeHandler(proxy_log)
        proxy_log.close()


def measure(layers_mib: list[float], latency_ms: float, workdir: Path,
            options: str = "", clients: int = 8, profile: Path | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"cpu": {}}
    image = build_image(workdir / "image", [int(size * MiB) for size in layers_mib],
                        tag="v1", seed=7, compress_below=4 * MiB)
    biggest = max(image.layers, key=lambda layer: layer.size)
    big_layer = image.layout / "blobs" / "sha256" / biggest.digest[7:]
    with Azurite() as azurite, FaultProxy(azurite.port) as proxy:
        if latency_ms:
            proxy.add_rule("latency", ms=latency_ms)
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container(
            "bench-sdk")
        sdk_round_trip(azurite.connection_string, big_layer, "", results)
        sdk_round_trip(proxy.connection_string(azurite), big_layer, " via proxy", results)

        azurite_pids = process_tree(azurite.process.pid)
        local = Registry(workdir / "local-store", workdir / "registry-local").start()
        try:
            push_pull(image, local, workdir, "local", results,
                      lambda: {"azurite": azurite_pids, "registry": [local.process.pid]})
        finally:
            local.stop()

        BlobServiceClient.from_connection_string(azurite.connection_string).create_container(
            "bench-mount")
        proxied = proxy.connection_string(azurite)
        mnt = workdir / "mnt"
        state: dict[str, Any] = {"mount": Mount(proxied, "bench-mount", mnt, options)}
        state["registry"] = Registry(mnt, workdir / "registry-mount").start()
        marks: dict[str, dict[str, Any]] = {"push start": proxy.snapshot()}

        def remount() -> Registry:
            state["registry"].stop()
            state["mount"].unmount()
            marks.setdefault("push end", proxy.snapshot())
            state["mount"] = Mount(proxied, "bench-mount", mnt, options)
            state["registry"] = Registry(mnt, workdir / "registry-mount").start()
            marks.setdefault("pull start", proxy.snapshot())
            return state["registry"]

        def processes() -> dict[str, list[int]]:
            return {"azurite": azurite_pids, "registry": [state["registry"].process.pid],
                    "daemon": [state["mount"].process.pid]}

        def step(name: str, action: Callable[[], object]) -> None:
            """One timed step on the mount: wall, CPU per process, requests (and a py-spy
            profile of the daemon with --profile)."""
            before = proxy.snapshot()
            out = profile / f"{name.replace(' ', '-')}.txt" if profile else None
            with profiled(state["mount"].process.pid, out), CpuMeter(processes()) as cpu:
                results[name] = timed(action)
            results["cpu"][name] = cpu.used
            moved = delta(proxy.snapshot(), before)
            results["requests"][name.removeprefix("mount ")] = moved["requests"]
            results[f"{name}: MiB from Azure"] = moved["bytes_down"] / MiB
            if out is not None:
                results.setdefault("profile_files", {})[name] = str(out)

        results["requests"] = {}
        try:
            push_pull(image, state["registry"], workdir, "mount", results, processes,
                      remount=remount, profile=profile)
            marks["pull end"] = proxy.snapshot()
            # Warm: the same mount and registry again (page cache, block cache, listings).
            step("mount pull warm", lambda: pull_once(state["registry"], image, "mount",
                                                      workdir / "pulled-warm"))
            if clients > 1:  # cold again, `clients` pulls of the image at once
                remount()
                step(f"mount pull x{clients}", lambda: pull_concurrently(
                    state["registry"], image, "mount", workdir, clients))
            # Cold data on a daemon that has run in: a fresh mount first reads other data
            # as large as its block cache, then the page cache is dropped. A fresh process
            # pays a page fault for each page of memory it caches for the first time (0.2
            # CPU-s per 256 MiB here, bench/fuse_floor.py's machine); a long-running mount
            # reuses the memory of the blocks it evicts.
            filler = BlobServiceClient.from_connection_string(azurite.connection_string) \
                .get_container_client("bench-mount").get_blob_client("run-in")
            filler.upload_blob(os.urandom(cache_bytes(options)), overwrite=True,
                               max_concurrency=4)
            remount()
            subprocess.run(["cat", str(mnt / "run-in")], stdout=subprocess.DEVNULL, check=True)
            drop_page_cache()
            step("mount pull run-in", lambda: pull_once(state["registry"], image, "mount",
                                                        workdir / "pulled-run-in"))
        finally:
            state["registry"].stop()
            state["mount"].unmount()
    push = delta(marks["push end"], marks["push start"])
    pull = delta(marks["pull end"], marks["pull start"])
    results["mount push: MiB to Azure"] = push["bytes_up"] / MiB
    results["mount pull: MiB from Azure"] = pull["bytes_down"] / MiB
    results["image MiB"] = image.total_size / MiB
    results["requests"].update({"push": push["requests"], "pull": pull["requests"]})
    return results


def report(runs: list[dict[str, Any]], layers_mib: list[float], latency_ms: float) -> None:
    shape = "+".join(f"{size:g}" for size in layers_mib)
    print(f"image: layers {shape} MiB; proxy latency {latency_ms:g} ms; {len(runs)} run(s)")
    for key, value in runs[0].items():
        if isinstance(value, dict):
            continue
        values = " ".join(f"{r[key]:8.2f}" for r in runs)
        unit = "" if "MiB" in key else " s"
        print(f"{key:34s} {values}{unit}")
    for side in ("push", "pull"):
        ratio = [r[f"mount {side}"] / r[f"local {side}"] for r in runs]
        print(f"{'mount/local ' + side:34s} " + " ".join(f"{x:8.2f}" for x in ratio))

    print()
    steps = ["local push", "mount push", "local pull", "mount pull",
             *[key for key in runs[0]["cpu"] if key.startswith("mount pull ")]]
    print(f"{'CPU seconds (mean of runs)':34s}" + "".join(f"{step:>12s}" for step in steps))
    names = sorted({name for r in runs for step in steps for name in r["cpu"][step]})

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for name in [*names, "total"]:
        cells = [mean([sum(r["cpu"][step].values()) if name == "total"
                       else r["cpu"][step].get(name, 0.0) for r in runs]) for step in steps]
        print(f"{'  ' + name:34s}" + "".join(f"{cell:12.2f}" for cell in cells))
    cores = os.cpu_count() or 1
    floors = [mean([sum(r["cpu"][step].values()) / cores for r in runs]) for step in steps]
    print(f"{f'  floor: total / {cores} cores':34s}" + "".join(f"{f:12.2f}" for f in floors))
    walls = [mean([r[step] for r in runs]) for step in steps]
    print(f"{'  wall':34s}" + "".join(f"{w:12.2f}" for w in walls))
    ratios = [mean([r["cpu"][step].get("daemon", 0.0) / max(r["cpu"][step].get(
        "client (skopeo)", 0.0), 1e-9) for r in runs]) if step.startswith("mount") else None
        for step in steps]
    print(f"{'  daemon / skopeo CPU':34s}" + "".join(
        f"{ratio:12.2f}" if ratio is not None else f"{'':12s}" for ratio in ratios))

    width = max(7 * len(runs), 10)
    sides = list(runs[0]["requests"])
    print()
    print(f"{'mount requests by type':34s}" + "".join(f" {side:>{width}s}  " for side in sides))
    ops = sorted({op for r in runs for side in sides for op in r["requests"][side]})

    def cells(side: str, op: str | None) -> str:
        counts = [r["requests"][side] for r in runs]
        text = "".join(f"{sum(c.values()) if op is None else c.get(op, 0):7d}" for c in counts)
        return f" {text:>{width}s}  "

    for op in [*ops, None]:
        print(f"{'  ' + (op or 'total'):34s}" + "".join(cells(side, op) for side in sides))
    for step, path in runs[0].get("profile_files", {}).items():
        print(f"\ndaemon profile, {step} (py-spy, {path}):")
        for frame, own, inclusive in hot_spots(Path(path), top=20):
            print(f"  {own:6.1%} self {inclusive:6.1%} incl  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,32,256",
                        help="layer sizes in MiB, comma-separated (default 1,32,256)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="MS",
                        help="delay every request of the mount (and the sdk-via-proxy rows) "
                             "by MS milliseconds in the proxy")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("-o", dest="options", default="",
                        help="mount options, e.g. writeback_cache=true")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent pulls of the image in the last step (1: skip it)")
    parser.add_argument("--profile", metavar="DIR",
                        help="sample the daemon with py-spy during each mount step: collapsed "
                             "stacks in DIR, hot spots printed")
    parser.add_argument("--native", action="store_true",
                        help="with --profile: C frames too (py-spy --native)")
    parser.add_argument("--workdir", help="keep images, logs (mount, registry, proxy) here, "
                                          "one subdirectory per run (default: a temporary one)")
    args = parser.parse_args()
    layers_mib = [float(size) for size in args.layers.split(",") if size.strip()]
    profile = Path(args.profile) if args.profile else None
    common.PROFILE_NATIVE = args.native
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    runs = []
    for index in range(args.repeat):
        if args.workdir:
            workdir = Path(args.workdir) / f"run{index + 1}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            runs.append(run(layers_mib, args.latency, workdir, args.options, args.clients,
                            profile))
            continue
        with tempfile.TemporaryDirectory(prefix="azregfs-bench-") as tmp:
            runs.append(run(layers_mib, args.latency, Path(tmp), args.options, args.clients,
                            profile))
    report(runs, layers_mib, args.latency)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"layers_mib": layers_mib, "latency_ms": args.latency, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
