"""Stable hashes: the `prompt_id` of a prompt text and the tie-break keys of the selection rules.

Both use BLAKE2b from the standard library, so they are the same on every machine, Python
version and process (unlike `hash()`), and never depend on row order or batching.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

PROMPT_ID_BYTES = 8
"""prompt_id = 16 hex digits; 64 bits keep collisions negligible for pools of millions of prompts."""


def prompt_id_of(prompt: str) -> str:
    """The stable id of a prompt text: BLAKE2b-64 of its exact UTF-8 bytes, as 16 hex digits.
    The text is not normalised, so two prompts differing in one space get different ids."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=PROMPT_ID_BYTES).hexdigest()


def tie_break_key(seed: int, item_id: object) -> int:
    """A 64-bit key from (seed, id): BLAKE2b-64 of str(id) keyed with the decimal digits of seed.
    Selection rules take the smallest key among tied candidates, so a tie resolves the same way
    whatever the row order, and a different seed resolves it differently."""
    return int.from_bytes(
        hashlib.blake2b(str(item_id).encode("utf-8"), digest_size=8, key=_seed_key(seed)).digest(), "big"
    )


def tie_break_keys(seed: int, item_ids: Iterable[object]) -> np.ndarray:
    """`tie_break_key(seed, id)` for every id, as a uint64 array in input order."""
    key = _seed_key(seed)
    blake2b = hashlib.blake2b
    return np.fromiter(
        (int.from_bytes(blake2b(str(i).encode("utf-8"), digest_size=8, key=key).digest(), "big") for i in item_ids),
        dtype=np.uint64,
    )


def _seed_key(seed: int) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    return str(int(seed)).encode("ascii")
