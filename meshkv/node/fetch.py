"""Finding and fetching chunks held by other members, with deadlines (the requester's side).

`presume` guesses who holds each key with no round trip at all: this member for a local copy,
else the key's home (or, for a key homed here, the holder its directory names). A get first
fetches straight from those guesses, so a load of chunks that sit at their homes costs one
round trip; only the keys the guess missed go through `meshkv.node.locate`.

`fetch` then moves the located chunks into local slots: each holder's run of consecutive keys
goes as a few `Get` requests (`plan`: whole chunks, or pieces of a large one), all in
parallel; each chunk is checked against its checksum before it is committed
(`meshkv.node.arrivals`), so a corrupted or torn chunk is a miss, never loaded. Fetched chunks
stay here as local copies (a repeat of the prompt on this engine is local).

Both stop at the first miss: only the leading run of keys is useful to vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.node.arrivals import Arrivals, Piece
from meshkv.node.membership import Membership
from meshkv.store import ChunkStore

UNANSWERED_HOLD_S = 2 * m.LATE_WRITE_MS / 1000
"""How long past the get's deadline the slots of an unanswered request stay reserved: its
holder may still write into them until LATE_WRITE_MS past that deadline by its own clock, so
this tolerates clocks up to LATE_WRITE_MS apart (`meshkv.dataplane.messages.Get.time_left_s`).
A fact of the wire protocol, not a tuning knob."""
DEFAULT_CONFIG = DataPlaneConfig()


def presume(
    keys: Sequence[bytes], *, membership: Membership, store: ChunkStore, directory: HolderDirectory
) -> list[str]:
    """The likely holder of each leading key (see the module docstring); stops at the first key
    with none (homed here, not held here, no live holder known)."""
    me = membership.me.name
    ring = membership.ring().current
    homes = ring.homes_of(keys) if ring.members else [me] * len(keys)
    local = store.held_among(keys)
    guesses: list[str] = []
    for key, home in zip(keys, homes, strict=True):
        if key in local:
            guesses.append(me)
            continue
        if home == me:
            holder = directory.holder_of(key)
            if holder is None or not membership.is_alive(holder):
                break
            home = holder
        guesses.append(home)
    return guesses


def fetch(
    keys: Sequence[bytes],
    holders: Sequence[str],
    *,
    chunk_bytes: int,
    membership: Membership,
    store: ChunkStore,
    client: RequestClient,
    handshake: Callable[[str, float], bool],
    reply_max: int | None,
    owner: str,
    deadline_s: float,
    config: DataPlaneConfig = DEFAULT_CONFIG,
) -> set[int]:
    """Copies remote chunks into local slots; returns the indexes of the chunks it committed.

    ``holders[i]`` holds ``keys[i]``; entries naming this member are already local. With
    ``reply_max`` None the holder WRITEs the bytes into the slots reserved here (NIXL); else it
    sends them inline in its replies, of ``reply_max`` bytes at most (tcp channel). Each run of
    one holder's chunks goes as the requests `plan` gives, all sent at once; `Arrivals` checks
    and commits what lands.
    """
    me = membership.me.name
    arrivals = Arrivals(keys, holders, store, owner)
    requests: list[tuple[str, m.Get]] = []
    pieces: list[Piece] = []
    epoch = membership.ring().epoch
    for start, end in _runs(holders, me):
        peer = membership.peer(holders[start])
        if peer is None or not handshake(holders[start], deadline_s):
            break
        planned = plan(start, end, chunk_bytes, reply_max, config=config)
        covered = planned[-1].end if planned else start
        reserved = arrivals.reserve(start, covered, chunk_bytes, deadline_s + UNANSWERED_HOLD_S)
        budget_ms = max(1, int((deadline_s - time.monotonic()) * 1000))
        if reserved < covered:
            planned = plan(start, reserved, chunk_bytes, reply_max, config=config)
        for piece in planned:
            dest = arrivals.expect(piece)
            get = m.Get(
                req=client.next_id(),
                epoch=epoch,
                sender=me,
                keys=list(keys[piece.start : piece.end]),
                dest=[] if reply_max is not None else dest,
                budget_ms=budget_ms,
                sent_ms=m.wall_clock_ms(),
                offset=piece.offset,
                nbytes=piece.nbytes,
            )
            requests.append((peer.data_address, get))
            pieces.append(piece)
        if reserved < end:  # no room, or too much for one reply: the leading run ends here
            break
    for index, reply in client.as_answered(requests, deadline_s):  # checks overlap transfers
        arrivals.answered(pieces[index], reply)
    return arrivals.finish()


def plan(
    start: int,
    end: int,
    chunk_bytes: int,
    request_max: int | None = None,
    *,
    config: DataPlaneConfig = DEFAULT_CONFIG,
) -> list[Piece]:
    """The get requests for a run of chunks [start, end) at one holder.

    At most ``fetch_requests_max`` requests, each of ``fetch_request_bytes`` at least (unless
    the run is smaller). A chunk larger than a request goes in pieces, one request each. With
    ``request_max`` (the most bytes one reply carries, tcp channel) no request asks for more;
    the requests then may cover only the leading chunks of the run (none, for a chunk that
    does not fit in ``fetch_requests_max`` pieces).
    """
    requests_max, align = config.fetch_requests_max, config.piece_align_bytes
    chunks = end - start
    request_bytes = max(config.fetch_request_bytes, -(-chunks * chunk_bytes // requests_max))
    count = min(-(-chunk_bytes // request_bytes), requests_max // max(1, chunks))
    if count <= 1:  # whole chunks, as many per request as fit
        per = max(1, request_bytes // chunk_bytes, -(-chunks // requests_max))
        if request_max is not None and per * chunk_bytes > request_max:
            return _capped(start, end, chunk_bytes, request_max, requests_max, align)
        return [Piece(i, min(i + per, end)) for i in range(start, end, per)]
    size = -(-chunk_bytes // count // align) * align
    if request_max is not None and size > request_max:
        return _capped(start, end, chunk_bytes, request_max, requests_max, align)
    return _pieces(start, end, chunk_bytes, size)


def _capped(
    start: int, end: int, chunk_bytes: int, request_max: int, requests_max: int, align: int
) -> list[Piece]:
    """The leading chunks of [start, end) that ``requests_max`` requests of ``request_max``
    bytes at most can carry: whole chunks if one fits, else pieces (``align``-ed)."""
    per = request_max // chunk_bytes
    if per:
        return [Piece(i, min(i + per, end)) for i in range(start, end, per)][:requests_max]
    size = request_max // align * align
    fit = requests_max // -(-chunk_bytes // size) if size else 0
    return _pieces(start, min(end, start + fit), chunk_bytes, size)


def _pieces(start: int, end: int, chunk_bytes: int, size: int) -> list[Piece]:
    """Each chunk of [start, end) in pieces of ``size`` bytes (its last one may be shorter)."""
    return [
        Piece(i, i + 1, at, min(size, chunk_bytes - at))
        for i in range(start, end)
        for at in range(0, chunk_bytes, size)
    ]


def _runs(holders: Sequence[str], me: str) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive keys with the same remote holder."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(holders) + 1):
        if i == len(holders) or holders[i] != holders[start]:
            if holders[start] != me:
                runs.append((start, i))
            start = i
    return runs
