"""Finding and fetching chunks held by other members, with deadlines (the requester's side).

`presume` guesses who holds each key with no round trip at all: this member for a local copy,
else the members of the key's preference list (`mesh_replicas` of them: the home first), with
the holder its directory names in place of this member, and members just found silent last
(`meshkv.node.hedging`). A get first fetches straight from those guesses, so a load of chunks
that sit at their homes costs one round trip; only the keys the guess missed go through
`meshkv.node.locate`.

`fetch` then moves the located chunks into local slots: each run of keys with the same
candidates goes as a few `Get` requests (`plan`: whole chunks, or pieces of a large one), all
in parallel; each chunk is checked against its checksum before it is committed
(`meshkv.node.arrivals`), so a corrupted or torn chunk is a miss, never loaded. Fetched chunks
stay here as local copies (a repeat of the prompt on this engine is local).

Every get is hedged (`meshkv.node.hedged_calls`): a member silent for the hedge delay has the
next candidate asked as well, so a frozen or dead holder costs one hedge delay, not the
deadline. The pointer host is asked a lookup, not a get (it holds pointers, not bytes), and so
is a candidate that answered a get without some of the chunks: its held-at pointers may name
the producer or another holder (a put points every replica at the producer's copy before its
bytes travel), which is then asked at once, not after the other candidates (chaos: a replica
lacked a fresh chunk, the pointer host was frozen, and the get waited on it until its
deadline). It stops at the first miss: only the leading run of keys is useful to vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.handshake import Greeter
from meshkv.node.arrivals import Arrivals, Piece
from meshkv.node.hedged_calls import call_hedged
from meshkv.node.readers import Readers

log = logging.getLogger("vllm.meshkv.node.fetch")

UNANSWERED_HOLD_S = 2 * m.LATE_WRITE_MS / 1000
"""How long past the get's deadline the slots of an unanswered request stay reserved: its
holder may still write into them until LATE_WRITE_MS past that deadline by its own clock, so
this tolerates clocks up to LATE_WRITE_MS apart (`meshkv.dataplane.messages.Get.time_left_s`).
A fact of the wire protocol, not a tuning knob."""
DEFAULT_CONFIG = DataPlaneConfig()


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one `fetch` did, by index into its ``keys``."""

    committed: set[int]  # chunks now here, checked
    asked: dict[int, set[str]]  # the holders sent a get for each chunk
    home_lacked: set[int]  # chunks whose home (on the current ring) answered without them


def presume(keys: Sequence[bytes], readers: Readers) -> list[list[str]]:
    """The likely holders of each leading key, best first (see the module docstring), its
    pointer host last but before avoided members; stops at the first key with none (not
    held here, no live holder known)."""
    me = readers.membership.me.name
    ring = readers.membership.ring().current
    local = readers.store.held_among(keys)
    lists = ring.preference_lists_of(keys, readers.replicas + 1) if ring.members else None
    guesses: list[list[str]] = []
    for index, key in enumerate(keys):
        if key in local:
            guesses.append([me])
            continue
        names = readers.others(key, lists[index] if lists else [me])
        if not names:
            break
        guesses.append(names)
    return guesses


