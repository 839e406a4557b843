"""Registry push/pull wall times: docker-registry on an azregfs mount next to docker-registry
on a local directory, and the SDK's own upload/download of the biggest layer as Azurite's
ceiling, all in one run against one Azurite.

    .venv/bin/python bench/registry.py [--big-mib 200] [--repeat 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from azregfs.azurite import Azurite
from azregfs.oci import Image, MiB, Registry, build_image, read_image, skopeo_copy


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


class Mount:
    def __init__(self, azurite: Azurite, container: str, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
        self.log = open(path.parent / f"{path.name}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "azregfs", "mount", "--foreground", container, str(path)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount failed, see {self.log.name}")
            time.sleep(0.05)

    def stats(self) -> dict:
        return json.loads(os.getxattr(self.path, "user.azregfs.stats"))

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], check=False)
        self.process.wait(timeout=600)
        self.log.close()


def push_pull(image: Image, registry: Registry, workdir: Path, label: str,
              results: dict[str, float], remount: Callable[[], Registry] | None = None) -> None:
    reference = f"docker://{registry.address}/bench/{label}:{image.tag}"
    results[f"{label} push"] = timed(
        lambda: skopeo_copy(f"oci:{image.layout}:{image.tag}", reference))
    if remount is not None:  # a cold pull: nothing of the image in the daemon's cache
        registry = remount()
        reference = f"docker://{registry.address}/bench/{label}:{image.tag}"
    pulled = workdir / f"pulled-{label}"
    shutil.rmtree(pulled, ignore_errors=True)
    results[f"{label} pull"] = timed(lambda: skopeo_copy(reference, f"oci:{pulled}:{image.tag}"))
    assert read_image(pulled, image.tag).digests == image.digests


def run(big_mib: int, workdir: Path) -> dict[str, float]:
    results: dict[str, float] = {}
    image = build_image(workdir / "image", [big_mib * MiB, 3 * MiB, 64 * 1024, 1 * MiB],
                        tag="v1", seed=7, compress_below=4 * MiB)
    big_layer = image.layout / "blobs" / "sha256" / image.layers[0].digest[7:]
    with Azurite() as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        sdk = service.create_container("bench-sdk")
        with open(big_layer, "rb") as handle:
            results["sdk upload (big layer)"] = timed(
                lambda: sdk.upload_blob("layer", handle, max_concurrency=4))
        results["sdk download (big layer)"] = timed(
            lambda: sdk.download_blob("layer", max_concurrency=4).readall())

        local = Registry(workdir / "local-store", workdir / "registry-local").start()
        try:
            push_pull(image, local, workdir, "local", results)
        finally:
            local.stop()

        service.create_container("bench-mount")
        state: dict[str, object] = {"mount": Mount(azurite, "bench-mount", workdir / "mnt")}
        state["registry"] = Registry(workdir / "mnt", workdir / "registry-mount").start()

        def remount() -> Registry:
            state["registry"].stop()  # type: ignore[union-attr]
            state["mount"].unmount()  # type: ignore[union-attr]
            state["mount"] = Mount(azurite, "bench-mount", workdir / "mnt")
            state["registry"] = Registry(workdir / "mnt", workdir / "registry-mount").start()
            return state["registry"]  # type: ignore[return-value]

        try:
            push_pull(image, state["registry"], workdir, "mount", results,  # type: ignore
                      remount=remount)
            stats = state["mount"].stats()["driver"]  # type: ignore[union-attr]
            results["mount pull: MiB from Azure"] = stats["bytes_down"] / MiB
        finally:
            state["registry"].stop()  # type: ignore[union-attr]
            state["mount"].unmount()  # type: ignore[union-attr]
    results["image MiB"] = image.total_size / MiB
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="azregfs-bench-") as tmp:
            runs.append(run(args.big_mib, Path(tmp)))
    for key in runs[0]:
        values = " ".join(f"{r[key]:8.2f}" for r in runs)
        unit = "" if "MiB" in key else " s"
        print(f"{key:32s} {values}{unit}")
    for side in ("push", "pull"):
        ratio = [r[f"mount {side}"] / r[f"local {side}"] for r in runs]
        print(f"{'mount/local ' + side:32s} " + " ".join(f"{x:8.2f}" for x in ratio))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
