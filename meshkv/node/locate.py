"""Who holds a prompt's chunks: one member asked for the whole prompt, others only for the rest.

`lookup_steps` is the lookup as a sans-I/O coroutine: it yields the lookups to send (`Ask`s,
all of one round trip together), is sent the replies each drew, and returns a `Located`. Its
steps:

1. keys held here are answered as held here (a local copy never costs a round trip);
2. the home of the prompt's first key is asked for the whole prompt: it answers from its store,
   its chain index (`meshkv.dataplane.chain_index`: what producers told it they hold of this
   prompt) and its held-at pointers. If that home is this member, it is answered here;
3. only if that answer stops short, and the first key it does not cover is homed at another
   member, the homes of the keys left are asked, all at once, and their other candidates after
   them (one more round trip; the first home too, for its later groups: its first answer
   stopped at the gap). A home's answer is final for the keys homed at it: a miss there is a
   miss, so a miss costs one round trip at most, and none when this member is the first home.
   Except just after a ring change (`SETTLING_S`): a member that has just become a key's home
   may not have been sent its pointers yet, so when it is the first home itself it also asks
   the other candidates of the keys it lacks;
4. a miss at a home that changed with the last membership change falls back once to the
   previous epoch's home, within `SETTLING_S` of that change (the join-time pointers and the
   read repairs have done their work by then: a miss at the current home is then final, and a
   ring that last changed an hour ago no longer costs every such miss a second round trip).

Each `Ask` names its candidates: the key's preference list (``mesh_replicas`` copies, then the
pointer host), members just found silent last. `locate` drives the steps on a blocking
`RequestClient` and hedges (`meshkv.node.hedged_calls`): a candidate silent for the hedge delay
has the next one asked as well, so a frozen or dead home costs one hedge delay, not the
deadline (the usual step, one ask, costs one request and one wait while its first candidate
answers). `locate_async` drives them on a `RequestLoop`, so one client
keeps many lookups in flight; it asks each group's first candidate only (no hedge: its callers,
the shim and the benchmark, are not on an engine's step).

A chain entry may be stale (a holder evicted the chunk, or died): the lookup then counts a
chunk that a get will fail to load, which is a miss and a recompute, never wrong KV (bytes are
checked on arrival). Both drivers stop at the first miss: only the leading run of keys is
useful to vLLM.

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
from meshkv.node.hedged_calls import call_hedged
from meshkv.node.readers import Readers
from meshkv.ring.hashring import HashRing

log = logging.getLogger("vllm.meshkv.node.locate")

SETTLING_S = 30.0
"""How long after its ring last changed a member still looks past a miss at a key's current home:
as the prompt's first home, at the other candidates of the keys it lacks (join-time and stray
pointers to it may still be on their way), and at the previous epoch's home of a key that
moved."""


@dataclass(frozen=True, slots=True)
class Located:
    """The leading keys that some member holds, and who (this member's name for local ones)."""

    holders: list[str]
    fallbacks: list[int]  # indexes of keys found only through the previous epoch's home


@dataclass(frozen=True, slots=True)
class Ask:
    """One lookup of ``keys``, sent to ``candidates`` in order (hedged). ``authority`` is the
    first of them in ring order: its answer settles the ask even if short (a replica asked
    first, because the authority was avoided, may lack what the authority has)."""

    candidates: list[str]
    authority: str
    keys: list[bytes]


Replies = list[list[tuple[str, m.Message]]]
"""Per ask, in order: the (member, reply) pairs it drew (none: unanswered)."""
Steps = Generator[list[Ask], Replies, Located]


def lookup_steps(keys: Sequence[bytes], readers: Readers) -> Steps:
    """The lookup of ``keys`` (a prefix chain) as a coroutine (see the module docstring)."""
    membership, me = readers.membership, readers.membership.me.name
    answers: dict[bytes, str] = dict.fromkeys(readers.store.held_among(keys), me)
    view = membership.ring()
    current, previous = view.current, view.previous
    settling = membership.ring_unchanged_s() < SETTLING_S
    copies = readers.replicas + 1  # the replicas, then the pointer host
    if len(answers) < len(keys) and current.members:
        names = current.preference_list(keys[0], copies)
        first_home = names[0]
        if first_home == me:
            _take(answers, keys, _answer_here(me, keys, readers))
        else:
            others = [n for n in names if n != me]
            ask = Ask(readers.hedge.order(others), others[0], list(keys))
            _take_replies(answers, [ask], (yield [ask]))
        covered = _leading(keys, answers)
        new_home = settling and first_home == me
        if covered < len(keys) and (new_home or current.home(keys[covered]) != first_home):
            rest = [k for k in keys[covered:] if k not in answers]
            asks = _grouped(rest, current.preference_lists_of(rest, copies), answers, readers)
            if asks:
                _take_replies(answers, asks, (yield asks))
    stop = _leading(keys, answers)
    fallbacks: list[int] = []
    if stop < len(keys) and settling and _home_moved(keys[stop], previous, current):
        assert previous is not None  # (_home_moved)
        later = [k for k in keys[stop:] if k not in answers]  # all at once: one round trip
        homes = [[home] for home in previous.homes_of(later)]
        asks = _grouped(later, homes, answers, readers)
        if asks:
            _take_replies(answers, asks, (yield asks))
        if keys[stop] in answers:
            fallbacks.append(stop)
            stop = _leading(keys, answers)
    return Located(list(map(answers.__getitem__, keys[:stop])), fallbacks)


def locate(
    keys: Sequence[bytes], readers: Readers, *, client: RequestClient, deadline_s: float
) -> Located:
    """Holders of the leading ``keys``, asked on a blocking client (one caller thread), each
    ask hedged to its next candidate when one is silent."""
    steps = lookup_steps(keys, readers)
    epoch = readers.membership.ring().epoch
    try:
        asks = next(steps)
        while True:
            asks = steps.send(_call_hedged(asks, readers, client, epoch, deadline_s))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def locate_async(
    keys: Sequence[bytes],
    readers: Readers,
    *,
    loop: RequestLoop,
    deadline_s: float,
    done: Callable[[Located], None],
) -> None:
    """Starts the lookup of ``keys`` on ``loop``; ``done`` gets its answer exactly once, on the
    loop's thread (or on this one, if no member had to be asked), a miss if anything failed.
    Never blocks on the network."""
    steps = lookup_steps(keys, readers)
    membership = readers.membership
    epoch = membership.ring().epoch

    def advance(replies: Replies | None) -> None:
        try:
            asks = next(steps) if replies is None else steps.send(replies)
        except StopIteration as finished:
            done(finished.value)
            return
        except Exception:  # a failure is a miss: the caller always hears back
            log.exception("lookup of %d keys failed; answered as a miss", len(keys))
            done(Located([], []))
            return
        sent: list[tuple[int, str]] = []  # (ask, member) of each request
        requests: list[tuple[str, m.Message]] = []
        for index, ask in enumerate(asks):
            peer = membership.peer(ask.candidates[0])
            if peer is not None:
                sent.append((index, ask.candidates[0]))
                lookup = m.Lookup(req=loop.next_id(), epoch=epoch, keys=ask.keys)
                requests.append((loop.route(peer.lookup_address, peer.data_address), lookup))

        def answered(got: list[m.Message | None]) -> None:
            per_ask: Replies = [[] for _ in asks]
            for (index, name), reply in zip(sent, got, strict=True):
                if reply is not None:
                    per_ask[index].append((name, reply))
            advance(per_ask)

        if requests:
            loop.submit(requests, deadline_s, answered)
        else:
            answered([])

    advance(None)


def _call_hedged(
    asks: list[Ask], readers: Readers, client: RequestClient, epoch: int, deadline_s: float
) -> Replies:
    """Sends ``asks`` at once, hedged (`meshkv.node.hedged_calls`); the replies each drew."""
    replies: Replies = [[] for _ in asks]
    if log.isEnabledFor(logging.DEBUG):
        log.debug("lookup asks %s", [(ask.candidates, len(ask.keys)) for ask in asks])

    def request(task: int, name: str) -> tuple[str, m.Message] | None:
        peer = readers.membership.peer(name)
        if peer is None:
            return None
        address = client.route(peer.lookup_address, peer.data_address)
        return address, m.Lookup(req=client.next_id(), epoch=epoch, keys=asks[task].keys)

    def on_reply(task: int, name: str, reply: m.Message) -> bool:
        """Settled by a full answer, or by the authority's."""
        if not isinstance(reply, m.LookupReply):
            log.debug("lookup task %d: %s answered %s", task, name, type(reply).__name__)
            return False
        log.debug("lookup task %d: %s answered %s", task, name, reply.holders(name))
        replies[task].append((name, reply))
        return len(reply.holders(name)) >= len(asks[task].keys) or name == asks[task].authority

    call_hedged(client, [ask.candidates for ask in asks], request=request, on_reply=on_reply,
                state=readers.hedge, deadline_s=deadline_s)  # fmt: skip
    return replies


def _answer_here(me: str, keys: Sequence[bytes], readers: Readers) -> list[str]:
    """This member's own answer as home of ``keys[0]`` (what its service would reply)."""
    store, directory = readers.store, readers.directory
    held = store.lookup_prefix(keys)
    names, runs = answer_lookup(
        me, keys, held, directory.chains.holders(keys), directory.leading_holders,
        readers.membership.is_alive, store.held_among,
    )  # fmt: skip
    return m.LookupReply(req=0, epoch=0, held=held, pointers=names, runs=runs).holders(me)


def _take(answers: dict[bytes, str], keys: Sequence[bytes], holders: list[str]) -> None:
    """Adds the holders of ``keys`` (the first ``len(holders)``) that ``answers`` lacks: held
    here, or the first answer, wins."""
    known = {k: answers[k] for k in answers.keys() & keys[: len(holders)]}
    answers.update(zip(keys, holders, strict=False))
    answers.update(known)


def _take_replies(answers: dict[bytes, str], asks: list[Ask], replies: Replies) -> None:
    for ask, drawn in zip(asks, replies, strict=True):
        for name, reply in drawn:
            if isinstance(reply, m.LookupReply):
                _take(answers, ask.keys, reply.holders(name))


def _leading(keys: Sequence[bytes], answers: dict[bytes, str]) -> int:
    """How many leading ``keys`` have an answer."""
    try:
        return list(map(answers.__contains__, keys)).index(False)
    except ValueError:
        return len(keys)


def _home_moved(key: bytes, previous: HashRing | None, current: HashRing) -> bool:
    """True if the last membership change moved ``key`` to another home (empty rings: none)."""
    if previous is None or not previous.members:
        return False
    return not current.members or previous.home(key) != current.home(key)


def _grouped(
    keys: list[bytes],
    lists: Sequence[Sequence[str]],
    answers: dict[bytes, str],
    readers: Readers,
) -> list[Ask]:
    """One ask per group of ``keys`` with the same candidates (``lists``: each key's members in
    ring order); a key whose first member is this one is answered from the directory at once,
    if it names a live holder, else asked of the others."""
    membership, me = readers.membership, readers.membership.me.name
    groups: dict[tuple[str, ...], list[bytes]] = {}  # (authority, *candidates in order)
    for key, names in zip(keys, lists, strict=True):
        if names and names[0] == me:
            holder = readers.directory.holder_of(key)
            if holder is not None and membership.is_alive(holder):
                answers[key] = holder
                continue
        others = [n for n in names if n != me]
        if others:
            groups.setdefault((others[0], *readers.hedge.order(others)), []).append(key)
    return [Ask(list(group[1:]), group[0], group_keys) for group, group_keys in groups.items()]
