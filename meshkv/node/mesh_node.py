"""`MeshNode`: one mesh member — gossip, ring, store, transfer channel and data-plane service.

This is the plain Python API the vLLM connector, the CLI and the benchmarks use:

    node = MeshNode(config, namespace=ns.label(), rank=r, world_size=w)
    node.start()
    node.put(keys, chunks)                    # store locally, push to homes in the background
    with node.get(keys, chunk_bytes) as lease:   # leading chunks, local or fetched, pinned
        for view in lease.views: ...
    node.lookup(keys)                         # how many leading keys the mesh holds
    node.stop()

Every call that talks to other members takes a deadline (``timeout_s``, default the config's
``mesh_transfer_timeout_ms``) and turns any failure into fewer leading chunks: a miss, never an
exception, never wrong bytes (checksums are verified on arrival).

Threads: gossip (runner), data-plane service, pusher, and the caller's threads; each thread that
sends requests gets its own `RequestClient` (ZMQ sockets are single-threaded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import zmq

from meshkv import __version__
from meshkv.config import MeshConfig
from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.server import DataServer
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.runner import GossipRunner
from meshkv.metrics import NodeMetrics
from meshkv.node.chunk_count_advert import ChunkCountAdvert
from meshkv.node.fetch import fetch, locate, presume
from meshkv.node.membership import ROLE_ENGINE, ROLE_STORAGE, Membership, Peer, member_meta
from meshkv.node.push import Pusher
from meshkv.store import ChunkStore, Refusal, Slot, chunk_checksum
from meshkv.transfer import Channel, make_channel
from meshkv.wire import AuthPolicy

log = logging.getLogger("vllm.meshkv.node")

MAX_DATA_FRAME_BYTES = 256 << 20
"""Largest data-plane message, its attachments included (on the tcp channel a get reply
carries its chunks' bytes)."""
INLINE_REPLY_MAX_BYTES = MAX_DATA_FRAME_BYTES - (1 << 20)
"""Chunk bytes one get asks for on the tcp channel, leaving room for the reply's own fields."""
GIB = 1 << 30
HAND_OFF_TIMEOUT_S = 10.0
"""Longest a graceful leave spends pushing this member's chunks to their next homes."""
_warned_no_secret = False


def gossip_profile(config: MeshConfig) -> GossipConfig:
    return {"lan": GossipConfig.lan, "local": GossipConfig.local, "test": GossipConfig.test}[
        config.mesh_gossip_profile
    ]()


def auth_policy(config: MeshConfig) -> AuthPolicy:
    """The frame authentication policy; warns once per process when the mesh is open."""
    global _warned_no_secret
    if not config.mesh_secret and not _warned_no_secret:
        _warned_no_secret = True
        log.warning(
            "mesh_secret is not set: any process that reaches these ports can join the mesh "
            "and read or push KV; set mesh_secret on every member to authenticate frames"
        )
    return AuthPolicy.from_strings(config.mesh_secret, config.mesh_previous_secret)


@dataclass
class ChunkLease:
    """Leading chunks pinned in the local store: read ``views``, then `release` them."""

    views: list[np.ndarray]
    _store: ChunkStore
    _slots: list[Slot]
    _owner: str
    _released: bool = field(default=False)

    @property
    def count(self) -> int:
        return len(self.views)

    def intact(self, index: int) -> bool:
        """True if chunk ``index`` still holds the bytes its checksum names.

        Check it after reading the chunk out. A leased slot is changed only by a write that
        outlived its own get: a holder frozen in the middle of a NIXL post and thawed after
        this member gave up and reused the slot (cma writes straight into this process).
        Such a write is never undone, so a chunk that matches after the copy was copied whole.
        """
        slot = self._slots[index]
        return self._store.checksum(slot) == slot.checksum

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._store.unpin(self._slots, owner=self._owner)

    def __enter__(self) -> ChunkLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MeshNode:
    """One member of the mesh (one per vLLM worker rank, or a `meshkv join` process)."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        namespace: str,
        rank: int = 0,
        world_size: int = 1,
        role: str = ROLE_ENGINE,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name or f"{config.instance_id}/{rank}"
        ports = config.ports_for_rank(rank, world_size)
        self._timeout_s = config.mesh_transfer_timeout_ms / 1000
        auth = auth_policy(config)
        self._codec_args = (MAX_DATA_FRAME_BYTES, auth)
        self.store = ChunkStore.with_budget(int(config.max_local_cpu_size * GIB))
        self._context = zmq.Context()
        self.directory = HolderDirectory()
        self._clients = threading.local()
        self._all_clients: list[RequestClient] = []
        self._clients_lock = threading.Lock()
        self._handshakes: dict[str, int] = {}  # peer name -> nonce we exchanged metadata with
        self._handshake_lock = threading.Lock()
        self.server = DataServer(
            context=self._context,
            bind_host=config.p2p_host,
            port=ports.data,
            codec=m.make_codec(*self._codec_args),
            member_name=self.name,
            store=self.store,
            ring=lambda: self.membership.ring(),
            directory=self.directory,
            holder_alive=lambda holder: self.membership.is_alive(holder),
            accept_any_epoch=namespace == "*",
        )
        self.data_address = f"{config.p2p_host}:{self.server.port}"
        meta = member_meta(
            namespace=namespace,
            role=role,
            data_address=self.data_address,
            channel=config.transfer_channel,
            capacity_bytes=int(config.max_local_cpu_size * GIB),
            chunk_size=config.chunk_size,
            chunk_count=0,
            admin_port=ports.admin,
            version=__version__,
        )
        self.gossip = GossipRunner(
            config=gossip_profile(config),
            name=self.name,
            host=config.p2p_host,
            port=ports.gossip,
            meta=meta,
            auth=auth,
        )
        self.chunk_count_advert = ChunkCountAdvert(
            meta=meta, count=lambda: self.store.stats().chunks, publish=self.gossip.update_meta
        )
        self.nonce = self.gossip.me.nonce
        self.channel: Channel = make_channel(
            config.transfer_channel, f"{self.name}-{self.nonce:016x}", self.store.pool
        )
        self.server.attach(nonce=self.nonce, channel=self.channel)
        self.membership = Membership(
            me=Peer(self.name, self.nonce, self.data_address, namespace, role),
            vnodes=config.mesh_vnodes,
            on_peer_gone=self._peer_gone,
            on_peer_joined=lambda name: self.pusher.point_out_to(name),
        )
        self.gossip.subscribe(self.membership.on_event)
        self.pusher = Pusher(
            membership=self.membership,
            store=self.store,
            channel=self.channel,
            client_factory=self._new_client,
            handshake=self._handshake,
            replicas=config.mesh_replicas,
        )
        self.metrics = self._make_metrics()
        self._admin_port = ports.admin

    @property
    def gossip_address(self) -> str:
        return self.gossip.address

    # --- lifetime --------------------------------------------------------------------------

    def start(self) -> None:
        """Starts serving and joins the mesh through the configured seeds (none: alone)."""
        if self._admin_port is not None:
            self.metrics.serve(self.config.p2p_host, self._admin_port)
        self.server.start()
        self.pusher.start()
        seeds = [s for s in self.config.seeds if s != self.gossip_address]
        if not seeds:
            log.info(
                "%s: no mesh_seeds and no controller configured; starting a new mesh", self.name
            )
        self.gossip.start(seeds)
        self.chunk_count_advert.start()
        log.info(
            "%s joined the mesh: gossip %s, data %s, channel %s",
            self.name,
            self.gossip_address,
            self.data_address,
            self.channel.kind,
        )

    def stop(self, *, leave: bool = True) -> None:
        """Leaves the mesh (gracefully unless ``leave`` is False) and frees every resource.

        A graceful leave first hands this member's chunks to their next homes (bounded by
        `HAND_OFF_TIMEOUT_S`), so readers lose nothing.
        """
        if leave and self.config.enable_p2p and not self.pusher.hand_off(HAND_OFF_TIMEOUT_S):
            log.warning("%s: hand-off before leaving did not finish in time", self.name)
        self.chunk_count_advert.stop()
        self.gossip.stop(leave=leave)
        self.pusher.stop()
        self.server.stop()
        with self._clients_lock:
            for client in self._all_clients:
                client.close()
            self._all_clients.clear()
        self.channel.close()
        self._context.destroy(linger=0)  # every thread that used it has stopped

    # --- the API ---------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], timeout_s: float | None = None) -> int:
        """How many leading ``keys`` some live member holds (0 on any failure)."""
        return self._count_held(list(keys), self._deadline(timeout_s))

    def get(
        self,
        keys: Sequence[bytes],
        chunk_bytes: int,
        timeout_s: float | None = None,
        *,
        verify: bool = True,
    ) -> ChunkLease:
        """The leading chunks of ``keys``, local or fetched now, pinned until the lease ends.

        Chunks are checked against their checksums before the lease is handed out; with
        ``verify`` False the local ones are not, and the caller checks each chunk after it has
        read it (`ChunkLease.intact`), which also catches a write during the read.
        """
        deadline_s = self._deadline(timeout_s)
        owner = f"get:{threading.get_ident()}:{time.monotonic_ns()}"
        client = self._client()
        guesses = presume(keys, membership=self.membership, store=self.store,
                          directory=self.directory)  # fmt: skip
        fetched = self._fetch(keys, guesses, 0, chunk_bytes, client, owner, deadline_s)
        held = self._leading_held(keys, guesses, fetched)
        fallbacks = 0
        if held < len(keys) and time.monotonic() < deadline_s:  # guesses missed: ask the homes
            located = locate(
                keys[held:],
                membership=self.membership,
                store=self.store,
                directory=self.directory,
                client=client,
                deadline_s=deadline_s,
            )
            fallbacks = located.fallbacks
            retry = located.holders[:1] != guesses[held : held + 1]  # not the holder just asked
            if retry:  # (asking it again would refetch a chunk that failed its checksum)
                fetched |= self._fetch(keys, located.holders, held, chunk_bytes, client, owner,
                                       deadline_s)  # fmt: skip
        slots = self.store.pin(keys, owner=owner, deadline_s=deadline_s + 60.0)
        if verify:
            slots = self._verified(slots, fetched, owner)
        self.metrics.lookups.inc()
        fetched_here = [slot for i, slot in enumerate(slots) if i in fetched]
        self.metrics.chunks_hit_local.inc(len(slots) - len(fetched_here))
        self.metrics.chunks_fetched.inc(len(fetched_here))
        self.metrics.bytes_fetched.inc(sum(slot.region.nbytes for slot in fetched_here))
        self.metrics.chunks_missed.inc(len(keys) - len(slots))
        if fallbacks:
            self.pusher.submit([s.key for s in slots])  # read repair at the new homes
        return ChunkLease([self.store.view(s) for s in slots], self.store, slots, owner)

    def _fetch(
        self,
        keys: Sequence[bytes],
        holders: Sequence[str],
        start: int,
        chunk_bytes: int,
        client: RequestClient,
        owner: str,
        deadline_s: float,
    ) -> set[int]:
        """Fetches keys[start + i] from holders[i]; the indexes (into ``keys``) committed."""
        if all(holder == self.name for holder in holders):
            return set()
        fetched = fetch(
            keys[start : start + len(holders)],
            holders,
            chunk_bytes=chunk_bytes,
            membership=self.membership,
            store=self.store,
            client=client,
            handshake=lambda peer, d: self._handshake(client, peer, d),
            reply_max=INLINE_REPLY_MAX_BYTES if self.channel.kind == "tcp" else None,
            owner=owner,
            deadline_s=deadline_s,
        )
        return {start + i for i in fetched}

    def _leading_held(self, keys: Sequence[bytes], guesses: list[str], fetched: set[int]) -> int:
        """How many leading keys are here now: local copies and chunks just fetched."""
        for i in range(len(keys)):
            if i not in fetched and not (i < len(guesses) and guesses[i] == self.name):
                return i
        return len(keys)

    def _verified(self, slots: list[Slot], fetched: set[int], owner: str) -> list[Slot]:
        """Cuts the lease at the first chunk whose bytes no longer match their checksum (memory
        corrupted in this store): wrong KV must never reach the engine. Chunks fetched by this
        call (indexes in ``fetched``) were checked on arrival."""
        for i, slot in enumerate(slots):
            if i not in fetched and self.store.checksum(slot) != slot.checksum:
                log.error("%s: chunk %s is corrupted in the local store", self.name, slot.key.hex())
                self.store.unpin(slots[i:], owner=owner)
                return slots[:i]
        return slots

    def put(self, keys: Sequence[bytes], chunks: Sequence[np.ndarray | bytes]) -> int:
        """Stores chunks here and queues them for their homes; returns how many were stored.

        A key already held counts as stored. Never blocks on the network.
        """
        owner = f"put:{threading.get_ident()}"
        stored: list[bytes] = []
        for key, chunk in zip(keys, chunks, strict=True):
            data = np.frombuffer(chunk, dtype=np.uint8) if isinstance(chunk, bytes) else chunk
            data = data.reshape(-1).view(np.uint8)
            slot = self.store.reserve(
                key, data.nbytes, owner=owner, deadline_s=time.monotonic() + 5
            )
            if slot is Refusal.PRESENT:
                stored.append(key)
                continue
            if isinstance(slot, Refusal):
                continue
            view = self.store.view(slot)
            view[:] = data
            if self.store.commit(key, chunk_checksum(view), owner=owner) is not None:
                stored.append(key)
        self.metrics.chunks_put.inc(len(stored))
        if stored and self.config.enable_p2p:
            self.pusher.submit(stored)
        return len(stored)

    def members(self) -> list[Peer]:
        return [self.membership.me, *self.membership.peers()]

    def stats(self) -> dict[str, int]:
        """Every counter of this member: gossip's as they are, the data plane's as ``data.*``
        (requests by type, refusals and drops by reason), the pusher's as ``push.*``."""
        return {
            **self.gossip.stats(),
            **{f"data.{k}": v for k, v in self.server.stats.items()},
            **{f"push.{k}": v for k, v in self.pusher.stats.items()},
        }

    def dropped_frames(self) -> int:
        """Frames refused by this member's gossip and data-plane decoders (all reasons)."""
        counters = [self.server.stats, self.gossip.stats()]
        return sum(v for c in counters for k, v in c.items() if k.startswith("drop_"))

    # --- internals -------------------------------------------------------------------------

    def _make_metrics(self) -> NodeMetrics:
        metrics = NodeMetrics(self.name)
        metrics.gauge(
            "meshkv_members",
            "Live members this member knows, itself included",
            lambda: 1 + len(self.membership.peers()),
        )
        metrics.gauge(
            "meshkv_store_used_bytes",
            "Bytes of slots in use in the local store",
            lambda: self.store.stats().used_bytes,
        )
        metrics.gauge(
            "meshkv_store_chunks",
            "Chunks held in the local store",
            lambda: self.store.stats().chunks,
        )
        metrics.gauge(
            "meshkv_frames_dropped",
            "Malformed, unauthenticated or oversized frames",
            self.dropped_frames,
        )
        return metrics

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self._timeout_s if timeout_s is None else timeout_s)

    def _count_held(self, keys: list[bytes], deadline_s: float) -> int:
        located = locate(
            keys,
            membership=self.membership,
            store=self.store,
            directory=self.directory,
            client=self._client(),
            deadline_s=deadline_s,
        )
        return len(located.holders)

    def _new_client(self) -> RequestClient:
        client = RequestClient(self._context, m.make_codec(*self._codec_args))
        with self._clients_lock:
            self._all_clients.append(client)
        return client

    def _client(self) -> RequestClient:
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = self._new_client()
        return client

    def _handshake(self, client: RequestClient, peer_name: str, deadline_s: float) -> bool:
        """Exchanges transfer metadata with a peer once per (peer, boot); False on failure."""
        peer = self.membership.peer(peer_name)
        if peer is None:
            return False
        with self._handshake_lock:
            if self._handshakes.get(peer_name) == peer.nonce:
                return True
        hello = m.Hello(
            req=client.next_id(),
            sender=self.name,
            nonce=self.nonce,
            channel=self.channel.kind,
            agent=self.channel.metadata(),
            segments=self.channel.segments(),
        )
        reply = client.call(peer.data_address, hello, deadline_s)
        if not isinstance(reply, m.HelloReply) or reply.nonce != peer.nonce:
            return False
        with self._handshake_lock:
            if self._handshakes.get(peer_name) == peer.nonce:
                return True
            if not self.channel.add_peer(peer_name, reply.agent, reply.segments):
                return False
            self._handshakes[peer_name] = peer.nonce
        self._log_first_contact(peer)
        return True

    def _log_first_contact(self, peer: Peer) -> None:
        """LMCache's connection line (users grep for it), then meshkv's own."""
        log.info(
            "Established connection to peer_init_url: %s, peer_lookup_url: %s",
            peer.gossip_address,
            peer.data_address,
        )
        log.info(
            "%s: transfer channel %s open to %s (boot %016x)",
            self.name,
            self.channel.kind,
            peer.name,
            peer.nonce,
        )

    def _peer_gone(self, name: str, lost_state: bool) -> None:
        """A peer died, left or restarted: drop its transfer state so nothing waits on it.

        Pointers to it are kept if it merely died (it may be frozen, and come back holding
        everything; lookups skip holders that are not alive), dropped if it left or restarted.
        """
        with self._handshake_lock:
            self._handshakes.pop(name, None)
        self.server.forget_peer(name)
        if lost_state:
            self.directory.forget_holder(name)
        log.info("%s: peer %s is gone; its transfer state is dropped", self.name, name)


__all__ = ["ROLE_ENGINE", "ROLE_STORAGE", "ChunkLease", "MeshNode"]
