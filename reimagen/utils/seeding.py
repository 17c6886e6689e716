"""Per-sample seeds: every random number of a sample (its noise, its guidance draws R, a training example's
crop and noise) comes from a generator seeded by (seed, prompt or example id, sample index, stage, stream), so
resumed, sharded and re-batched runs reproduce it."""

from __future__ import annotations

import hashlib


def sample_seed(seed: int, prompt_id: str | int, sample_index: int, stage: int | str = 0, stream: str = "noise") -> int:
    """A 63-bit seed that depends only on (seed, prompt id, sample index, stage, stream). Prompt ids are
    compared as text: the ids 1 and "1" name the same prompt."""
    key = f"{seed}|{prompt_id}|{sample_index}|{stage}|{stream}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
