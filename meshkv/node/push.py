"""Pushing produced chunks to their homes, in the background, with a bounded queue.

After a prefill the connector stores each full chunk locally (`MeshNode.put`) and queues it
here. The pusher thread asks each home on the key's preference list to reserve slots for the
chunks it lacks, WRITEs them (or sends them inline on the tcp channel), then commits with their
checksums, which the home verifies before publishing.

Under bandwidth pressure the queue fills; then the chunks are announced instead (``HELD_AT``:
"ask me for these"), so the home still answers lookups for them and nothing waits. Every step
has a deadline; a home that fails is simply skipped (its lookups miss; our copy stays).
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
from meshkv.dataplane.client import RequestClient
from meshkv.node.membership import Membership
from meshkv.store import ChunkStore
from meshkv.transfer import Channel

log = logging.getLogger("vllm.meshkv.node.push")

PUSH_QUEUE_MAX = 64
"""Push jobs (one per put call) waiting; past this, chunks are announced with HELD_AT."""
NOTICE_QUEUE_MAX = 1024
PUSH_DEADLINE_S = 5.0
"""Budget of one push batch to one home (reserve + transfer + commit)."""
PUSH_BATCH_BYTES = 16 << 20
"""Chunk bytes per push request: bounded frames on the tcp channel, bounded posts on NIXL."""


@dataclass(frozen=True, slots=True)
class _Job:
    keys: list[bytes]
    announce_only: bool
    leaving: bool = False  # place on the ring without this member (graceful leave)
    newcomer: str | None = None  # point out every chunk held here that this member is home for


class Pusher:
    """Owns one thread and one RequestClient; `submit` may be called from any thread."""

    def __init__(
        self,
        *,
        membership: Membership,
        store: ChunkStore,
        channel: Channel,
        client_factory: Callable[[], RequestClient],
        handshake: Callable[[RequestClient, str, float], bool],
        replicas: int,
    ) -> None:
        self._membership = membership
        self._store = store
        self._channel = channel
        self._client_factory = client_factory
        self._handshake = handshake
        self._replicas = replicas
        self._jobs: queue.Queue[_Job | None] = queue.Queue(PUSH_QUEUE_MAX)
        self._notices: queue.Queue[_Job] = queue.Queue(NOTICE_QUEUE_MAX)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-push", daemon=True)
        self.stats: Counter[str] = Counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # wakes the thread; if full it sees the flag
            self._jobs.put_nowait(None)
        self._thread.join(timeout_s)

    def submit(self, keys: list[bytes]) -> None:
        """Queues ``keys`` (committed locally) for their homes; never blocks."""
        try:
            self._jobs.put_nowait(_Job(keys, announce_only=False))
        except queue.Full:
            self.stats["queue_full"] += 1
            try:
                self._notices.put_nowait(_Job(keys, announce_only=True))
            except queue.Full:
                self.stats["notice_dropped"] += 1

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
            time.sleep(0.01)
        return self.idle()

    def point_out_to(self, newcomer: str) -> None:
        """Tells a member that just joined which chunks held here it is now home for
        (``HELD_AT`` pointers, no bytes), so its lookups find them at once."""
        try:
            self._notices.put_nowait(_Job([], announce_only=True, newcomer=newcomer))
        except queue.Full:
            self.stats["notice_dropped"] += 1

    def idle(self) -> bool:
        """True when nothing is queued (tests and benchmarks wait on this)."""
        return self._jobs.unfinished_tasks == 0 and self._notices.empty()

    def _run(self) -> None:
        client = self._client_factory()
        try:
            while not self._stopping.is_set():
                while not self._notices.empty():
                    notice = self._notices.get_nowait()
                    if notice.newcomer is None:
                        self._announce(client, notice.keys)
                    else:
                        self._point_out(client, notice.newcomer)
                try:
                    job = self._jobs.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    if job is None:
                        return
                    self._push(client, job.keys, leaving=job.leaving)
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
        targets: dict[str, list[bytes]] = {}
        for key in keys:
            for member in ring.preference_list(key, self._replicas):
                if member != me:
                    targets.setdefault(member, []).append(key)
        return targets

    def _announce(self, client: RequestClient, keys: list[bytes]) -> None:
        me = self._membership.me.name
        epoch = self._membership.ring().epoch
        for home, home_keys in self._targets(keys).items():
            peer = self._membership.peer(home)
            if peer is not None:
                notice = m.HeldAt(req=client.next_id(), epoch=epoch, keys=home_keys, holder=me)
                if client.send_only(peer.data_address, notice):  # HELD_AT has no reply
                    self.stats["announced"] += len(home_keys)

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

    def _push(self, client: RequestClient, keys: list[bytes], *, leaving: bool = False) -> None:
        for home, home_keys in self._targets(keys, leaving=leaving).items():
            stored = 0
            for batch in _batches(home_keys, self._batch_keys(home_keys[0])):
                stored += self._push_to(client, home, batch, time.monotonic() + PUSH_DEADLINE_S)
            self.stats["pushed"] += stored
            self.stats["push_skipped"] += len(home_keys) - stored

    def _batch_keys(self, key: bytes) -> int:
        """Keys per push request, so one request carries about `PUSH_BATCH_BYTES`."""
        slots = self._store.pin([key], owner="push:size", deadline_s=time.monotonic() + 1)
        self._store.unpin(slots, owner="push:size")
        chunk_bytes = slots[0].region.nbytes if slots else PUSH_BATCH_BYTES
        return max(1, PUSH_BATCH_BYTES // chunk_bytes)

    def _push_to(
        self, client: RequestClient, home: str, keys: list[bytes], deadline_s: float
    ) -> int:
        """One batch to one home: reserve, write (or send inline), commit; returns stored."""
        peer = self._membership.peer(home)
        if peer is None or not self._handshake(client, home, deadline_s):
            return 0
        owner = f"push:{home}:{client.next_id()}"
        slots = [  # each key on its own: these keys are a set, not a prefix chain
            slot
            for key in keys
            for slot in self._store.pin([key], owner=owner, deadline_s=deadline_s)
        ]
        if not slots:
            return 0
        try:
            return self._send_batch(client, peer.data_address, home, slots, deadline_s)
        finally:
            self._store.unpin(slots, owner=owner)

    def _send_batch(
        self, client: RequestClient, address: str, home: str, slots: list, deadline_s: float
    ) -> int:
        keys = [slot.key for slot in slots]
        epoch = self._membership.ring().epoch
        chunk_bytes = slots[0].region.nbytes
        if self._channel.kind == "tcp":
            put = m.Put(
                req=client.next_id(),
                epoch=epoch,
                keys=keys,
                chunk_bytes=chunk_bytes,
                checksums=[s.checksum for s in slots],
                payloads=[memoryview(self._store.view(s)) for s in slots],  # pinned
            )
            reply = client.call(address, put, deadline_s)
            return reply.stored if isinstance(reply, m.PutReply) else 0
        put = m.Put(req=client.next_id(), epoch=epoch, keys=keys, chunk_bytes=chunk_bytes)
        reply = client.call(address, put, deadline_s)
        if not isinstance(reply, m.PutReply):
            return 0
        chosen = [(s, ref) for s, ref in zip(slots, reply.slots, strict=False) if ref]
        if not chosen or not self._write(home, chosen, deadline_s):
            return 0
        commit = m.Commit(
            req=client.next_id(),
            keys=[s.key for s, _ in chosen],
            checksums=[s.checksum for s, _ in chosen],
        )
        done = client.call(address, commit, deadline_s)
        return done.stored if isinstance(done, m.CommitReply) else 0

    def _write(self, home: str, chosen: list, deadline_s: float) -> bool:
        return self._channel.write(
            home, [s.region for s, _ in chosen], [ref for _, ref in chosen], deadline_s
        )


def _batches(keys: list[bytes], size: int) -> list[list[bytes]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]
