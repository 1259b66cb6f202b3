"""File digests (standard library only): checked downloads (md5, as GroupLens publishes them) and the sha256 of
each file of a serving bundle."""

from __future__ import annotations

import hashlib


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of the file at ``path``, read 1 MiB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
