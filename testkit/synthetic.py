"""A synthetic registry written straight into a container with the SDK, in parallel: what a
registry's storage holds after many pushes, without pushing (for garbage-collect, catalog
and walk benchmarks and their request-budget tests).

The layout is distribution's (`docker/registry/v2/` under the container's root): blob data
under `blobs/sha256/<2 hex>/<hex>/data`; per repository, `_layers` links for every blob a
manifest references, `_manifests/revisions` links, and `_manifests/tags/<tag>/current` and
`index` links. Digests are real sha256 of the stored bytes, manifests are Docker schema 2
JSON, so `registry garbage-collect` reads and marks them as it would real ones.

Each manifest has a config of its own and `layers` layers, half of them drawn from a pool
shared by every repository; `orphans` (a fraction of the referenced blobs) are blobs no
manifest references, which a garbage-collect would delete.
"""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from azure.storage.blob import ContainerClient

ROOT = "docker/registry/v2/"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass
class SyntheticRegistry:
    repositories: list[str] = field(default_factory=list)
    tags: dict[str, list[str]] = field(default_factory=dict)  # repository -> tags
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> content
    orphans: set[str] = field(default_factory=set)  # digests no manifest references
    objects: dict[str, bytes] = field(default_factory=dict)  # blob name -> content

    @property
    def manifests(self) -> int:
        return sum(len(tags) for tags in self.tags.values())


def _blob(rng: random.Random, size: int) -> tuple[str, bytes]:
    data = rng.randbytes(size)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _link(digest: str) -> bytes:
    return digest.encode()


def build(repos: int, tags: int = 5, layers: int = 4, orphans: float = 0.1,
          seed: int = 0, prefix: str = ROOT) -> SyntheticRegistry:
    """The objects of a registry of `repos` repositories with `tags` tags each."""
    rng = random.Random(seed)
    registry = SyntheticRegistry()
    shared = [_blob(rng, rng.randint(200, 600)) for _ in range(max(4, repos))]

    def put_blob(digest: str, data: bytes) -> None:
        registry.blobs[digest] = data
        registry.objects[f"{prefix}blobs/sha256/{digest[7:9]}/{digest[7:]}/data"] = data

    for number in range(repos):
        repository = f"project{number // 10}/app{number}"
        registry.repositories.append(repository)
        registry.tags[repository] = []
        base = f"{prefix}repositories/{repository}/"
        for tag_number in range(tags):
            tag = f"v{tag_number}"
            config = _blob(rng, rng.randint(300, 900))
            own = [_blob(rng, rng.randint(200, 600)) for _ in range(layers - layers // 2)]
            chosen = own + rng.sample(shared, layers // 2)
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "size": len(config[1]),
                           "digest": config[0]},
                "layers": [{"mediaType": LAYER_TYPE, "size": len(data), "digest": digest}
                           for digest, data in chosen],
            }, indent=3).encode()
            manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            for digest, data in [config, *chosen, (manifest_digest, manifest)]:
                put_blob(digest, data)
            for digest, _ in [config, *chosen]:
                registry.objects[f"{base}_layers/sha256/{digest[7:]}/link"] = _link(digest)
            hexdigest = manifest_digest[7:]
            registry.objects[f"{base}_manifests/revisions/sha256/{hexdigest}/link"] = \
                _link(manifest_digest)
            registry.objects[f"{base}_manifests/tags/{tag}/current/link"] = \
                _link(manifest_digest)
            registry.objects[f"{base}_manifests/tags/{tag}/index/sha256/{hexdigest}/link"] = \
                _link(manifest_digest)
            registry.tags[repository].append(tag)
    for _ in range(round(len(registry.blobs) * orphans)):
        digest, data = _blob(rng, rng.randint(200, 600))
        put_blob(digest, data)
        registry.orphans.add(digest)
    return registry


def upload(container: ContainerClient, registry: SyntheticRegistry, workers: int = 32) -> None:
    """Write every object, `workers` at a time."""
    def put(item: tuple[str, bytes]) -> None:
        container.upload_blob(item[0], item[1], overwrite=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, registry.objects.items()))
