"""`build_member(config, role)`: the one way a process becomes a mesh member.

Every kind of member is built here from the same config, so profile, authentication, ports
and naming are decided once:

- ``engine``: a vLLM worker rank's `MeshNode` (its namespace, rank and TP world size);
- ``storage``: a `meshkv join --capacity` `MeshNode`, serving chunks of every namespace;
- ``gossip``: a gossip-only `meshkv join` (a seed with no data plane and no role advertised);
- ``seed``: one of the shim's seed members (a `GossipRunner` advertising role ``seed``, on the
  ring of no namespace).

The first two have a data plane and return a `MeshNode`; the last two return the bare
`GossipRunner`. Nothing is started: the caller calls ``start``.

This module knows the member's parts and the config; not vLLM, the CLI or the shim's API.
"""

from __future__ import annotations

from typing import Literal, overload

from meshkv import __version__
from meshkv.config import MeshConfig
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.errors import UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.runner import GossipRunner
from meshkv.member_meta import (
    ANY_NAMESPACE,
    ROLE_ENGINE,
    ROLE_SEED,
    ROLE_STORAGE,
    gossip_only_meta,
    seed_meta,
)
from meshkv.node.mesh_node import MeshNode
from meshkv.wire import AuthPolicy

ROLE_GOSSIP = "gossip"
"""A gossip-only member (`meshkv join` without ``--capacity``); it advertises no role."""
ROLES = (ROLE_ENGINE, ROLE_STORAGE, ROLE_GOSSIP, ROLE_SEED)


@overload
def build_member(
    config: MeshConfig,
    role: Literal["engine", "storage"],
    *,
    namespace: str = ...,
    rank: int = ...,
    world_size: int = ...,
    name: str | None = ...,
    host: str | None = ...,
    port: int | None = ...,
    dataplane: DataPlaneConfig | None = ...,
) -> MeshNode: ...


@overload
def build_member(
    config: MeshConfig,
    role: Literal["gossip", "seed"],
    *,
    namespace: str = ...,
    rank: int = ...,
    world_size: int = ...,
    name: str | None = ...,
    host: str | None = ...,
    port: int | None = ...,
    dataplane: DataPlaneConfig | None = ...,
) -> GossipRunner: ...


def build_member(
    config: MeshConfig,
    role: str,
    *,
    namespace: str = ANY_NAMESPACE,
    rank: int = 0,
    world_size: int = 1,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    dataplane: DataPlaneConfig | None = None,
) -> MeshNode | GossipRunner:
    """The member ``role`` asks for (see the module docstring), built, not started.

    ``namespace``, ``rank`` and ``world_size`` place an engine; ``name`` defaults to
    ``instance_id/rank``; ``host`` and ``port`` (gossip-only and seed members) default to the
    config's ``p2p_host`` and this rank's gossip port. Raises TransportError if a port cannot
    be bound, ConfigError for a bad profile or channel, UsageError for a bad name.
    """
    if role in (ROLE_ENGINE, ROLE_STORAGE):
        return MeshNode(
            config,
            namespace=namespace if role == ROLE_ENGINE else ANY_NAMESPACE,
            rank=rank,
            world_size=world_size,
            role=role,
            name=name,
            dataplane=dataplane,
        )
    if role not in ROLES:
        raise UsageError(f"unknown member role {role!r}; one of {ROLES}")
    if role == ROLE_SEED:
        meta = seed_meta(version=__version__)
    else:
        meta = gossip_only_meta(version=__version__)
    return GossipRunner(
        config=GossipConfig.profile(config.mesh_gossip_profile),
        name=name or f"{config.instance_id}/{rank}",
        host=config.p2p_host if host is None else host,
        port=config.ports_for_rank(rank, world_size).gossip if port is None else port,
        meta=meta,
        auth=AuthPolicy.from_config(config),
    )
