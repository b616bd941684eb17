"""Pushing produced chunks to their homes, in the background, with a bounded queue.

After a prefill the connector stores each full chunk locally (`MeshNode.put`) and queues it
here. The pusher thread asks each home on the key's preference list to reserve slots for the
chunks it lacks, WRITEs them (or sends them inline on the tcp channel: `BytePath.push`), then
commits with their checksums, which the home verifies before publishing.

A put first points its homes at this member's copy (`point_ahead`: ``HELD_AT``, "ask me for
these", one message each, no reply), at once on the caller's thread, before the chunks are
queued: a lookup that reaches a home while the bytes wait in the queue, or are on their way, or
are stuck behind a silent home's push, finds this copy instead of missing (a prompt asked for on
another engine right after this one computed it). Under bandwidth pressure the queue fills; the
chunks were pointed at already, so the homes still answer lookups for them and nothing waits
(chunks submitted without pointers, read repairs, are then only announced). Every step has a
deadline; a home that fails is simply skipped (its lookups miss; our copy stays).

Placement (`meshkv.ring.placement`): each chunk goes to the first ``replicas`` members of its
preference list, and the member after them gets a pointer to this member (a reader whose
replicas are all silent finds our copy through it). When a member dies, the chunks it was a
replica of are re-pushed to their new preference lists by their first surviving replica
(`restore_after`; likewise for a member back with a new, empty boot), so placement stays at
``replicas`` copies through deaths and restarts. After every membership change, the copies held
here away from their keys' replicas (a producer's own, older placements') are pointed out to the
new replicas and pointer hosts (`point_out_strays`), so readers still find them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from meshkv.dataplane import messages as m
from meshkv.dataplane.byte_path import BytePath
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.handshake import Greeter
from meshkv.member_meta import ANY_NAMESPACE
from meshkv.node.membership import Membership
from meshkv.ring.hashring import HashRing
from meshkv.ring.placement import pointer_hosts, replica_targets, stray_pointers, to_restore
from meshkv.store import ChunkStore, Slot

log = logging.getLogger("vllm.meshkv.node.push")

QUEUE_WAIT_S = 1.0
"""Longest the pusher thread waits on an empty job queue (a notice wakes it at once: an idle
member's pusher turns once a second, not ten times)."""
HAND_OFF_POLL_S = 0.01
"""How often a graceful leave checks whether the hand-off is done."""
SIZE_PIN_S = 1.0
"""Deadline of the pin that reads a chunk's size to size a push batch."""


@dataclass(frozen=True, slots=True)
class _Job:
    keys: list[bytes]
    announce_only: bool
    pointed: bool = False  # its homes were pointed at this member's copy already (`point_ahead`)
    leaving: bool = False  # place on the ring without this member (graceful leave)
    newcomer: str | None = None  # point out every chunk held here that this member is home for
    gone: str | None = None  # restore the copies this dead member held (keys: empty)
    strays: bool = False  # point out the copies held here away from their replicas


_WAKE = _Job([], announce_only=True)
"""Put on the job queue after a notice, so the waiting thread turns at once."""


class Pusher:
    """Owns one thread and one RequestClient; `submit` may be called from any thread."""

    def __init__(
        self,
        *,
        membership: Membership,
        store: ChunkStore,
        path: BytePath,
        client_factory: Callable[[], RequestClient],
        greeter: Greeter,
        replicas: int,
        config: DataPlaneConfig,
    ) -> None:
        self._membership = membership
        self._store = store
        self._path = path
        self._client_factory = client_factory
        self._greeter = greeter
        self._replicas = replicas
        self._config = config
        self._jobs: queue.Queue[_Job | None] = queue.Queue(config.push_queue_max)
        self._notices: queue.Queue[_Job] = queue.Queue(config.notice_queue_max)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-push", daemon=True)
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()  # the pointer counts are kept by callers' threads too
        self._strays_queued = threading.Event()  # a strays notice waits: the next one is void

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # wakes the thread; if full it sees the flag
            self._jobs.put_nowait(None)
        self._thread.join(timeout_s)

    def point_ahead(self, client: RequestClient, keys: list[bytes]) -> None:
        """Points the homes and pointer hosts of ``keys`` (committed locally) at this member's
        copy now, on the caller's ``client`` (one ``HELD_AT`` per member, no reply); never
        blocks. Then `submit` them with ``pointed``."""
        me, ring = self._membership.me.name, self._membership.ring().current
        self._count("pointed_ahead", self._point(client, self._targets(keys)))
        hosts = pointer_hosts(ring, keys, self._replicas, me=me)
        self._count("pointed", self._point(client, hosts))

    def submit(self, keys: list[bytes], *, pointed: bool = False) -> None:
        """Queues ``keys`` (committed locally) for their homes; never blocks. ``pointed``: the
        caller pointed their homes at this copy already (`point_ahead`)."""
        try:
            self._jobs.put_nowait(_Job(keys, announce_only=False, pointed=pointed))
        except queue.Full:
            self.stats["queue_full"] += 1
            if pointed:
                return
            self._notify(_Job(keys, announce_only=True))

    def hand_off(self, timeout_s: float) -> bool:
        """Before a graceful leave: pushes every chunk held here to its home in the ring
        without this member, so readers see no loss. True if done within ``timeout_s``."""
        keys = self._store.keys()
        if not keys or not self._thread.is_alive():
            return True
        try:
            self._jobs.put(_Job(keys, announce_only=False, leaving=True), timeout=timeout_s)
        except queue.Full:
            return False
        deadline_s = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline_s:
            time.sleep(HAND_OFF_POLL_S)
        return self.idle()

    def restore_after(self, gone: str) -> None:
        """A member died or restarted empty: re-push the chunks it was a replica of whose
        first other replica is this member (in the background; never blocks)."""
        try:
            self._jobs.put_nowait(_Job([], announce_only=False, gone=gone))
        except queue.Full:
            self.stats["restore_dropped"] += 1

    def point_out_to(self, newcomer: str) -> None:
        """Tells a member that just joined which chunks held here it is now home for
        (``HELD_AT`` pointers, no bytes), so its lookups find them at once."""
        self._notify(_Job([], announce_only=True, newcomer=newcomer))

    def point_out_strays(self) -> None:
        """The ring changed: tells the replicas and pointer host of each chunk held here but
        not as one of its replicas that this member holds it (``HELD_AT``, in the background;
        never blocks; one pending notice covers every change before it)."""
        if self._strays_queued.is_set():
            return
        self._strays_queued.set()
        if not self._notify(_Job([], announce_only=True, strays=True)):
            self._strays_queued.clear()

    def _notify(self, notice: _Job) -> bool:
        """Queues a notice and wakes the thread if it may be waiting on an empty job queue (a
        queued job wakes it anyway, and wake-ups never crowd out jobs); False (counted) if the
        notice queue is full."""
        try:
            self._notices.put_nowait(notice)
        except queue.Full:
            self.stats["notice_dropped"] += 1
            return False
        if self._jobs.empty():
            with contextlib.suppress(queue.Full):
                self._jobs.put_nowait(_WAKE)
        return True

    def idle(self) -> bool:
        """True when nothing is queued (tests and benchmarks wait on this)."""
        return self._jobs.unfinished_tasks == 0 and self._notices.empty()

    def _run(self) -> None:
        client = self._client_factory()
        try:
            while not self._stopping.is_set():
                while not self._notices.empty():
                    notice = self._notices.get_nowait()
                    if notice.strays:
                        self._point_out_strays(client)
                    elif notice.newcomer is None:
                        self._announce(client, notice.keys)
                    else:
                        self._point_out(client, notice.newcomer)
                try:
                    job = self._jobs.get(timeout=QUEUE_WAIT_S)
                except queue.Empty:
                    continue
                try:
                    if job is None:
                        return
                    if job is _WAKE:  # (a notice came: looked at above, next turn)
                        continue
                    if job.gone is not None:
                        self._restore(client, job.gone)
                    else:
                        self._push(client, job.keys, leaving=job.leaving, pointed=job.pointed)
                except Exception:  # a failed push is a lost copy, never a dead pusher
                    log.exception("push failed")
                finally:
                    self._jobs.task_done()
        finally:
            client.close()

    def _targets(self, keys: list[bytes], *, leaving: bool = False) -> dict[str, list[bytes]]:
        me = self._membership.me.name
        ring = self._membership.ring().current
        if leaving and me in ring.members:
            ring = ring.without_member(me)
        return replica_targets(ring, keys, self._replicas, me=me)

    def _announce(self, client: RequestClient, keys: list[bytes]) -> None:
        self.stats["announced"] += self._point(client, self._targets(keys))

    def _point(self, client: RequestClient, targets: dict[str, list[bytes]]) -> int:
        """Tells each target that its keys are held here (``HELD_AT``, no reply); returns
        how many keys were sent."""
        me, epoch = self._membership.me.name, self._membership.ring().epoch
        sent = 0
        for name, keys in targets.items():
            peer = self._membership.peer(name)
            if peer is None:
                continue
            for start in range(0, len(keys), m.MAX_KEYS):
                batch = keys[start : start + m.MAX_KEYS]
                notice = m.HeldAt(req=client.next_id(), epoch=epoch, keys=batch, holder=me)
                if client.send_only(peer.data_address, notice):
                    sent += len(batch)
        return sent

    def _restore(self, client: RequestClient, gone: str) -> None:
        me = self._membership.me.name
        ring = self._membership.ring().current
        keys = to_restore(ring, gone, self._store.keys(), self._replicas, me=me)
        if keys:
            log.info("%s: restoring %d chunks %s held a copy of", me, len(keys), gone)
            self.stats["restored"] += len(keys)
            self._push(client, keys)

    def _point_out_strays(self, client: RequestClient) -> None:
        self._strays_queued.clear()  # changes from now on need a notice of their own
        me, held = self._membership.me.name, self._store.keys()
        for ring in self._placement_rings():
            targets = stray_pointers(ring, held, self._replicas, me=me)
            self.stats["pointed_strays"] += self._point(client, targets)

    def _placement_rings(self) -> list[HashRing]:
        """The rings chunks held here are placed on: this member's namespace's; for a storage
        member (any namespace), the ring of each namespace its live peers are in."""
        membership = self._membership
        if membership.me.namespace != ANY_NAMESPACE:
            return [membership.ring().current]
        namespaces = {p.namespace for p in membership.peers()} - {ANY_NAMESPACE}
        return [membership.ring_of(ns) for ns in sorted(namespaces)] or [membership.ring().current]

    def _point_out(self, client: RequestClient, newcomer: str) -> None:
        peer = self._membership.peer(newcomer)
        if peer is None:
            return
        ring = self._membership.ring_of(peer.namespace)
        if newcomer not in ring.members:
            return
        held = self._store.keys()
        mine = [k for k, home in zip(held, ring.homes_of(held), strict=True) if home == newcomer]
        me, epoch = self._membership.me.name, self._membership.ring().epoch
        for start in range(0, len(mine), m.MAX_KEYS):
            notice = m.HeldAt(
                req=client.next_id(), epoch=epoch, keys=mine[start : start + m.MAX_KEYS], holder=me
            )
            if client.send_only(peer.data_address, notice):
                self.stats["pointed_out"] += len(notice.keys)

    def _count(self, stat: str, count: int) -> None:
        with self._stats_lock:
            self.stats[stat] += count

    def _push(
        self,
        client: RequestClient,
        keys: list[bytes],
        *,
        leaving: bool = False,
        pointed: bool = False,
    ) -> None:
        targets = self._targets(keys, leaving=leaving)
        if not (leaving or pointed):  # a leaver's copy is about to go: no pointer to it
            self.point_ahead(client, keys)  # lookups find our copy while the bytes travel
        for home, home_keys in targets.items():
            stored = 0
            started_s = time.monotonic()
            for batch in _batches(home_keys, self._batch_keys(home_keys[0])):
                deadline_s = time.monotonic() + self._config.push_deadline_s
                stored += self._push_to(client, home, batch, deadline_s)
            log.debug(
                "pushed %d of %d chunks to %s in %.2f ms, at wall %.6f",
                stored,
                len(home_keys),
                home,
                (time.monotonic() - started_s) * 1000,
                time.time(),
            )
            self.stats["pushed"] += stored
            self.stats["push_skipped"] += len(home_keys) - stored

    def _batch_keys(self, key: bytes) -> int:
        """Keys per push request, so one request carries about ``push_batch_bytes``."""
        batch_bytes = self._config.push_batch_bytes
        slots = self._store.pin([key], owner="push:size", deadline_s=time.monotonic() + SIZE_PIN_S)
        self._store.unpin(slots, owner="push:size")
        chunk_bytes = slots[0].region.nbytes if slots else batch_bytes
        return max(1, batch_bytes // chunk_bytes)

    def _push_to(
        self, client: RequestClient, home: str, keys: list[bytes], deadline_s: float
    ) -> int:
        """One batch to one home: greet, pin, store through the byte path; returns stored."""
        peer = self._membership.peer(home)
        if peer is None or not self._greeter.ensure(
            client, peer=home, peer_nonce=peer.nonce, address=peer.data_address,
            deadline_s=deadline_s,
        ):  # fmt: skip
            return 0
        owner = f"push:{home}:{client.next_id()}"
        slots: list[Slot] = [  # each key on its own: these keys are a set, not a prefix chain
            slot
            for key in keys
            for slot in self._store.pin([key], owner=owner, deadline_s=deadline_s)
        ]
        if not slots:
            return 0
        try:
            return self._path.push(
                client, address=peer.data_address, home=home, slots=slots,
                epoch=self._membership.ring().epoch, deadline_s=deadline_s,
            )  # fmt: skip
        finally:
            self._store.unpin(slots, owner=owner)


def _batches(keys: list[bytes], size: int) -> list[list[bytes]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]
