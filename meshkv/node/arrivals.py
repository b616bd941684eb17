"""Fetched chunks landing in a reader's slots, checked piece by piece (the reader's side of a get).

A get request asks a holder for whole chunks, or for one piece of one chunk (`Piece`). Each
chunk is hashed in byte order as its pieces land: a piece that lands early waits for the ones
before it. So the hash of piece k runs while piece k + 1 is still being written, and once the
last piece lands only its own bytes remain to hash. A chunk is committed when every byte is
hashed and the digest matches the checksum its holder sent; every reply for the chunk must
carry the same checksum. A chunk with a missing piece, a short payload or a mismatch is a
miss, never loaded.

A chunk's slot is reserved before its requests go out. Once every request for the chunk is
answered, a chunk that did not complete is aborted. If some request was not answered, the
holder may still be writing into the slot until its budget ends, so the slot is left
reserved: the store expires it after the deadline the caller gave, and does not reuse it
before then. A later fetch of the same get (its refetch from a located holder) reserves the
same slot again and may complete it; it never aborts a slot an earlier fetch left reserved.

A hedged get asks a second replica for chunks the first has not answered for: both requests
name the same slot, and the first reply that completes the chunk commits it. A reply that
lacks the chunk (the holder has no copy) leaves it open for the other request; replies for a
chunk already committed are ignored. Replicas of a chunk are copies of one push, so a late
write from the slower one writes the same bytes; if it did not, the checksum would catch it
(on arrival, or `ChunkLease.intact` after the copy out), as for any late write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from meshkv.dataplane import messages as m
from meshkv.store import ChunkStore, Refusal, Slot, chunk_hasher

log = logging.getLogger("vllm.meshkv.node.arrivals")


@dataclass(frozen=True, slots=True)
class Piece:
    """What one get request asks for: chunks [start, end) whole, or, with ``nbytes`` > 0, the
    bytes [offset, offset + nbytes) of chunk ``start`` alone."""

    start: int
    end: int
    offset: int = 0
    nbytes: int = 0


@dataclass(slots=True)
class _Chunk:
    slot: Slot
    outstanding: int = 0  # requests for it not answered yet
    hashed: int = 0  # leading bytes hashed so far
    landed: dict[int, int] = field(default_factory=dict)  # offset -> nbytes, not yet hashed
    hasher: xxhash.xxh3_128 = field(default_factory=chunk_hasher)
    checksum: bytes | None = None  # what the holder says the whole chunk hashes to
    failed: bool = False
    committed: bool = False
    inherited: bool = False  # reserved by an earlier fetch of the same get, maybe still written


class Arrivals:
    """The chunks of one fetch, by index into ``keys``, from reservation to commit or abort."""

    def __init__(
        self, keys: Sequence[bytes], holders: Sequence[str], store: ChunkStore, owner: str
    ) -> None:
        self._keys = keys
        self._holders = holders
        self._store = store
        self._owner = owner
        self._chunks: dict[int, _Chunk] = {}

    def reserve(self, start: int, end: int, chunk_bytes: int, deadline_s: float) -> int:
        """Reserves slots for chunks [start, end); returns where it stopped (the first chunk the
        store had no room for, or ``end``)."""
        for i in range(start, end):
            inherited = self._store.reserved_by(self._keys[i]) == self._owner
            slot = self._store.reserve(
                self._keys[i], chunk_bytes, owner=self._owner, deadline_s=deadline_s
            )
            if isinstance(slot, Refusal):
                return i
            self._chunks[i] = _Chunk(slot, inherited=inherited)
        return end

    def expect(self, piece: Piece) -> list[m.SlotRef]:
        """Notes a request for ``piece``; returns where its bytes go, one place per chunk (for
        a piece, where the piece itself goes)."""
        for i in range(piece.start, piece.end):
            self._chunks[i].outstanding += 1
        return [self._dest(i, piece.offset) for i in range(piece.start, piece.end)]

    def answered(self, piece: Piece, reply: m.Message, holder: str | None = None) -> bool:
        """Takes the reply to a request for ``piece`` (anything but a `GetReply` brings
        nothing); True if it brought every chunk (or the piece) it asked for. A reply covers
        the leading chunks its holder had (``holder``: who answered, if not the one named at
        construction); with payloads (tcp channel) the bytes are copied into the slots first."""
        written = reply.checksums if isinstance(reply, m.GetReply) else []
        payloads = reply.payloads if isinstance(reply, m.GetReply) else []
        whole = len(written) >= piece.end - piece.start
        for n, i in enumerate(range(piece.start, piece.end)):
            chunk = self._chunks[i]
            chunk.outstanding -= 1
            if chunk.committed:
                continue  # another replica's reply came first
            if chunk.failed or n >= len(written):
                whole = False
                continue
            view = self._store.view(chunk.slot)
            if piece.nbytes:
                view = view[piece.offset : piece.offset + piece.nbytes]
            if payloads:
                if len(payloads[n]) != view.nbytes:
                    whole = False
                    continue
                view[:] = memoryview(payloads[n])
            self._land(i, chunk, piece.offset, view.nbytes, written[n], holder)
            whole = whole and not chunk.failed
        return whole

    def pending_from(self, piece: Piece) -> Piece | None:
        """What of ``piece`` is still to fetch: its chunks from the first one not committed
        (a piece of one chunk: the piece itself, unless the chunk is done), or None."""
        for i in range(piece.start, piece.end):
            chunk = self._chunks[i]
            if chunk.failed:
                return None  # the leading run ends at a chunk that cannot be completed
            if not chunk.committed:
                return Piece(i, piece.end, piece.offset, piece.nbytes)
        return None

    def finish(self) -> set[int]:
        """Aborts what did not complete (see the module docstring); returns the indexes of the
        committed chunks."""
        committed: set[int] = set()
        for i, chunk in self._chunks.items():
            if chunk.committed:
                committed.add(i)
            elif chunk.outstanding == 0 and not chunk.inherited:
                self._store.abort(self._keys[i], owner=self._owner)
        return committed

    def _dest(self, i: int, offset: int) -> m.SlotRef:
        region = self._chunks[i].slot.region
        return m.SlotRef(region.segment_id, region.offset + offset)

    def _land(
        self, i: int, chunk: _Chunk, offset: int, nbytes: int, checksum: bytes, holder: str | None
    ) -> None:
        if chunk.checksum is None:
            chunk.checksum = checksum
        elif chunk.checksum != checksum:
            chunk.failed = True
            return
        chunk.landed[offset] = nbytes
        view = self._store.view(chunk.slot)
        while chunk.hashed in chunk.landed:
            end = chunk.hashed + chunk.landed.pop(chunk.hashed)
            chunk.hasher.update(view[chunk.hashed : end])
            chunk.hashed = end
        if chunk.hashed < view.nbytes:
            return
        if chunk.hasher.digest() != chunk.checksum:
            key = self._keys[i].hex()
            log.warning("chunk %s from %s failed its checksum", key, holder or self._holders[i])
            chunk.failed = True
        elif self._store.commit(self._keys[i], chunk.checksum, owner=self._owner) is not None:
            chunk.committed = True
