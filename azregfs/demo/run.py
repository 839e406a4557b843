"""``azregfs demo``: the embedded default, so a newcomer sees the whole thing work.

With an Azure account configured (AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT
and AZURE_STORAGE_KEY) it mounts container ``azregfs-demo`` of that account. Otherwise it
starts a local Azurite (data kept in ./.demo/azurite), creates the demo container with a few
files laid out as a registry would, and mounts it. The mount and Azurite keep running after
the command returns; ``azregfs demo --stop`` ends both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from .azurite import Azurite

CONTAINER = "azregfs-demo"
STATE = Path(".demo")
SAMPLE = {
    "docker/registry/v2/repositories/hello/_manifests/tags/latest/current/link":
        b"sha256:" + b"0" * 64,
    "docker/registry/v2/blobs/sha256/00/" + "0" * 64 + "/data": b'{"schemaVersion": 2}\n',
    "README.txt": b"This container is mounted by azregfs. Try: ls -R, du -sh, cat, cp.\n",
}


def _start_azurite() -> str:
    pid_file = STATE / "azurite.pid"
    port_file = STATE / "azurite.port"
    if pid_file.exists() and port_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            return Azurite(port=int(port_file.read_text())).connection_string
        except (ProcessLookupError, ValueError):
            pass
    server = Azurite(persist_dir=str(STATE / "azurite")).start()
    assert server.process is not None
    pid_file.write_text(str(server.process.pid))
    port_file.write_text(str(server.port))
    print(f"started Azurite on 127.0.0.1:{server.port} (data in {STATE}/azurite)")
    return server.connection_string


def _seed(connection_string: str) -> None:
    service = BlobServiceClient.from_connection_string(connection_string)
    container = service.get_container_client(CONTAINER)
    if not container.exists():
        container.create_container()
        for name, data in SAMPLE.items():
            container.upload_blob(name, data)
        print(f"created container {CONTAINER} with {len(SAMPLE)} blobs")


def stop(mountpoint: str) -> int:
    from .registry import stop_registry

    stop_registry()  # first: a running registry keeps the mount busy
    if os.path.ismount(mountpoint):
        subprocess.run([sys.executable, "-m", "azregfs", "unmount", mountpoint], check=False)
    pid_file = STATE / "azurite.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    print("demo stopped")
    return 0


def run_demo(mountpoint: str, with_registry: bool = False, stop_demo: bool = False) -> int:
    STATE.mkdir(exist_ok=True)
    if stop_demo:
        return stop(mountpoint)
    env = dict(os.environ)
    configured = env.get("AZURE_STORAGE_CONNECTION_STRING") or (
        env.get("AZURE_STORAGE_ACCOUNT") and env.get("AZURE_STORAGE_KEY"))
    if not configured:
        print("no Azure account configured: using a local Azurite")
        env["AZURE_STORAGE_CONNECTION_STRING"] = _start_azurite()
        _seed(env["AZURE_STORAGE_CONNECTION_STRING"])
    os.makedirs(mountpoint, exist_ok=True)
    if not os.path.ismount(mountpoint):
        command = [sys.executable, "-m", "azregfs", "mount", "--create-container",
                   "--log-file", str((STATE / "azregfs.log").resolve()), CONTAINER, mountpoint]
        if subprocess.run(command, env=env, check=False).returncode != 0:
            return 1
    print(f"\nmounted container {CONTAINER} at {mountpoint}. Try:\n"
          f"  ls -R {mountpoint} | head;  du -sh {mountpoint};  cat {mountpoint}/README.txt\n"
          f"unmount with:   .venv/bin/azregfs unmount {mountpoint}   (or fusermount3 -u)\n"
          f"stop it all:    .venv/bin/azregfs demo --stop\n"
          f"daemon log:     {STATE}/azregfs.log")
    if with_registry:
        from .registry import run_registry_demo

        return run_registry_demo(mountpoint)
    return 0