def fetch(
    keys: Sequence[bytes],
    candidates: Sequence[Sequence[str]],
    readers: Readers,
    *,
    chunk_bytes: int,
    client: RequestClient,
    greeter: Greeter,
    reply_max: int | None,
    owner: str,
    deadline_s: float,
    config: DataPlaneConfig = DEFAULT_CONFIG,
) -> Fetched:
    """Copies remote chunks into local slots; returns what it committed and whom it asked.

    ``candidates[i]`` are the members that may hold ``keys[i]``, best first; a list naming
    this member alone means the chunk is already local. With ``reply_max`` None the holder
    WRITEs the bytes into the slots reserved here (NIXL); else it sends them inline in its
    replies, of ``reply_max`` bytes at most (tcp channel). Each run of keys with the same
    candidates goes as the requests `plan` gives, all sent at once to the first candidate and
    hedged to the next (`call_hedged`); `Arrivals` checks and commits what lands.
    """
    me = readers.membership.me.name
    firsts = [names[0] for names in candidates]
    arrivals = Arrivals(keys, firsts, readers.store, owner)
    pieces: list[Piece] = []
    piece_candidates: list[Sequence[str]] = []
    for start, end in _runs(candidates, me):
        planned = plan(start, end, chunk_bytes, reply_max, config=config)
        covered = planned[-1].end if planned else start
        reserved = arrivals.reserve(start, covered, chunk_bytes, deadline_s + UNANSWERED_HOLD_S)
        if reserved < covered:
            planned = plan(start, reserved, chunk_bytes, reply_max, config=config)
        pieces.extend(planned)
        piece_candidates.extend([candidates[start]] * len(planned))
        if reserved < end:  # no room, or too much for one reply: the leading run ends here
            break
    epoch = readers.membership.ring().epoch
    asked: dict[tuple[int, str], Piece] = {}  # (task, holder) -> the piece that holder was asked
    pointer_hosts = [readers.pointer_host(keys[piece.start]) for piece in pieces]
    looked_up: set[tuple[int, str]] = set()  # (task, holder) asked for its pointers
    lacking: set[tuple[int, str]] = set()  # (task, holder) that answered a get without some
    sent_to: dict[int, set[str]] = {}
    home_lacked: set[int] = set()
    homes = readers.membership.ring().current.homes_of([keys[p.start] for p in pieces])

    def request(task: int, holder: str) -> tuple[str, m.Message] | None:
        peer = readers.membership.peer(holder)
        piece = arrivals.pending_from(pieces[task])
        if peer is None or piece is None:
            return None
        # a pointer host holds pointers, not bytes, unless it is the holder this get guessed
        # first (the lookup or the directory named it): that one is asked for the bytes
        pointer_host = holder == pointer_hosts[task] and holder != piece_candidates[task][0]
        pointers = pointer_host or (task, holder) in lacking
        if pointers and (task, holder) not in looked_up:
            looked_up.add((task, holder))  # pointers, not bytes: ask where the chunks are
            piece_keys = list(keys[piece.start : piece.end])
            lookup = m.Lookup(req=client.next_id(), epoch=epoch, keys=piece_keys)
            return client.route(peer.lookup_address, peer.data_address), lookup
        if not greeter.has_greeted(holder, peer.nonce):  # greet first, hedged like a get
            return peer.data_address, greeter.hello(client.next_id())
        asked[task, holder] = piece
        for i in range(piece.start, piece.end):
            sent_to.setdefault(i, set()).add(holder)
        dest = arrivals.expect(piece)
        get = m.Get(
            req=client.next_id(),
            epoch=epoch,
            sender=me,
            keys=list(keys[piece.start : piece.end]),
            dest=[] if reply_max is not None else dest,
            budget_ms=max(1, int((deadline_s - time.monotonic()) * 1000)),
            sent_ms=m.wall_clock_ms(),
            offset=piece.offset,
            nbytes=piece.nbytes,
        )
        return peer.data_address, get

    def on_reply(task: int, holder: str, reply: m.Message) -> bool | str:
        log.debug("fetch task %d: %s answered %s", task, holder, _summary(reply, holder))
        if isinstance(reply, m.LookupReply):  # from a pointer host: ask whom it points at
            found = reply.holders(holder)[:1]
            return found[0] if found and found[0] != me else False
        if isinstance(reply, m.HelloReply):  # greeted: now ask it for the chunks
            peer = readers.membership.peer(holder)
            greeted = peer is not None and greeter.accept(holder, peer.nonce, reply)
            return holder if greeted else False
        piece = asked[task, holder]
        whole = arrivals.answered(piece, reply, holder)
        if whole or not isinstance(reply, m.GetReply):
            return whole
        if holder == homes[task]:
            home_lacked.update(range(piece.start + len(reply.checksums), piece.end))
        if (task, holder) in looked_up:
            return False
        lacking.add((task, holder))
        return holder  # ask its pointers for the rest

    call_hedged(client, piece_candidates, request=request, on_reply=on_reply,
                state=readers.hedge, deadline_s=deadline_s)  # fmt: skip
    return Fetched(arrivals.finish(), sent_to, home_lacked)


def _summary(reply: m.Message, holder: str) -> str:
    """A reply in a few words, for the debug log."""
    if isinstance(reply, m.GetReply):
        return f"{len(reply.checksums)} chunks"
    if isinstance(reply, m.LookupReply):
        return f"lookup {reply.holders(holder)}"
    if isinstance(reply, m.Error):
        return f"error {reply.reason}"
    return type(reply).__name__


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


def _runs(candidates: Sequence[Sequence[str]], me: str) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive remote keys with the same candidates."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(candidates) + 1):
        if i == len(candidates) or list(candidates[i]) != list(candidates[start]):
            if list(candidates[start]) != [me]:
                runs.append((start, i))
            start = i
    return runs
