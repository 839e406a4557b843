"""Start and stop a local Azurite blob server on loopback.

Used by the demo (the embedded default when no Azure account is configured), the test
suite and the benchmark. Azurite is the npm package ``azurite``; its blob service binary is
``azurite-blob``. The well-known development account is public knowledge, not a secret.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def stop_process(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary() -> str:
    found = shutil.which("azurite-blob")
    if found:
        return found
    for candidate in ("node_modules/.bin/azurite-blob", "/usr/local/bin/azurite-blob"):
        if os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        "azurite-blob not found: install it with 'npm install -g azurite' (scripts/install does)"
    )


@dataclass
class Azurite:
    """One running azurite-blob process with its port and connection string."""

    port: int = 0
    persist_dir: str | None = None  # None: in-memory store
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{DEV_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self, timeout: float = 30.0) -> Azurite:
        if not self.port:
            self.port = free_port()
        args = [
            find_binary(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        if self.persist_dir:
            os.makedirs(self.persist_dir, exist_ok=True)
            args += ["--location", self.persist_dir]
        else:
            args += ["--inMemoryPersistence"]
        log_dir = self.persist_dir or tempfile.gettempdir()
        self.log_path = os.path.join(log_dir, f"azurite-{self.port}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"azurite-blob exited early; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"azurite-blob did not listen on port {self.port} in {timeout:.0f}s")

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
