"""Seeds derived from several integers (a step, a rank, a worker, an epoch ...), stable across processes
and Python versions (no ``hash()`` randomisation)."""

from __future__ import annotations

import hashlib

__all__ = ["mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from the integers ``parts``; different tuples give unrelated seeds."""
    digest = hashlib.blake2b("-".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
