"""The schema of a member's gossip metadata: every key a member advertises, written and read here.

Gossip carries each member's metadata (a small ``str -> str | int`` map) in every push-pull, so
keys are short. What they hold:

- ``ns``: namespace digest in hex (``"*"``: a storage member serving every namespace);
- ``role``: ``engine``, ``storage`` or ``seed`` (the shim's members: no store, on no ring);
- ``data``: data-plane address ``host:port``; ``ch``: transfer channel (``nixl`` or ``tcp``);
- ``lk``: lookup port address ``host:port`` (lookups on plain TCP, `meshkv.dataplane.stream`);
  absent on members that do not serve one (askers then send lookups to ``data``);
- ``cap``: store budget in bytes; ``n``: chunks held in the store now (re-advertised as it
  changes); ``cs``: chunk size in tokens (the shim computes a namespace's chunk keys with it);
- ``adm``: admin/metrics HTTP port (``lmcache_worker_ports``), absent when none is served;
- ``v``: meshkv version (every member, seeds included).

Readers never trust a value's type (metadata comes off the network): each reader returns a
well-typed value or None. This module knows nothing of gossip, rings or sockets; it sits with
``keys`` and ``config`` at the bottom of the layers so that node, compat and cli all read it.
"""

from __future__ import annotations

from collections.abc import Mapping

NAMESPACE = "ns"
ROLE = "role"
DATA_ADDRESS = "data"
LOOKUP_ADDRESS = "lk"
CHANNEL = "ch"
CAPACITY_BYTES = "cap"
CHUNK_SIZE = "cs"
CHUNK_COUNT = "n"
ADMIN_PORT = "adm"
VERSION = "v"

ANY_NAMESPACE = "*"
ROLE_ENGINE = "engine"
ROLE_STORAGE = "storage"
ROLE_SEED = "seed"

Meta = Mapping[str, object]


def member_meta(
    *,
    namespace: str,
    role: str,
    data_address: str,
    channel: str,
    capacity_bytes: int,
    chunk_size: int,
    chunk_count: int,
    admin_port: int | None,
    version: str,
    lookup_address: str | None = None,
) -> dict[str, str | int]:
    """The metadata of a member with a data plane (engine or storage member)."""
    meta: dict[str, str | int] = {
        NAMESPACE: namespace,
        ROLE: role,
        DATA_ADDRESS: data_address,
        CHANNEL: channel,
        CAPACITY_BYTES: capacity_bytes,
        CHUNK_SIZE: chunk_size,
        CHUNK_COUNT: chunk_count,
        VERSION: version,
    }
    if lookup_address is not None:
        meta[LOOKUP_ADDRESS] = lookup_address
    if admin_port is not None:
        meta[ADMIN_PORT] = admin_port
    return meta


def seed_meta(*, version: str) -> dict[str, str | int]:
    """The metadata of a gossip-only seed (the shim's members): no data plane, on no ring."""
    return {ROLE: ROLE_SEED, VERSION: version}


def gossip_only_meta(*, version: str) -> dict[str, str | int]:
    """The metadata of a gossip-only member (``meshkv join`` without capacity): its version."""
    return {VERSION: version}


def with_chunk_count(meta: Meta, chunk_count: int) -> dict[str, str | int]:
    """``meta`` with its chunk count replaced (what a member re-advertises as its store fills)."""
    return {**{k: v for k, v in meta.items() if isinstance(v, str | int)}, CHUNK_COUNT: chunk_count}


def _text(meta: Meta, key: str) -> str | None:
    value = meta.get(key)
    return value if isinstance(value, str) and value else None


def _count(meta: Meta, key: str, minimum: int) -> int | None:
    value = meta.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    return None


def namespace_of(meta: Meta) -> str | None:
    return _text(meta, NAMESPACE)


def role_of(meta: Meta) -> str | None:
    return _text(meta, ROLE)


def data_address_of(meta: Meta) -> str | None:
    return _text(meta, DATA_ADDRESS)


def lookup_address_of(meta: Meta) -> str | None:
    return _text(meta, LOOKUP_ADDRESS)


def chunk_size_of(meta: Meta) -> int | None:
    return _count(meta, CHUNK_SIZE, 1)


def chunk_count_of(meta: Meta) -> int | None:
    return _count(meta, CHUNK_COUNT, 0)


def admin_port_of(meta: Meta) -> int | None:
    port = _count(meta, ADMIN_PORT, 1)
    return port if port is not None and port < 65536 else None
