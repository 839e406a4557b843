"""``azregfs demo --registry``: Debian's docker-registry serving from the demo mount.

Starts the registry (filesystem driver, rootdirectory = the mount, loopback only, no auth),
builds a small sample OCI image, pushes it with skopeo, and shows what landed where. The
registry keeps running after the command returns; ``azregfs demo --stop`` stops it before
it unmounts.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from .oci import MiB, Registry, build_image, skopeo_copy

STATE = Path(".demo")
REPOSITORY = "sample/hello"
TAG = "v1"


def _pid_file() -> Path:
    return STATE / "registry.pid"


def _running_port() -> int:
    """The port of a demo registry still running from an earlier call, else 0."""
    try:
        pid = int(_pid_file().read_text())
        os.kill(pid, 0)
        return int((STATE / "registry.port").read_text())
    except (OSError, ValueError):
        return 0


def stop_registry() -> None:
    """Stop the demo registry (before the unmount, which it would keep busy)."""
    pid_file = _pid_file()
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
    except (ProcessLookupError, ValueError):
        pass
    pid_file.unlink()
    print("registry stopped")


def run_registry_demo(mountpoint: str) -> int:
    missing = [tool for tool in ("docker-registry", "skopeo") if shutil.which(tool) is None]
    if missing:
        print(f"\n{' and '.join(missing)} not installed: apt install docker-registry skopeo "
              "(scripts/install does)")
        return 1
    root = Path(mountpoint).resolve()
    STATE.mkdir(exist_ok=True)
    port = _running_port()
    if port:
        registry = Registry(root, STATE.resolve(), port=port)
        print(f"\nregistry already running on {registry.address}")
    else:
        registry = Registry(root, STATE.resolve(), detached=True)
        try:
            registry.start()
        except (RuntimeError, TimeoutError) as exc:
            print(f"\ndocker-registry did not start: {exc}")
            return 1
        assert registry.process is not None
        _pid_file().write_text(str(registry.process.pid))
        (STATE / "registry.port").write_text(str(registry.port))
        print(f"\nstarted docker-registry on {registry.address}, storing into {root} "
              f"(config {registry.config_path}, log {registry.log_path})")

    layout = STATE / "sample-image"
    shutil.rmtree(layout, ignore_errors=True)
    image = build_image(layout, [256 * 1024, 2 * MiB], tag=TAG, compress_below=1 * MiB)
    reference = f"{registry.address}/{REPOSITORY}:{TAG}"
    print(f"pushing a sample image ({image.total_size / MiB:.1f} MiB, {len(image.layers)} "
          f"layers) with skopeo to {reference} ...")
    started = time.monotonic()
    try:
        skopeo_copy(f"oci:{layout}:{TAG}", f"docker://{reference}")
    except RuntimeError as exc:
        print(f"push failed: {exc}\nregistry log: {registry.log_path}")
        return 1
    print(f"pushed in {time.monotonic() - started:.1f}s; manifest {image.manifest.digest}")
    print(f"catalog: {registry.catalog()}")
    print(f"tags of {REPOSITORY}: {registry.tags(REPOSITORY)}")
    print(f"\nthe registry's files, as blobs in the container:\n"
          f"  ls -R {mountpoint}/docker/registry/v2/repositories/{REPOSITORY}\n"
          f"pull it back:\n"
          f"  skopeo copy --src-tls-verify=false docker://{reference} oci:/tmp/hello:{TAG}\n"
          f"  curl http://{registry.address}/v2/_catalog\n"
          f"stop registry, mount and Azurite:  .venv/bin/azregfs demo --stop")
    return 0
