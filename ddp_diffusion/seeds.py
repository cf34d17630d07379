"""Seeds of independent random streams: every random draw of the package (a step's data order,
noise and dropout, a sample chunk, the classifier's training) is seeded from the run's seed and
the draw's place, never from a generator's history, so it can be reproduced anywhere."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, stream name, step, ...): streams never overlap or correlate."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
