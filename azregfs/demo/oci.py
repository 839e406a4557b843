"""OCI image layouts and a local ``docker-registry`` process, for the registry demo, the
end-to-end tests and the registry benchmark.

Layers are tar archives of random data, streamed to disk while they are hashed, so a layer
of hundreds of MiB never sits in memory. Only the Python standard library is used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .azurite import stop_process

MiB = 1024 * 1024
CHUNK = 1 * MiB

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class _RandomReader(io.RawIOBase):
    """A file-like source of `size` pseudo-random bytes (tarfile reads the file from it)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.remaining = size
        self.rng = rng

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= n
        return self.rng.randbytes(n)


class _HashingWriter(io.RawIOBase):
    """Writes through to a file while computing the sha256 and size of what went by."""

    def __init__(self, target: io.BufferedWriter) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.target.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int

    def as_json(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Image:
    """What was written into a layout: enough to compare a pulled copy digest by digest."""

    layout: Path
    tag: str
    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor] = field(default_factory=list)

    @property
    def digests(self) -> list[str]:
        return [self.manifest.digest, self.config.digest, *(d.digest for d in self.layers)]

    @property
    def total_size(self) -> int:
        return self.manifest.size + self.config.size + sum(d.size for d in self.layers)


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest


def _store_bytes(layout: Path, data: bytes, media_type: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Descriptor(media_type, digest, len(data))


def _write_layer(layout: Path, size: int, rng: random.Random, compress: bool,
                 name: str) -> tuple[Descriptor, str]:
    """One tar holding one file of `size` random bytes; returns (descriptor, diff_id)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    with os.fdopen(fd, "wb") as raw:
        stored = _HashingWriter(raw)
        # The diff_id is the digest of the uncompressed tar: hash it on its way into gzip.
        uncompressed = _HashingWriter(
            gzip.GzipFile(fileobj=stored, mode="wb", compresslevel=1, mtime=0)  # type: ignore
            if compress else stored)  # type: ignore[arg-type]
        with tarfile.open(fileobj=uncompressed, mode="w|", bufsize=CHUNK) as tar:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, _RandomReader(size, rng))
        if compress:
            uncompressed.target.close()
    digest = "sha256:" + stored.sha.hexdigest()
    os.replace(temp, _blob_path(layout, digest))
    media_type = MEDIA_LAYER_GZIP if compress else MEDIA_LAYER_TAR
    return Descriptor(media_type, digest, stored.size), "sha256:" + uncompressed.sha.hexdigest()


def build_image(layout: str | os.PathLike, layer_sizes: Sequence[int], tag: str = "latest",
                seed: int | None = None, compress_below: int = 0) -> Image:
    """Write an OCI image layout with one layer per size (random data); layers smaller than
    `compress_below` bytes are gzipped, the others are plain tar (gzip of random data only
    costs CPU). A layout that already exists gets this image added under `tag`."""
    root = Path(layout)
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    rng = random.Random(seed)
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    for index, size in enumerate(layer_sizes):
        descriptor, diff_id = _write_layer(root, size, rng, size < compress_below,
                                           f"layer{index}.bin")
        layers.append(descriptor)
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/layer0.bin"], "Labels": {"nonce": f"{rng.getrandbits(64):x}"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"azregfs test layer {i}"} for i in range(len(layers))],
    }
    config_descriptor = _store_bytes(root, json.dumps(config).encode(), MEDIA_CONFIG)
    manifest = {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": config_descriptor.as_json(),
        "layers": [layer.as_json() for layer in layers],
    }
    manifest_descriptor = _store_bytes(root, json.dumps(manifest).encode(), MEDIA_MANIFEST)
    index_path = root / "index.json"
    index = (json.loads(index_path.read_text()) if index_path.exists()
             else {"schemaVersion": 2, "manifests": []})
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                          != tag]
    index["manifests"].append({**manifest_descriptor.as_json(),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return Image(root, tag, manifest_descriptor, config_descriptor, layers)


def read_image(layout: str | os.PathLike, tag: str = "latest") -> Image:
    """The image tagged `tag` in a layout (e.g. one skopeo pulled), with its descriptors."""
    root = Path(layout)
    index = json.loads((root / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise KeyError(f"no tag {tag!r} in {root}/index.json")
    manifest_descriptor = Descriptor(entry["mediaType"], entry["digest"], entry["size"])
    manifest = json.loads(_blob_path(root, entry["digest"]).read_bytes())
    config = manifest["config"]
    return Image(root, tag, manifest_descriptor,
                 Descriptor(config["mediaType"], config["digest"], config["size"]),
                 [Descriptor(d["mediaType"], d["digest"], d["size"]) for d in manifest["layers"]])


def verify_layout(image: Image) -> list[str]:
    """Digests in the layout whose file does not hash to its name (empty when all is well)."""
    bad = []
    for descriptor in (image.manifest, image.config, *image.layers):
        sha = hashlib.sha256()
        with open(_blob_path(image.layout, descriptor.digest), "rb") as handle:
            while chunk := handle.read(CHUNK):
                sha.update(chunk)
        if "sha256:" + sha.hexdigest() != descriptor.digest:
            bad.append(descriptor.digest)
    return bad


# -- docker-registry -----------------------------------------------------------------------

REGISTRY_BINARY = "docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_config(rootdirectory: str | os.PathLike, port: int) -> str:
    """A config.yml for Distribution 2.8: filesystem driver, deletes on, no auth, no cache
    (so two registries on two mounts of one container never serve each other stale data)."""
    return (
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {os.fspath(rootdirectory)}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )


@dataclass
class Registry:
    """One ``docker-registry serve`` on loopback, storing into `rootdirectory`."""

    rootdirectory: Path
    workdir: Path
    port: int = 0
    detached: bool = False  # own session: keeps running after the caller and its terminal
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / f"registry-{self.port}.yml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"registry-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout: float = 30.0) -> Registry:
        binary = shutil.which(REGISTRY_BINARY)
        if binary is None:
            raise FileNotFoundError("docker-registry is not installed (apt install "
                                    "docker-registry; scripts/install does)")
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(registry_config(self.rootdirectory, self.port))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, "serve", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            start_new_session=self.detached)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"docker-registry not answering: {self.log()[-2000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def catalog(self) -> list[str]:
        return self.get_json("/v2/_catalog")["repositories"]

    def tags(self, repository: str) -> list[str]:
        return self.get_json(f"/v2/{repository}/tags/list")["tags"] or []

    def garbage_collect(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([REGISTRY_BINARY, "garbage-collect", *args, str(self.config_path)],
                              capture_output=True, text=True, timeout=600)

    def stop(self) -> None:
        stop_process(self.process, grace=15)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skopeo_copy(source: str, destination: str, timeout: float = 900,
                check: bool = True) -> subprocess.CompletedProcess:
    """`skopeo copy` between `oci:DIR:TAG` and `docker://HOST:PORT/REPO:TAG` over plain HTTP,
    keeping digests (a conversion would make the comparison meaningless)."""
    command = ["skopeo", "--insecure-policy", "copy", "--preserve-digests", "--quiet",
               "--src-tls-verify=false", "--dest-tls-verify=false", source, destination]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result
