"""Member updates: what gossip says about one member, encoded once and relayed verbatim.

An update (Alive, Suspect, Dead) is encoded by the member that first states it, as a msgpack
array in a bin blob, and every member relays those bytes unchanged inside the ``updates`` list
of its probes and gossip (as memberlist relays its encoded broadcasts). So a receiver knows an
update it has already validated by its bytes (`UpdateCache`), and an update it has already
merged costs it almost nothing.

Every update is a frozen, slotted, keyword-only dataclass that validates on construction
(`meshkv.wire.trusted` builds one from fields that were already validated). This module knows
nothing of messages, timers, sockets or member tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from meshkv.errors import UsageError
from meshkv.gossip.member import (
    MAX_INCARNATION,
    MAX_NONCE,
    MetaValue,
    UpdateKind,
    check_address,
    check_int,
    check_meta,
    check_name,
)

UPDATE_CACHE_ENTRIES = 4096  # settled updates a member remembers (see UpdateCache)
VALIDATED_UPDATES = 65536  # validated updates a process remembers (see UpdateCache)
_BIN_HEADER_BYTES = 3  # bin header of one blob in an ``updates`` list, at most


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    """Member ``name`` (boot ``nonce``) is alive at ``incarnation``, at ``address``, with meta."""

    name: str
    nonce: int
    incarnation: int
    address: str
    meta: Mapping[str, MetaValue]
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    kind: ClassVar[UpdateKind] = UpdateKind.ALIVE

    def __post_init__(self) -> None:
        check_identity(self.name, self.nonce, self.incarnation)
        check_address(self.address)
        check_meta(self.meta if type(self.meta) is dict else dict(self.meta))

    def to_wire(self) -> list[Any]:
        return [0, self.name, self.nonce, self.incarnation, self.address, dict(self.meta)]

    def packed(self) -> bytes:
        """The encoded update, made once and relayed verbatim by every member."""
        return self._packed or _pack_once(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    """Member ``source`` suspects ``name`` (boot ``nonce``) at ``incarnation``."""

    name: str
    nonce: int
    incarnation: int
    source: str
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    kind: ClassVar[UpdateKind] = UpdateKind.SUSPECT

    def __post_init__(self) -> None:
        check_identity(self.name, self.nonce, self.incarnation)
        check_name(self.source)

    def to_wire(self) -> list[Any]:
        return [1, self.name, self.nonce, self.incarnation, self.source]

    def packed(self) -> bytes:
        """The encoded update, made once and relayed verbatim by every member."""
        return self._packed or _pack_once(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    """Member ``source`` declares ``name`` dead at ``incarnation``; ``left``: it left gracefully."""

    name: str
    nonce: int
    incarnation: int
    source: str
    left: bool = False
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_identity(self.name, self.nonce, self.incarnation)
        check_name(self.source)
        if not isinstance(self.left, bool):
            raise UsageError("left must be a bool")

    @property
    def kind(self) -> UpdateKind:
        return UpdateKind.LEFT if self.left else UpdateKind.DEAD

    def to_wire(self) -> list[Any]:
        return [int(self.kind), self.name, self.nonce, self.incarnation, self.source]

    def packed(self) -> bytes:
        """The encoded update, made once and relayed verbatim by every member."""
        return self._packed or _pack_once(self)


Update = Alive | Suspect | Dead


def _pack_once(update: Update) -> bytes:
    packed = msgpack.packb(update.to_wire(), use_bin_type=True)
    object.__setattr__(update, "_packed", packed)
    return packed


def update_from_wire(item: object) -> Update:
    """Builds an update from its array form; raises UsageError on any defect."""
    if not isinstance(item, list) or not item or type(item[0]) is not int:
        raise UsageError("update is not an array starting with its kind")
    kind = item[0]
    if kind == UpdateKind.ALIVE and len(item) == 6:
        return Alive(
            name=item[1], nonce=item[2], incarnation=item[3], address=item[4], meta=item[5]
        )
    if kind == UpdateKind.SUSPECT and len(item) == 5:
        return Suspect(name=item[1], nonce=item[2], incarnation=item[3], source=item[4])
    if kind in (UpdateKind.DEAD, UpdateKind.LEFT) and len(item) == 5:
        return Dead(
            name=item[1],
            nonce=item[2],
            incarnation=item[3],
            source=item[4],
            left=kind == UpdateKind.LEFT,
        )
    raise UsageError(f"unknown update kind {kind} or wrong length {len(item)}")


def update_from_packed(blob: object) -> Update:
    """Builds an update from its encoded form; raises UsageError on any defect."""
    if type(blob) is not bytes:
        raise UsageError("an update must be encoded as bytes")
    try:
        item = msgpack.unpackb(blob, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise UsageError(f"update does not decode: {type(exc).__name__}") from None
    update = update_from_wire(item)
    object.__setattr__(update, "_packed", blob)
    return update


class UpdateCache:
    """One receiver's memory of updates, by their encoded bytes.

    A member receives each update once from every neighbour that relays it (about
    ``retransmit_limit`` times). Updates are relayed verbatim, so equal bytes are an equal,
    already validated update: it is taken from the process-wide memo of validated updates (a
    pure function's results; every `Swim` of a process, or of a simulation, shares it) instead
    of being decoded again. Updates this receiver has *settled* (merged, so that merging them
    again can change nothing) are left out of the messages it decodes: skipping those repeats
    is most of a member's receive work.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._settled: dict[bytes, None] = {}

    def build(self, blob: object) -> Update:
        """The update for ``blob``; raises UsageError on any defect."""
        update = _VALIDATED.get(blob) if type(blob) is bytes else None  # type: ignore[arg-type]
        if update is None:
            update = update_from_packed(blob)
            _remember(_VALIDATED, blob, update, VALIDATED_UPDATES)  # type: ignore[arg-type]
        return update

    def build_all(self, blobs: list[Any]) -> tuple[Update, ...]:
        """The updates for ``blobs``, settled ones left out; raises UsageError on any defect."""
        validated, settled = _VALIDATED, self._settled
        updates = []
        for blob in blobs:
            if type(blob) is bytes:
                if blob in settled:
                    continue
                update = validated.get(blob)
                if update is not None:
                    updates.append(update)
                    continue
            update = update_from_packed(blob)
            _remember(validated, blob, update, VALIDATED_UPDATES)
            updates.append(update)
        return tuple(updates)

    def settle(self, update: Update) -> None:
        """Notes that merging ``update`` again can change nothing for this receiver."""
        _remember(self._settled, update.packed(), None, self.max_entries)


_VALIDATED: dict[bytes, Update] = {}


def _remember(entries: dict[bytes, Any], key: bytes, value: Any, max_entries: int) -> None:
    if len(entries) >= max_entries:
        # another thread may change a shared memo meanwhile: then this eviction is skipped
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):
            del entries[next(iter(entries))]  # the oldest
    entries[key] = value


def packed_bytes(update: Update) -> int:
    """Bytes one update adds to a frame's ``updates`` list (the blob and its bin header)."""
    return len(update.packed()) + _BIN_HEADER_BYTES


def check_identity(name: object, nonce: object, incarnation: object) -> None:
    check_name(name)
    check_int("nonce", nonce, MAX_NONCE)
    check_int("incarnation", incarnation, MAX_INCARNATION)
