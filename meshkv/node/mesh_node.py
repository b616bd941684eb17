"""`MeshNode`: one mesh member — gossip, ring, store, transfer channel and data-plane service.

This is the plain Python API the vLLM connector, the CLI and the benchmarks use:

    node = MeshNode(config, namespace=ns.label(), rank=r, world_size=w)
    node.start()
    node.put(keys, chunks)                    # store locally, push to homes in the background
    node.put(keys, chunks, chains=[ChainSlice(head, start, len(keys))])   # ... as part of a prompt
    with node.get(keys, chunk_bytes) as lease:   # leading chunks, local or fetched, pinned
        for view in lease.views: ...
    node.lookup(keys)                         # how many leading keys the mesh holds
    node.lookup_async(keys, done)             # the same, answered through a callback
    node.stop()

Every call that talks to other members takes a deadline (``timeout_s``, default the config's
``mesh_transfer_timeout_ms``) and turns any failure into fewer leading chunks: a miss, never an
exception, never wrong bytes (checksums are verified on arrival).

Parts, built in dependency order: the boot nonce; the store; the channel and its byte path; the
bound data-plane socket (its address goes into gossip metadata); membership; the greeter; the
pusher; the service core, its driver and its lookup port; the gossip runner; the get pipeline
(`meshkv.node.get_pipeline`). Gossip events reach the parts through one callback
(`_on_member_event`) subscribed last. `meshkv.node.build.build_member` is how processes make one.

Threads: gossip (runner), data-plane service, lookup port (`meshkv.dataplane.lookup_port`;
none with ``mesh_lookup_stream`` off), pusher, and the caller's threads; each thread that sends
requests gets its own `RequestClient` (ZMQ sockets are single-threaded). `lookup_async` keeps
every caller's lookups in flight on one `RequestLoop` (one more thread, made at its first use).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import zmq

from meshkv import __version__
from meshkv.config import MeshConfig
from meshkv.dataplane import messages as m
from meshkv.dataplane.byte_path import byte_path_for
from meshkv.dataplane.client import RequestClient, RequestLoop
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.handshake import Greeter
from meshkv.dataplane.lookup_port import LookupPort
from meshkv.dataplane.server import DataServer, bind_router
from meshkv.dataplane.service import DataService
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.runner import HEALTH_COUNTERS as GOSSIP_HEALTH_COUNTERS
from meshkv.gossip.runner import GossipRunner
from meshkv.member_meta import ROLE_ENGINE, ROLE_STORAGE, member_meta
from meshkv.metrics import NodeMetrics
from meshkv.node.chains import ChainSlice, announce
from meshkv.node.chunk_count_advert import ChunkCountAdvert
from meshkv.node.get_pipeline import ChunkLease, GetPipeline
from meshkv.node.locate import Located, locate_async
from meshkv.node.membership import Membership, Peer
from meshkv.node.push import Pusher
from meshkv.store import ChunkStore, Refusal, chunk_checksum
from meshkv.transfer import Channel, make_channel
from meshkv.wire import AuthPolicy

log = logging.getLogger("vllm.meshkv.node")

GIB = 1 << 30
_warned_no_secret = False


def member_auth(config: MeshConfig) -> AuthPolicy:
    """The frame authentication policy of a member with a data plane; warns once per process
    when the mesh is open."""
    global _warned_no_secret
    if not config.mesh_secret and not _warned_no_secret:
        _warned_no_secret = True
        log.warning(
            "mesh_secret is not set: any process that reaches these ports can join the mesh "
            "and read or push KV; set mesh_secret on every member to authenticate frames"
        )
    return AuthPolicy.from_config(config)


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
        dataplane: DataPlaneConfig | None = None,
    ) -> None:
        """Builds every part in dependency order (binding both ports); `start` runs them."""
        self.config = config
        self.dataplane = tuning = dataplane or DataPlaneConfig()
        self.name = name or f"{config.instance_id}/{rank}"
        self.nonce = int.from_bytes(os.urandom(8), "big")  # this boot's: gossip and NIXL
        ports = config.ports_for_rank(rank, world_size)
        self._timeout_s = config.mesh_transfer_timeout_ms / 1000
        self._auth = auth = member_auth(config)
        capacity_bytes = int(config.max_local_cpu_size * GIB)
        self.store = ChunkStore.with_budget(capacity_bytes)
        self.directory = HolderDirectory()
        self._context = zmq.Context()
        self.channel: Channel = make_channel(
            config.transfer_channel, f"{self.name}-{self.nonce:016x}", self.store.pool
        )
        path = byte_path_for(
            self.channel, self.store.pool, inline_reply_max_bytes=tuning.inline_reply_max_bytes
        )
        codec = m.make_codec(tuning.max_frame_bytes, auth)
        router, data_port = bind_router(
            self._context, config.p2p_host, ports.data, codec=codec, config=tuning
        )
        self.data_address = f"{config.p2p_host}:{data_port}"
        self.membership = Membership(
            me=Peer(self.name, self.nonce, self.data_address, namespace, role),
            vnodes=config.mesh_vnodes,
        )
        self._clients = threading.local()
        self._all_clients: list[RequestClient] = []
        self._clients_lock = threading.Lock()
        self._request_loop: RequestLoop | None = None  # made at the first lookup_async
        self._greeter = Greeter(
            self.channel, name=self.name, nonce=self.nonce, on_greeted=self._log_first_contact
        )
        self.pusher = Pusher(
            membership=self.membership,
            store=self.store,
            path=path,
            client_factory=self._new_client,
            greeter=self._greeter,
            replicas=config.mesh_replicas,
            config=tuning,
        )
        service = DataService(
            name=self.name,
            nonce=self.nonce,
            store=self.store,
            path=path,
            directory=self.directory,
            ring=self.membership.ring,
            holder_alive=self.membership.is_alive,
            accept_any_epoch=namespace == "*",
            config=tuning,
        )
        self.server = DataServer(
            context=self._context,
            router=router,
            codec=codec,
            service=service,
            path=path,
            config=tuning,
        )
        self.lookup_port: LookupPort | None = None
        if config.mesh_lookup_stream:
            self.lookup_port = LookupPort(
                host=config.p2p_host,
                port=ports.lookup_stream,
                codec=m.make_codec(tuning.max_frame_bytes, auth),
                answer=service.lookup_reply,
            )
        self.lookup_address = (
            f"{config.p2p_host}:{self.lookup_port.port}" if self.lookup_port is not None else None
        )
        """Where this member answers lookups on plain TCP (None: on its data port only)."""
        meta = member_meta(
            namespace=namespace,
            role=role,
            data_address=self.data_address,
            lookup_address=self.lookup_address,
            channel=config.transfer_channel,
            capacity_bytes=capacity_bytes,
            chunk_size=config.chunk_size,
            chunk_count=0,
            admin_port=ports.admin,
            version=__version__,
        )
        self.gossip = GossipRunner(
            config=GossipConfig.profile(config.mesh_gossip_profile),
            name=self.name,
            nonce=self.nonce,
            host=config.p2p_host,
            port=ports.gossip,
            meta=meta,
            auth=auth,
        )
        self.chunk_count_advert = ChunkCountAdvert(
            meta=meta, count=lambda: self.store.stats().chunks, publish=self.gossip.update_meta
        )
        self.metrics = self._make_metrics()
        self.gets = GetPipeline(
            membership=self.membership,
            store=self.store,
            directory=self.directory,
            greeter=self._greeter,
            reply_max_bytes=path.reply_max_bytes,
            repair=self.pusher.submit,
            metrics=self.metrics,
            config=tuning,
            replicas=config.mesh_replicas,
        )
        self.gossip.subscribe(self._on_member_event)
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
        if self.lookup_port is not None:
            self.lookup_port.start()
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
        ``hand_off_timeout_s``), so readers lose nothing.
        """
        hand_off_s = self.dataplane.hand_off_timeout_s
        if leave and self.config.enable_p2p and not self.pusher.hand_off(hand_off_s):
            log.warning("%s: hand-off before leaving did not finish in time", self.name)
        self.chunk_count_advert.stop()
        self.gossip.stop(leave=leave)
        self.pusher.stop()
        self.server.stop()
        if self.lookup_port is not None:
            self.lookup_port.stop()
        with self._clients_lock:
            if self._request_loop is not None:
                self._request_loop.close()
                self._request_loop = None
            for client in self._all_clients:
                client.close()
            self._all_clients.clear()
        self.channel.close()
        self._context.destroy(linger=0)  # every thread that used it has stopped

    # --- the API ---------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], timeout_s: float | None = None) -> int:
        """How many leading ``keys`` some live member holds (0 on any failure)."""
        return self.gets.count_held(list(keys), self._client(), self._deadline(timeout_s))

    def lookup_async(
        self, keys: Sequence[bytes], done: Callable[[int], None], timeout_s: float | None = None
    ) -> None:
        """Starts a lookup of ``keys``; ``done`` gets how many leading keys some live member
        holds (0 on any failure), on the request loop's thread (or this one, if nobody had to be
        asked). Never blocks: many lookups from any threads share one client."""

        def located(answer: Located) -> None:
            done(len(answer.holders))

        try:
            loop = self._loop()
        except Exception:  # a failure is a miss, never an exception into the caller
            log.exception("%s: lookup failed; answered as a miss", self.name)
            done(0)
            return
        locate_async(
            list(keys),
            self.gets.readers,
            loop=loop,
            deadline_s=self._deadline(timeout_s),
            done=located,
        )

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
        return self.gets.get(
            keys,
            chunk_bytes,
            client=self._client(),
            owner=f"get:{threading.get_ident()}:{time.monotonic_ns()}",
            deadline_s=self._deadline(timeout_s),
            verify=verify,
        )

    def put(
        self,
        keys: Sequence[bytes],
        chunks: Sequence[np.ndarray | bytes],
        *,
        chains: Sequence[ChainSlice] = (),
    ) -> int:
        """Stores chunks here and queues them for their homes; returns how many were stored.

        A key already held counts as stored. Never blocks on the network. ``chains`` cut
        ``keys`` (in order) into slices of prompts: each prompt's first home is told which of
        its keys this member holds (`meshkv.node.chains`).
        """
        owner = f"put:{threading.get_ident()}"
        stored: list[bytes] = []
        for key, chunk in zip(keys, chunks, strict=True):
            data = np.frombuffer(chunk, dtype=np.uint8) if isinstance(chunk, bytes) else chunk
            data = data.reshape(-1).view(np.uint8)
            deadline_s = time.monotonic() + self.dataplane.local_put_reservation_s
            slot = self.store.reserve(key, data.nbytes, owner=owner, deadline_s=deadline_s)
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
            self.pusher.point_ahead(self._client(), stored)  # found here before the bytes move
            self.pusher.submit(stored, pointed=True)
            if chains:
                announce(keys, chains, set(stored), membership=self.membership,
                         directory=self.directory, client=self._client(),
                         replicas=self.config.mesh_replicas)  # fmt: skip
        return len(stored)

    def members(self) -> list[Peer]:
        return [self.membership.me, *self.membership.peers()]

    def stats(self) -> dict[str, int]:
        """Every counter of this member: gossip's as they are, the data plane's as ``data.*``
        (requests by type, refusals and drops by reason), the lookup port's as
        ``lookup_port.*``, the pusher's as ``push.*``."""
        return {
            **self.gossip.stats(),
            **{f"data.{k}": v for k, v in self.server.stats.items()},
            **{f"lookup_port.{k}": v for k, v in self._lookup_port_stats().items()},
            **{f"push.{k}": v for k, v in self.pusher.stats.items()},
        }

    def lookups_answered(self) -> int:
        """Lookups this member has answered, on its data port and its lookup port."""
        return self.server.stats["rx_lookup"] + self._lookup_port_stats()["rx_lookup"]

    def _lookup_port_stats(self) -> Counter[str]:
        return self.lookup_port.stats if self.lookup_port is not None else Counter()

    def dropped_frames(self) -> int:
        """Frames refused by this member's gossip and data-plane decoders (all reasons)."""
        counters = [self.server.stats, self._lookup_port_stats(), self.gossip.stats()]
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
            "meshkv_lookups_answered",
            "Lookups this member answered (data port and lookup port)",
            self.lookups_answered,
        )
        metrics.gauge(
            "meshkv_frames_dropped",
            "Malformed, unauthenticated or oversized frames",
            self.dropped_frames,
        )
        for key, doc in GOSSIP_HEALTH_COUNTERS.items():
            name = f"meshkv_gossip_{key.replace('.', '_')}"
            metrics.gauge(name, doc, partial(self._gossip_counter, key))
        return metrics

    def _gossip_counter(self, key: str) -> float:
        return self.gossip.stats()[key]

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self._timeout_s if timeout_s is None else timeout_s)

    def _new_client(self) -> RequestClient:
        client = RequestClient(
            self._context, m.make_codec(self.dataplane.max_frame_bytes, self._auth)
        )
        with self._clients_lock:
            self._all_clients.append(client)
        return client

    def _loop(self) -> RequestLoop:
        with self._clients_lock:
            if self._request_loop is None:
                codec = m.make_codec(self.dataplane.max_frame_bytes, self._auth)
                self._request_loop = RequestLoop(
                    self._context, codec, f"meshkv-lookups-{self.name}"
                )
            return self._request_loop

    def _client(self) -> RequestClient:
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = self._new_client()
        return client

    def _log_first_contact(self, peer_name: str) -> None:
        """LMCache's connection line (users grep for it), then meshkv's own."""
        peer = self.membership.peer(peer_name)
        if peer is None:
            return
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

    def _on_member_event(self, event: MemberEvent) -> None:
        """Gossip callback (the gossip thread): keeps the ring current and reacts to peers.

        A peer that died, left or restarted loses its transfer state, so nothing waits on it.
        Pointers to it are kept if it merely died (it may be frozen, and come back holding
        everything; lookups skip holders that are not alive), dropped if it left or restarted.
        A member that joined is told which chunks held here it is now home for, and after any
        change the chunks held here away from their replicas are pointed out. A member alive
        again (or back with a new boot) is no longer avoided by hedged reads.
        """
        change = self.membership.on_event(event)
        if event.kind in (EventKind.ALIVE, EventKind.JOINED):
            self.gets.hedge.clear(event.member.name)
        if change.gone is not None:
            self._greeter.forget(change.gone)
            self.server.forget_peer(change.gone)
            if change.lost_state:
                self.directory.forget_holder(change.gone)
            log.info("%s: peer %s is gone; its transfer state is dropped", self.name, change.gone)
            if event.kind is not EventKind.LEFT:  # died or restarted empty (a leaver hands
                self.pusher.restore_after(change.gone)  # its chunks off itself)
        if change.joined is not None:
            self.pusher.point_out_to(change.joined)
        if change.gone is not None or change.joined is not None:
            self.pusher.point_out_strays()  # copies away from the new replicas: found anyway


__all__ = ["ROLE_ENGINE", "ROLE_STORAGE", "ChainSlice", "ChunkLease", "MeshNode"]
