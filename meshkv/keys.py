"""Chunk keys: who may share KV (the namespace) and the prefix-hash chain that names each chunk.

Two engines may exchange a chunk only if everything that shapes its bytes is identical: the
model, the KV dtype and layout, the block geometry, the chunk size and the tensor-parallel rank.
`Namespace` holds exactly those facts; its digest seeds the hash chain, so engines that differ in
any of them compute disjoint keys and can never load each other's KV.

    h_0 = H(namespace digest ‖ cache_salt)
    h_i = H(h_{i-1} ‖ token ids of chunk i as little-endian uint32)
    key_i = h_a[:8] ‖ h_i[8:]      where a = G·⌊i/G⌋, G = HOME_GROUP_CHUNKS

H is BLAKE2b with a 16-byte digest: deterministic in every process and on every machine (no
PYTHONHASHSEED). A chunk's ring position is the first 8 bytes of its key, big-endian, so the G
consecutive chunks of a group share one position, and one home: a prompt of n chunks has at
most ⌈n/G⌉ homes, and asking "who holds this prompt" is that many requests, not n. The key still
names its whole prefix: the last 8 bytes come from h_i, the first 8 from the group's first chunk.
Two different chunks share a key only if both halves collide (a 64-bit match between chunks of
one group, about n·G/2^65 for n chunks in all); a tenant cannot aim at another tenant's key,
whose chain starts from another salt, with less than a 2^64 search.

This module knows nothing of rings, peers or vLLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from meshkv.errors import UsageError

KEY_BYTES = 16
HOME_GROUP_CHUNKS = 16
"""G: consecutive chunks that share a ring position (16 chunks of 256 tokens: 4,096 tokens a
home). Part of the key scheme, so every member must agree: changing it renames every chunk."""
POSITION_BYTES = 8
"""The leading bytes of a key that give its ring position (shared within a home group)."""
_PERSON_ROOT = b"meshkv-root"
_PERSON_CHUNK = b"meshkv-chunk"


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    """Everything that must match for two engines to share a chunk.

    ``model_id`` is the served model's identity (its name plus a digest of its config, or the
    user's ``mesh_model_id``); never guess it: two models under one namespace means wrong outputs.
    ``kv_layout`` names the engine's cache layout (e.g. "cpu-nhd"), ``block_geometry`` the shape
    of one block per layer (e.g. (kv_heads, block_size, 2*head_dim)).
    """

    model_id: str
    kv_dtype: str
    kv_layout: str
    block_geometry: tuple[int, ...]
    num_layers: int
    chunk_size: int
    tp_world_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        if not self.model_id:
            raise UsageError("Namespace.model_id must not be empty")
        if self.chunk_size <= 0 or self.num_layers <= 0:
            raise UsageError("Namespace.chunk_size and num_layers must be positive")
        if not 0 <= self.tp_rank < self.tp_world_size:
            raise UsageError(f"tp_rank {self.tp_rank} outside world size {self.tp_world_size}")

    def digest(self) -> bytes:
        """A 16-byte digest of every field, in a fixed order and encoding."""
        canonical = msgpack.packb(
            [
                1,  # namespace encoding version
                self.model_id,
                self.kv_dtype,
                self.kv_layout,
                list(self.block_geometry),
                self.num_layers,
                self.chunk_size,
                self.tp_world_size,
                self.tp_rank,
            ],
            use_bin_type=True,
        )
        return hashlib.blake2b(canonical, digest_size=KEY_BYTES, person=_PERSON_ROOT).digest()

    def label(self) -> str:
        """A short printable id of this namespace (for member metadata and logs)."""
        return self.digest()[:6].hex()


def root_key(namespace_digest: bytes, cache_salt: str | None = None) -> bytes:
    """h_0: the chain's seed for one namespace and one tenant (``cache_salt``)."""
    salt = (cache_salt or "").encode()
    material = namespace_digest + len(salt).to_bytes(4, "little") + salt
    return hashlib.blake2b(material, digest_size=KEY_BYTES, person=_PERSON_ROOT).digest()


def chunk_keys(root: bytes, token_ids: Sequence[int] | np.ndarray, chunk_size: int) -> list[bytes]:
    """Keys of every *full* chunk of ``token_ids``, in order; a trailing partial chunk has none."""
    if chunk_size <= 0:
        raise UsageError(f"chunk_size must be positive, got {chunk_size}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFFFFFF):
        raise UsageError("token ids must fit in uint32")
    data = tokens.astype("<u4").tobytes()
    step = chunk_size * 4
    keys: list[bytes] = []
    previous, route = root, b""
    for index, start in enumerate(range(0, (len(tokens) // chunk_size) * step, step)):
        h = hashlib.blake2b(previous, digest_size=KEY_BYTES, person=_PERSON_CHUNK)
        h.update(data[start : start + step])
        previous = h.digest()
        if index % HOME_GROUP_CHUNKS == 0:
            route = previous[:POSITION_BYTES]
        keys.append(route + previous[POSITION_BYTES:])
    return keys


def ring_position(key: bytes) -> int:
    """The key's position on the ring: its first 8 bytes as a big-endian uint64."""
    return int.from_bytes(key[:POSITION_BYTES], "big")
