"""A member's get, step by step: presume → fetch → locate → refetch → pin → verify → repair.

1. presume: guess each leading key's holders with no round trip (`meshkv.node.fetch.presume`:
   its replicas, the members just found silent last);
2. fetch straight from those guesses (one round trip when chunks sit at their homes), hedged
   to the next replica when a holder is silent for the hedge delay; a chunk being written into
   this member meanwhile (a push to its home, a read repair) is waited for, not fetched;
3. locate: if the guesses missed, ask who holds the rest (`meshkv.node.locate`: the prompt's
   first home, which knows its chain, then the preference lists of what it did not cover,
   hedged; after a membership change, the previous homes);
4. refetch from the located holders, unless the first one was sent a get for that chunk
   already (asking it again would refetch a chunk that failed its checksum);
5. pin the leading chunks now here, local copies and fetched ones, for the caller's lease;
6. verify the local ones against their checksums (fetched ones were checked on arrival);
7. repair: chunks found away from their home (at a previous home, or at another replica or
   the producer after the home answered without them) are pushed to their homes.

The fetch's reservations make room by evicting the least recently used chunks; the chunks
presumed here in step 1 are made the most recently used first, so that other chunks go before
them (chaos: a get served 2 of 4 chunks, its other 2 evicted by its own fetch). They still go
when nothing else can: the leading chunks are the ones worth serving.

Every step is bounded by the caller's deadline and every failure is fewer leading chunks: a
miss, never an exception, never wrong bytes.

This module knows membership, the store, the requester's data-plane calls and the pusher's
queue; not sockets, threads or vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.dataplane.handshake import Greeter
from meshkv.metrics import NodeMetrics
from meshkv.node.fetch import Fetched, fetch, presume
from meshkv.node.hedged_calls import HedgeState
from meshkv.node.locate import locate
from meshkv.node.membership import Membership
from meshkv.node.readers import Readers
from meshkv.store import ChunkStore, Slot

log = logging.getLogger("vllm.meshkv.node")


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

    def narrow(self, start: int, count: int) -> ChunkLease | None:
        """The lease of chunks [start, start + count) of this one, which ends (its other chunks
        are released now); None, and this lease unchanged, if it does not hold them all."""
        if self._released or start < 0 or count < 1 or start + count > self.count:
            return None
        end = start + count
        self._released = True
        self._store.unpin(self._slots[:start] + self._slots[end:], owner=self._owner)
        return ChunkLease(self.views[start:end], self._store, self._slots[start:end], self._owner)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._store.unpin(self._slots, owner=self._owner)

    def __enter__(self) -> ChunkLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GetPipeline:
    """Runs gets and lookups for one member (any thread, each with its own client)."""

    def __init__(
        self,
        *,
        membership: Membership,
        store: ChunkStore,
        directory: HolderDirectory,
        greeter: Greeter,
        reply_max_bytes: int | None,
        repair: Callable[[list[bytes]], None],
        metrics: NodeMetrics,
        config: DataPlaneConfig,
        replicas: int = 1,
        hedge: HedgeState | None = None,
    ) -> None:
        self._membership = membership
        self._store = store
        self.hedge = hedge or HedgeState(config)
        """Round trips seen and members avoided (gossip clears a member that is back)."""
        self.readers = Readers(membership=membership, store=store, directory=directory,
                                hedge=self.hedge, replicas=replicas)  # fmt: skip
        self._greeter = greeter
        self._reply_max_bytes = reply_max_bytes
        self._repair = repair
        self._metrics = metrics
        self.config = config
        """Read at every get (a benchmark may swap it between gets to sweep a knob)."""

    @property
    def _me(self) -> str:
        return self._membership.me.name

    def count_held(self, keys: list[bytes], client: RequestClient, deadline_s: float) -> int:
        """How many leading ``keys`` some live member holds (a lookup: no bytes move)."""
        located = locate(keys, self.readers, client=client, deadline_s=deadline_s)
        return len(located.holders)

    def get(
        self,
        keys: Sequence[bytes],
        chunk_bytes: int,
        *,
        client: RequestClient,
        owner: str,
        deadline_s: float,
        verify: bool,
    ) -> ChunkLease:
        """The leading chunks of ``keys``, pinned under ``owner`` (see the module docstring)."""
        guesses = presume(keys, self.readers)
        log.debug("get of %d keys: guesses %s", len(keys), guesses)
        self._touch_local(keys, guesses, owner, deadline_s)
        first = self._fetch(keys, guesses, 0, chunk_bytes, client, owner, deadline_s)
        fetched, stray = first.committed, set(first.home_lacked)
        held = self._leading_held(keys, guesses, fetched)
        log.debug("first fetch: %d leading here, asked %s", held, first.asked)
        while held < len(keys) and self._store.await_arrival(
            keys[held], owner=owner, deadline_s=deadline_s
        ):  # being written here (a push, a repair): take it when it lands, not fetch it again
            held += 1
        if held < len(keys) and time.monotonic() < deadline_s:  # guesses missed: ask the homes
            located = locate(keys[held:], self.readers, client=client, deadline_s=deadline_s)
            log.debug("located from %d: %s (fallbacks %s)", held, located.holders,
                      located.fallbacks)  # fmt: skip
            stray.update(held + i for i in located.fallbacks)
            asked = first.asked.get(held, set())
            if located.holders[:1] and located.holders[0] not in asked:
                # (asking it again would refetch a chunk that failed its checksum there)
                holders = [[holder] for holder in located.holders]
                fetched |= self._fetch(keys, holders, held, chunk_bytes, client, owner,
                                       deadline_s).committed  # fmt: skip
        slots = self._store.pin(keys, owner=owner, deadline_s=deadline_s + self.config.lease_hold_s)
        if verify:
            slots = self._verified(slots, fetched, owner)
        self._count(keys, slots, fetched)
        if stray & fetched:  # read repair: found away from their homes, pushed there now
            self._repair([keys[i] for i in sorted(stray & fetched)])
        return ChunkLease([self._store.view(s) for s in slots], self._store, slots, owner)

    def _touch_local(
        self, keys: Sequence[bytes], guesses: list[list[str]], owner: str, deadline_s: float
    ) -> None:
        """Makes the chunks found here the most recently used (a pin, dropped at once)."""
        local = [key for key, names in zip(keys, guesses, strict=False) if names == [self._me]]
        for key in local:
            self._store.unpin(
                self._store.pin([key], owner=owner, deadline_s=deadline_s), owner=owner
            )

    def _fetch(
        self,
        keys: Sequence[bytes],
        candidates: Sequence[Sequence[str]],
        start: int,
        chunk_bytes: int,
        client: RequestClient,
        owner: str,
        deadline_s: float,
    ) -> Fetched:
        """Fetches keys[start + i] from candidates[i] (`Fetched` indexes are into ``keys``)."""
        if all(list(names) == [self._me] for names in candidates):
            return Fetched(set(), {}, set())
        fetched = fetch(
            keys[start : start + len(candidates)],
            candidates,
            self.readers,
            chunk_bytes=chunk_bytes,
            client=client,
            greeter=self._greeter,
            reply_max=self._reply_max_bytes,
            owner=owner,
            deadline_s=deadline_s,
            config=self.config,
        )
        return Fetched(
            {start + i for i in fetched.committed},
            {start + i: names for i, names in fetched.asked.items()},
            {start + i for i in fetched.home_lacked},
        )

    def _leading_held(
        self, keys: Sequence[bytes], guesses: list[list[str]], fetched: set[int]
    ) -> int:
        """How many leading keys are here now: local copies and chunks just fetched."""
        for i in range(len(keys)):
            if i not in fetched and not (i < len(guesses) and guesses[i] == [self._me]):
                return i
        return len(keys)

    def _verified(self, slots: list[Slot], fetched: set[int], owner: str) -> list[Slot]:
        """Cuts the lease at the first chunk whose bytes no longer match their checksum (memory
        corrupted in this store): wrong KV must never reach the engine. Chunks fetched by this
        call (indexes in ``fetched``) were checked on arrival."""
        for i, slot in enumerate(slots):
            if i not in fetched and self._store.checksum(slot) != slot.checksum:
                log.error("%s: chunk %s is corrupted in the local store", self._me, slot.key.hex())
                self._store.unpin(slots[i:], owner=owner)
                return slots[:i]
        return slots

    def _count(self, keys: Sequence[bytes], slots: list[Slot], fetched: set[int]) -> None:
        metrics = self._metrics
        metrics.lookups.inc()
        fetched_here = [slot for i, slot in enumerate(slots) if i in fetched]
        metrics.chunks_hit_local.inc(len(slots) - len(fetched_here))
        metrics.chunks_fetched.inc(len(fetched_here))
        metrics.bytes_fetched.inc(sum(slot.region.nbytes for slot in fetched_here))
        metrics.chunks_missed.inc(len(keys) - len(slots))
