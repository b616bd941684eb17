"""The workload: chunk-key chains, which member holds which, and the prompts of each case."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from tools.bench.lookup.settings import PROMPTS_PER_CELL


def key_int(key: bytes) -> int:
    """LMCache's chunk hash for a meshkv key: the same 64 bits the ring positions by."""
    return int.from_bytes(key[:8], "big")


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt's chunk keys, with the number of leading chunks some member holds."""

    keys: tuple[bytes, ...]
    hashes: tuple[int, ...]
    expected_hits: int


@dataclass(frozen=True, slots=True)
class Holdings:
    """Which member holds which keys: member i (registration order) holds keys[i]."""

    member_keys: tuple[tuple[bytes, ...], ...]

    @property
    def members(self) -> int:
        return len(self.member_keys)


CHAIN_CHUNKS = 128
"""Chunks per generated prompt chain (the largest prompt measured); a prompt of n chunks is the
head of one chain, as an engine's prefix is."""
CHAIN_TOKENS = 16  # tokens per chunk of the generated chains (only the keys matter here)


def prompt_chains(count: int, rng: random.Random) -> list[list[bytes]]:
    """Chunk keys of ``count`` random prompts of CHAIN_CHUNKS chunks, derived as the connector
    derives them (`meshkv.keys.chunk_keys`: prefix-chained, 16 chunks a ring position)."""
    from meshkv.keys import chunk_keys, root_key

    root = root_key(bytes(16))
    return [
        chunk_keys(root, [rng.randrange(1 << 32) for _ in range(CHAIN_CHUNKS * CHAIN_TOKENS)],
                   CHAIN_TOKENS)
        for _ in range(count)
    ]  # fmt: skip


def make_holdings(members: int, keys_per_member: int, seed: int) -> Holdings:
    """Each member holds whole prompt chains (the last one cut to keys_per_member)."""
    rng = random.Random(seed)
    chains = -(-keys_per_member // CHAIN_CHUNKS)
    return Holdings(
        member_keys=tuple(
            tuple(key for chain in prompt_chains(chains, rng) for key in chain)[:keys_per_member]
            for _ in range(members)
        )
    )


def make_prompt(keys: Sequence[bytes], expected_hits: int) -> Prompt:
    return Prompt(keys=tuple(keys), hashes=tuple(map(key_int, keys)), expected_hits=expected_hits)


def lmcache_cases(holdings: Holdings, chunks: int, seed: int) -> dict[str, list[Prompt]]:
    """Prompts for the controller's three cases: held by the first or last instance, a miss.
    A prompt is the head of one of the member's chains."""
    if chunks > CHAIN_CHUNKS:
        raise ValueError(f"prompts of {chunks} chunks exceed the {CHAIN_CHUNKS}-chunk chains")
    rng = random.Random(seed * 1000 + chunks)
    out: dict[str, list[Prompt]] = {}
    for case, member in (("hit_first", 0), ("hit_last", holdings.members - 1)):
        keys = holdings.member_keys[member]
        heads = range(0, len(keys) - chunks + 1, CHAIN_CHUNKS)
        out[case] = [
            make_prompt(keys[start : start + chunks], chunks)
            for start in (rng.choice(heads) for _ in range(PROMPTS_PER_CELL))
        ]
    out["miss"] = [make_prompt(chain[:chunks], 0) for chain in prompt_chains(PROMPTS_PER_CELL, rng)]
    return out
