"""Who holds a prompt's chunks: one member asked for the whole prompt, others only for the rest.

`lookup_steps` is the lookup as a sans-I/O coroutine: it yields the lookups to send (`Ask`s,
all of one round trip together), is sent their replies (None for no reply), and returns a
`Located`. Its steps:

1. keys held here are answered as held here (a local copy never costs a round trip);
2. the home of the prompt's first key is asked for the whole prompt: it answers from its store,
   its chain index (`meshkv.dataplane.chain_index`: what producers told it they hold of this
   prompt) and its held-at pointers. If that home is this member, it is answered here;
3. only if that answer stops short, and the first key it does not cover is homed at another
   member, the homes of the keys left are asked, all at once (one more round trip; the first
   home too, for its later groups: its first answer stopped at the gap);
4. a miss at a home that changed with the last membership change falls back once to the
   previous epoch's home.

A chain entry may be stale (a holder evicted the chunk, or died): the lookup then counts a
chunk that a get will fail to load, which is a miss and a recompute, never wrong KV (bytes are
checked on arrival). `locate` drives the steps on a blocking `RequestClient`; `locate_async`
on a `RequestLoop`, so one client keeps many lookups in flight. Both stop at the first miss:
only the leading run of keys is useful to vLLM.

This module knows the ring, the store's and directory's read side and lookup messages; not
sockets or threads (the clients own those).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from meshkv.dataplane import messages as m
from meshkv.dataplane.chain_index import answer_lookup
from meshkv.dataplane.client import RequestClient, RequestLoop
from meshkv.dataplane.directory import HolderDirectory
from meshkv.node.membership import Membership
from meshkv.ring.hashring import HashRing
from meshkv.store import ChunkStore

log = logging.getLogger("vllm.meshkv.node.locate")


@dataclass(frozen=True, slots=True)
class Located:
    """The leading keys that some member holds, and who (this member's name for local ones)."""

    holders: list[str]
    fallbacks: int  # keys found only through the previous epoch's home (to repair)


@dataclass(frozen=True, slots=True)
class Ask:
    """One lookup to send: ``keys`` to member ``home`` at ``address``."""

    home: str
    address: str
    keys: list[bytes]


Steps = Generator[list[Ask], list[m.Message | None], Located]


def lookup_steps(
    keys: Sequence[bytes],
    *,
    membership: Membership,
    store: ChunkStore,
    directory: HolderDirectory,
) -> Steps:
    """The lookup of ``keys`` (a prefix chain) as a coroutine (see the module docstring)."""
    me = membership.me.name
    answers: dict[bytes, str] = dict.fromkeys(store.held_among(keys), me)
    view = membership.ring()
    current, previous = view.current, view.previous
    if len(answers) < len(keys) and current.members:
        first_home = current.home(keys[0])
        if first_home == me:
            _take(answers, keys, _answer_here(me, keys, store, directory, membership.is_alive))
        else:
            asks = _asks({first_home: list(keys)}, membership)
            if asks:
                _take_replies(answers, asks, (yield asks))
        covered = _leading(keys, answers)
        if covered < len(keys) and current.home(keys[covered]) != first_home:
            rest = [k for k in keys[covered:] if k not in answers]
            asks = _asks(_by_home(rest, current, me, answers, directory, membership),
                         membership)  # fmt: skip
            if asks:
                _take_replies(answers, asks, (yield asks))
    holders: list[str] = []
    fallbacks = 0
    for index, key in enumerate(keys):
        holder = answers.get(key)
        if holder is None and _home_moved(key, previous, current):
            assert previous is not None  # (_home_moved)
            later = [k for k in keys[index:] if k not in answers]
            asks = _asks(_by_home(later, previous, me, answers, directory, membership),
                         membership)  # fmt: skip
            if asks:
                _take_replies(answers, asks, (yield asks))
            holder = answers.get(key)
            fallbacks += holder is not None
        if holder is None:
            break
        holders.append(holder)
    return Located(holders, fallbacks)


def locate(
    keys: Sequence[bytes],
    *,
    membership: Membership,
    store: ChunkStore,
    directory: HolderDirectory,
    client: RequestClient,
    deadline_s: float,
) -> Located:
    """Holders of the leading ``keys``, asked on a blocking client (one caller thread)."""
    steps = lookup_steps(keys, membership=membership, store=store, directory=directory)
    epoch = membership.ring().epoch
    try:
        asks = next(steps)
        while True:
            requests = [
                (a.address, m.Lookup(req=client.next_id(), epoch=epoch, keys=a.keys)) for a in asks
            ]
            asks = steps.send(client.call_many(requests, deadline_s))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def locate_async(
    keys: Sequence[bytes],
    *,
    membership: Membership,
    store: ChunkStore,
    directory: HolderDirectory,
    loop: RequestLoop,
    deadline_s: float,
    done: Callable[[Located], None],
) -> None:
    """Starts the lookup of ``keys`` on ``loop``; ``done`` gets its answer exactly once, on the
    loop's thread (or on this one, if no member had to be asked), a miss if anything failed.
    Never blocks on the network."""
    steps = lookup_steps(keys, membership=membership, store=store, directory=directory)
    epoch = membership.ring().epoch

    def advance(replies: list[m.Message | None] | None) -> None:
        try:
            asks = next(steps) if replies is None else steps.send(replies)
        except StopIteration as finished:
            done(finished.value)
            return
        except Exception:  # a failure is a miss: the caller always hears back
            log.exception("lookup of %d keys failed; answered as a miss", len(keys))
            done(Located([], 0))
            return
        requests = [
            (a.address, m.Lookup(req=loop.next_id(), epoch=epoch, keys=a.keys)) for a in asks
        ]
        loop.submit(requests, deadline_s, advance)

    advance(None)


def _answer_here(
    me: str,
    keys: Sequence[bytes],
    store: ChunkStore,
    directory: HolderDirectory,
    alive: Callable[[str], bool],
) -> list[str]:
    """This member's own answer as home of ``keys[0]`` (what its service would reply)."""
    held = store.lookup_prefix(keys)
    names, runs = answer_lookup(
        me, keys, held, directory.chains.holders(keys), directory.leading_holders, alive,
        store.held_among,
    )  # fmt: skip
    return m.LookupReply(req=0, epoch=0, held=held, pointers=names, runs=runs).holders(me)


def _take(answers: dict[bytes, str], keys: Sequence[bytes], holders: list[str]) -> None:
    for key, holder in zip(keys, holders, strict=False):
        answers.setdefault(key, holder)  # held here wins


def _take_replies(
    answers: dict[bytes, str], asks: list[Ask], replies: list[m.Message | None]
) -> None:
    for ask, reply in zip(asks, replies, strict=True):
        if isinstance(reply, m.LookupReply):
            _take(answers, ask.keys, reply.holders(ask.home))


def _leading(keys: Sequence[bytes], answers: dict[bytes, str]) -> int:
    for index, key in enumerate(keys):
        if key not in answers:
            return index
    return len(keys)


def _home_moved(key: bytes, previous: HashRing | None, current: HashRing) -> bool:
    """True if the last membership change moved ``key`` to another home (empty rings: none)."""
    if previous is None or not previous.members:
        return False
    return not current.members or previous.home(key) != current.home(key)


def _by_home(
    keys: list[bytes],
    ring: HashRing,
    me: str,
    answers: dict[bytes, str],
    directory: HolderDirectory,
    membership: Membership,
) -> dict[str, list[bytes]]:
    """``keys`` grouped by their home in ``ring``; keys homed here are answered from the
    directory at once."""
    by_home: dict[str, list[bytes]] = {}
    for key, home in zip(keys, ring.homes_of(keys), strict=True):
        if home == me:
            holder = directory.holder_of(key)
            if holder is not None and membership.is_alive(holder):
                answers[key] = holder
        else:
            by_home.setdefault(home, []).append(key)
    return by_home


def _asks(by_home: dict[str, list[bytes]], membership: Membership) -> list[Ask]:
    asks = []
    for home, home_keys in by_home.items():
        peer = membership.peer(home)
        if peer is not None:
            asks.append(Ask(home, peer.data_address, home_keys))
    return asks
