"""Pushing produced chunks to their homes, in the background, with a bounded queue.

After a prefill the connector stores each full chunk locally (`MeshNode.put`) and queues it
here. The pusher thread asks each home on the key's preference list to reserve slots for the
chunks it lacks, WRITEs them (or sends them inline on the tcp channel: `BytePath.push`), then
commits with their checksums, which the home verifies before publishing.

Each push first points its home at this member's copy (``HELD_AT``: "ask me for these", one
message, no reply), so a lookup that reaches the home while the bytes are still on their way
finds this copy instead of missing (a prompt asked for on another engine right after this one
computed it). Under bandwidth pressure the queue fills; then the chunks are only announced, so
the home still answers lookups for them and nothing waits. Every step has a deadline; a home
that fails is simply skipped (its lookups miss; our copy stays).
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
from meshkv.node.membership import Membership
from meshkv.store import ChunkStore, Slot

log = logging.getLogger("vllm.meshkv.node.push")

QUEUE_WAIT_S = 0.1
"""Longest the pusher thread waits on an empty job queue before it looks at the notices."""
HAND_OFF_POLL_S = 0.01
"""How often a graceful leave checks whether the hand-off is done."""
SIZE_PIN_S = 1.0
"""Deadline of the pin that reads a chunk's size to size a push batch."""


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
            time.sleep(HAND_OFF_POLL_S)
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
                        self.stats["announced"] += self._announce(client, notice.keys)
                    else:
                        self._point_out(client, notice.newcomer)
                try:
                    job = self._jobs.get(timeout=QUEUE_WAIT_S)
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

    def _announce(
        self,
        client: RequestClient,
        keys: list[bytes],
        targets: dict[str, list[bytes]] | None = None,
    ) -> int:
        """Sends each home of ``keys`` (or ``targets``) a HELD_AT naming this member; returns
        the keys announced."""
        me = self._membership.me.name
        epoch = self._membership.ring().epoch
        announced = 0
        for home, home_keys in (self._targets(keys) if targets is None else targets).items():
            peer = self._membership.peer(home)
            if peer is not None:
                notice = m.HeldAt(req=client.next_id(), epoch=epoch, keys=home_keys, holder=me)
                if client.send_only(peer.data_address, notice):  # HELD_AT has no reply
                    announced += len(home_keys)
        return announced

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
        targets = self._targets(keys, leaving=leaving)
        if not leaving:  # lookups at the homes find our copy while the bytes are on their way
            self.stats["pointed_ahead"] += self._announce(client, keys, targets)
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
