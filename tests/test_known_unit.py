"""Content known from a blob's name and its Content-MD5 (azregfs/read/known.py)."""

from __future__ import annotations

import hashlib

from azregfs.read.known import known_content

HEX = "a3" * 32
LINK = f"docker/registry/v2/repositories/r/_layers/sha256/{HEX}/link"


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def test_a_link_holding_the_digest_its_path_names_is_known() -> None:
    content = f"sha256:{HEX}".encode()
    assert known_content(LINK, len(content), md5(content)) == content


def test_anything_else_is_read() -> None:
    content = f"sha256:{HEX}".encode()
    other = f"sha256:{'b4' * 32}".encode()
    assert known_content(LINK, len(other), md5(other)) is None  # holds another digest
    assert known_content(LINK, len(content), None) is None  # no MD5 kept: read it
    assert known_content(LINK, len(content) + 1, md5(content)) is None  # size disagrees
    tag = "docker/registry/v2/repositories/r/_manifests/tags/latest/current/link"
    assert known_content(tag, len(content), md5(content)) is None  # names no digest
    assert known_content(LINK, 0, md5(b"")) is None
