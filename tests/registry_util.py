"""Helpers for the registry end-to-end tests: the registry's HTTP API by hand, checks of the
container's layout and content with the SDK, and a container written as Distribution 2.8's
azure driver writes it. Image layouts and the registry process come from azregfs.demo.oci.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import time
import urllib.parse
from pathlib import Path

from azure.storage.blob import ContainerClient

from azregfs.demo.oci import Image, Registry

REGISTRY_PREFIX = "docker/registry/v2/"
BLOB_DATA = re.compile(r"(?:^|/)blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})/data$")
APPEND_BLOCK = 4 * 1024 * 1024  # what the 2.8 azure driver appends per request


def request(registry: Registry, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _location_path(location: str) -> str:
    parsed = urllib.parse.urlsplit(location)
    return parsed.path + ("?" + parsed.query if parsed.query else "")


def chunked_upload(registry: Registry, repository: str, data: bytes, chunk_size: int) -> str:
    """Upload `data` as a blob through POST, several PATCH (each resumes the upload, so the
    registry reopens its upload file and appends) and a final PUT ?digest=."""
    status, headers, body = request(registry, "POST", f"/v2/{repository}/blobs/uploads/")
    assert status == 202, (status, body)
    location = _location_path(headers["Location"])
    for start in range(0, len(data), chunk_size):
        chunk = data[start:start + chunk_size]
        status, headers, body = request(registry, "PATCH", location, chunk, {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(chunk) - 1}",
            "Content-Length": str(len(chunk)),
        })
        assert status == 202, (status, body)
        assert headers["Range"] == f"0-{start + len(chunk) - 1}", headers
        location = _location_path(headers["Location"])
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    separator = "&" if "?" in location else "?"
    status, headers, body = request(registry, "PUT", location + separator + "digest="
                                    + urllib.parse.quote(digest), b"",
                                    {"Content-Length": "0"})
    assert status == 201, (status, body)
    return digest


def get_blob(registry: Registry, repository: str, digest: str) -> bytes:
    status, _, body = request(registry, "GET", f"/v2/{repository}/blobs/{digest}")
    assert status == 200, (status, body[:300])
    return body


def manifest_digest(registry: Registry, repository: str, tag: str) -> str:
    status, headers, body = request(registry, "HEAD", f"/v2/{repository}/manifests/{tag}", None,
                                    {"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200, (status, body)
    return headers["Docker-Content-Digest"]


def delete_manifest(registry: Registry, repository: str, digest: str) -> None:
    status, _, body = request(registry, "DELETE", f"/v2/{repository}/manifests/{digest}")
    assert status == 202, (status, body)


# -- the container, seen through the SDK ---------------------------------------------------

def prefix_dirs(names: list[str]) -> list[str]:
    """Names that are also a directory of another name: a marker blob left beside children."""
    dirs = set()
    for name in names:
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(dirs.intersection(names))


def torn_blobs(container: ContainerClient, prefix: str = REGISTRY_PREFIX) -> list[str]:
    """Every committed blobs/sha256/xx/<digest>/data that does not hash to its digest."""
    bad = []
    for blob in container.list_blobs(name_starts_with=prefix + "blobs/"):
        match = BLOB_DATA.search(blob.name)
        if not match:
            continue
        sha = hashlib.sha256()
        for chunk in container.download_blob(blob.name).chunks():
            sha.update(chunk)
        if sha.hexdigest() != match.group(2):
            bad.append(f"{blob.name} ({blob.size} bytes)")
    return bad


def blob_data_names(container: ContainerClient, prefix: str = REGISTRY_PREFIX) -> set[str]:
    return {match.group(2) for blob in container.list_blobs(name_starts_with=prefix)
            if (match := BLOB_DATA.search(blob.name))}


def write_like_azure_driver_28(tree: Path, container: ContainerClient, image: Image) -> None:
    """Copy a registry's filesystem tree into `container` the way Distribution 2.8's azure
    driver lays it out: names beginning with '/', layer and config data as append blobs
    written in 4 MiB blocks, everything else (manifests, links) as one Put Blob."""
    appended = {d.digest.split(":", 1)[1] for d in (image.config, *image.layers)}
    for directory, _, files in os.walk(tree):
        for filename in files:
            path = Path(directory) / filename
            name = "/" + path.relative_to(tree).as_posix()
            match = BLOB_DATA.search(name)
            if match and match.group(2) in appended:
                blob = container.get_blob_client(name)
                blob.create_append_blob()
                with open(path, "rb") as handle:
                    while chunk := handle.read(APPEND_BLOCK):
                        blob.append_block(chunk)
            else:
                container.upload_blob(name, path.read_bytes())


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(interval)


def upload_files(root: Path) -> list[tuple[Path, int]]:
    """(path, size) of every upload in progress under a registry root."""
    found = []
    repositories = root / "docker" / "registry" / "v2" / "repositories"
    for data in repositories.glob("**/_uploads/*/data"):
        with contextlib.suppress(OSError):
            found.append((data, data.stat().st_size))
    return found


def catalog_and_tags(registry: Registry) -> dict[str, list[str]]:
    return {repository: sorted(registry.tags(repository)) for repository in registry.catalog()}


def pretty(value: object) -> str:
    return json.dumps(value, indent=1, default=str)
