"""Content known without a GET: a small blob whose name says what it holds, proven by the
Content-MD5 that Azure keeps and lists.

A registry's link files hold the digest their path names: distribution writes
`.../_layers/sha256/<hex>/link`, `.../_manifests/revisions/sha256/<hex>/link` and
`.../index/sha256/<hex>/link`, each holding `sha256:<hex>`. A garbage-collect reads every
one of them, one at a time; each read would be a serial GET.

Invariants:
- A candidate is `<a>:<b>` for two consecutive path segments `a/b`, of exactly the blob's
  size. It is served only if its MD5 equals the blob's Content-MD5 for the version opened
  (the listing or HEAD that gave the ETag gave the MD5). Otherwise the blob is read.
- Azure stores Content-MD5 for every blob written whole (Put Blob) and for those whose
  writer set it; a blob without one is read, as before. A mismatch costs an MD5 of a few
  dozen bytes, never a wrong answer: finding another content with the same MD5 and length
  as a candidate is a second preimage of MD5, which nobody knows how to make.
"""

from __future__ import annotations

import hashlib
import itertools

MAX_KNOWN = 256  # bytes: link files are 71; anything bigger is read


def known_content(name: str, size: int, md5: bytes | None) -> bytes | None:
    """What the blob `name` holds, if its name says so and its MD5 agrees; else None."""
    if md5 is None or not 0 < size <= MAX_KNOWN:
        return None
    segments = name.split("/")
    for first, second in itertools.pairwise(segments):
        if len(first) + 1 + len(second) != size:
            continue
        candidate = f"{first}:{second}".encode()
        if len(candidate) == size and hashlib.md5(candidate).digest() == md5:
            return candidate
    return None
