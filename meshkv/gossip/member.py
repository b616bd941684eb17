"""Member identity, member states, and the precedence rules that merge updates about a member.

A member is ``name`` (``"instance_id/rank"``) plus a boot ``nonce``: the same name with a new
nonce is a new boot of that member. Each boot's ``incarnation`` starts at wall-clock time (the
caller passes it), so a restarted member outranks every record of its previous boot.

Precedence is one readable table, ``state x update x order -> next state``. It is a join
semi-lattice: for one boot, a record is ranked by ``(incarnation, ALIVE < SUSPECT < DEAD < LEFT)``
and an update applies only if it ranks higher. So applying the same updates in any order gives
the same result, which is what lets gossip converge. A different boot replaces a record only by
an ``Alive`` with a higher ``(incarnation, nonce)``; suspicions and deaths of another boot are
ignored (they cannot carry the address of the boot they would create).

This module knows nothing of messages, timers or the network.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import msgpack

from meshkv.errors import UsageError

MAX_NAME_BYTES = 128
MAX_ADDRESS_BYTES = 255
MAX_META_ENTRIES = 32
MAX_META_KEY_BYTES = 64
# Protocol-wide ceiling on encoded metadata; GossipConfig.max_meta_bytes is the local policy.
MAX_META_BYTES_CEILING = 4096
MAX_NONCE = 2**64 - 1
MAX_INCARNATION = 2**63 - 1
_CHECKED_ADDRESSES = 8192  # valid addresses remembered (each is checked on every update)

MetaValue = str | int | float | bool


class MemberState(enum.IntEnum):
    """A member's state as one observer sees it; the value is its wire id and its rank."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class UpdateKind(enum.IntEnum):
    """What an update claims about a member; values are wire ids (append only)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class Order(enum.Enum):
    """How an update compares with the record it would change."""

    NEWER = "newer"
    SAME = "same"
    OLDER = "older"
    OTHER_BOOT = "other_boot"  # a non-Alive update about a boot (nonce) we do not hold


class TransitionError(UsageError):
    """The precedence table has no entry for this case: a bug in the table, not in a peer."""

    def __init__(self, member: str, state: MemberState | None, event: str) -> None:
        state_name = "ABSENT" if state is None else state.name
        super().__init__(f"no transition for member {member!r} in state {state_name} on {event}")
        self.member = member
        self.state = state
        self.event = event


def check_address(address: object) -> str:
    """Returns ``address`` if it is ``"host:port"`` with a port in 1..65535, else raises."""
    if type(address) is not str:
        raise UsageError("address must be a str")
    return _checked_address(address)


@functools.lru_cache(maxsize=_CHECKED_ADDRESSES)
def _checked_address(address: str) -> str:
    if not 0 < len(address.encode()) <= MAX_ADDRESS_BYTES:
        raise UsageError(f"address must be a non-empty str of <= {MAX_ADDRESS_BYTES} bytes")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {address!r} is not 'host:port'")
    return address


def check_name(name: object) -> str:
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_BYTES:
        raise UsageError(f"member name must be a non-empty str of <= {MAX_NAME_BYTES} bytes")
    if not name.isprintable() or (not name.isascii() and len(name.encode()) > MAX_NAME_BYTES):
        raise UsageError(f"member name {name!r} is unprintable or too long")
    return name


def check_int(what: str, value: object, high: int) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise UsageError(f"{what} must be an int in 0..{high}")
    return value


def check_meta(meta: object) -> dict[str, MetaValue]:
    """Returns ``meta`` if it is a small map of str to str/int/float/bool, else raises."""
    if type(meta) is not dict or len(meta) > MAX_META_ENTRIES:
        raise UsageError(f"meta must be a dict of <= {MAX_META_ENTRIES} entries")
    for key, value in meta.items():
        if type(key) is not str or not 0 < len(key) <= MAX_META_KEY_BYTES:
            raise UsageError(f"meta key {key!r} must be a str of 1..{MAX_META_KEY_BYTES} chars")
        kind = type(value)
        if kind is int:
            if not -(2**63) <= value < 2**64:
                raise UsageError(f"meta value for {key!r} does not fit 64 bits")
        elif kind is not str and kind is not float and kind is not bool:
            raise UsageError(f"meta value for {key!r} must be str, int, float or bool")
    return meta


def meta_bytes(meta: Mapping[str, MetaValue]) -> int:
    """The encoded size of ``meta`` as gossip carries it."""
    return len(msgpack.packb(dict(meta), use_bin_type=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """Who this member is: name ``"instance_id/rank"``, boot nonce, gossip address, metadata."""

    name: str
    nonce: int  # random 64-bit, new at every boot
    address: str  # gossip "host:port"
    meta: Mapping[str, MetaValue]

    def __post_init__(self) -> None:
        check_name(self.name)
        check_int("nonce", self.nonce, MAX_NONCE)
        check_address(self.address)
        meta = check_meta(dict(self.meta))
        if meta_bytes(meta) > MAX_META_BYTES_CEILING:
            raise UsageError(f"meta encodes to more than {MAX_META_BYTES_CEILING} bytes")
        object.__setattr__(self, "meta", MappingProxyType(meta))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberView:
    """One member as an observer sees it; ``meta`` is a read-only mapping."""

    name: str
    nonce: int
    address: str
    state: MemberState
    incarnation: int
    meta: Mapping[str, MetaValue]


def order_of(kind: UpdateKind, held: tuple[int, int], update: tuple[int, int]) -> Order:
    """Compares an update's ``(nonce, incarnation)`` with the held record's."""
    held_nonce, held_inc = held
    nonce, inc = update
    if nonce == held_nonce:
        return Order.NEWER if inc > held_inc else Order.SAME if inc == held_inc else Order.OLDER
    if kind is not UpdateKind.ALIVE:
        return Order.OTHER_BOOT
    return Order.NEWER if (inc, nonce) > (held_inc, held_nonce) else Order.OLDER


_A, _S, _D, _L = MemberState
_IGNORE = None


def _build_table() -> dict[tuple[MemberState | None, UpdateKind, Order], MemberState | None]:
    """The precedence table, written out in full so that it can be read and reviewed."""
    table: dict[tuple[MemberState | None, UpdateKind, Order], MemberState | None] = {}
    #          (held state, update)          NEWER     SAME      OLDER     OTHER_BOOT
    rows: dict[tuple[MemberState | None, UpdateKind], tuple[MemberState | None, ...]] = {
        (None, UpdateKind.ALIVE): (_A, _A, _A, _A),  # unknown member: learn it
        (None, UpdateKind.SUSPECT): (_IGNORE,) * 4,  # no address to record
        (None, UpdateKind.DEAD): (_IGNORE,) * 4,
        (None, UpdateKind.LEFT): (_IGNORE,) * 4,
        (_A, UpdateKind.ALIVE): (_A, _IGNORE, _IGNORE, _IGNORE),
        (_A, UpdateKind.SUSPECT): (_S, _S, _IGNORE, _IGNORE),
        (_A, UpdateKind.DEAD): (_D, _D, _IGNORE, _IGNORE),
        (_A, UpdateKind.LEFT): (_L, _L, _IGNORE, _IGNORE),
        (_S, UpdateKind.ALIVE): (_A, _IGNORE, _IGNORE, _IGNORE),  # refuted
        (_S, UpdateKind.SUSPECT): (_S, _S, _IGNORE, _IGNORE),  # SAME: a confirmation
        (_S, UpdateKind.DEAD): (_D, _D, _IGNORE, _IGNORE),
        (_S, UpdateKind.LEFT): (_L, _L, _IGNORE, _IGNORE),
        (_D, UpdateKind.ALIVE): (_A, _IGNORE, _IGNORE, _IGNORE),
        (_D, UpdateKind.SUSPECT): (_S, _IGNORE, _IGNORE, _IGNORE),
        (_D, UpdateKind.DEAD): (_D, _IGNORE, _IGNORE, _IGNORE),
        (_D, UpdateKind.LEFT): (_L, _L, _IGNORE, _IGNORE),
        (_L, UpdateKind.ALIVE): (_A, _IGNORE, _IGNORE, _IGNORE),
        (_L, UpdateKind.SUSPECT): (_S, _IGNORE, _IGNORE, _IGNORE),
        (_L, UpdateKind.DEAD): (_D, _IGNORE, _IGNORE, _IGNORE),
        (_L, UpdateKind.LEFT): (_L, _IGNORE, _IGNORE, _IGNORE),
    }
    for (state, kind), results in rows.items():
        for order, result in zip(Order, results, strict=True):
            table[(state, kind, order)] = result
    return table


PRECEDENCE = _build_table()


def next_state(
    member: str,
    state: MemberState | None,
    kind: UpdateKind,
    order: Order,
    table: Mapping[tuple[MemberState | None, UpdateKind, Order], MemberState | None] = PRECEDENCE,
) -> MemberState | None:
    """The state after an update, or None if the update is ignored. ``state`` None = unknown."""
    try:
        return table[(state, kind, order)]
    except KeyError:
        raise TransitionError(member, state, f"{kind.name} ({order.value})") from None
