"""The field kinds that wire messages declare their fields with (see `meshkv.wire`).

Each kind checks a value when a message is built (UsageError, `InvalidField` with the counter
label a receiver would use), gives its wire form, and turns a wire form back into a checked
value. Protocol-specific kinds (e.g. gossip's update blobs) live in that protocol's
``messages`` module. This module knows nothing of any protocol.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, ClassVar

from meshkv.wire import FieldKind, InvalidField

SPLITTERS_MAX = 256
"""`PackedBlobs` layouts kept compiled (one per item count seen; prompts vary in length)."""


@dataclass(frozen=True, slots=True)
class UInt(FieldKind):
    """An int in ``0..high``."""

    high: int

    def check(self, name: str, value: Any) -> None:
        if type(value) is not int or not 0 <= value <= self.high:
            raise InvalidField("malformed", f"{name} must be an int in 0..{self.high}")


@dataclass(frozen=True, slots=True)
class Flag(FieldKind):
    """A bool."""

    def check(self, name: str, value: Any) -> None:
        if type(value) is not bool:
            raise InvalidField("malformed", f"{name} must be a bool")


@dataclass(frozen=True, slots=True)
class Text(FieldKind):
    """A str of ``1..max_chars`` characters (``0..`` with ``empty_ok``), or one of ``choices``."""

    max_chars: int
    empty_ok: bool = False
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> None:
        if (
            type(value) is not str
            or not (0 if self.empty_ok else 1) <= len(value) <= self.max_chars
        ):
            raise InvalidField("malformed", f"{name} must be a str of <= {self.max_chars} chars")
        if self.choices and value not in self.choices:
            raise InvalidField("malformed", f"{name} {value!r} is not one of {self.choices}")


@dataclass(frozen=True, slots=True)
class Checked(FieldKind):
    """A value that ``checker`` accepts (it checks the type too, and raises UsageError)."""

    checker: Callable[[Any], object]

    def check(self, name: str, value: Any) -> None:
        self.checker(value)


@dataclass(frozen=True, slots=True)
class Blob(FieldKind):
    """Bytes, at most ``max_bytes`` (a longer value is counted under ``too_large``)."""

    max_bytes: int
    reason: str = "too_large"

    def check(self, name: str, value: Any) -> None:
        if type(value) is not bytes:
            raise InvalidField("malformed", f"{name} must be bytes")
        if len(value) > self.max_bytes:
            raise InvalidField(self.reason, f"{name} has {len(value)} > {self.max_bytes} bytes")


@dataclass(frozen=True, slots=True)
class PackedBlobs(FieldKind):
    """A list of bytes values ``item_bytes`` long each, at most ``max_items``, that travels as
    one bytes value: one msgpack item to check, not n.

    Both directions run in C, not a Python loop per item: a lookup of 128 keys is checked with
    two set builds and split with one `struct` unpack (a loop per item cost 13-16 µs of it)."""

    item_bytes: int
    max_items: int

    def check(self, name: str, value: Any) -> None:
        if (
            type(value) is not list
            or not set(map(type, value)) <= {bytes}
            or not set(map(len, value)) <= {self.item_bytes}
        ):
            raise InvalidField(
                "malformed", f"{name} must be a list of {self.item_bytes}-byte bytes"
            )
        if len(value) > self.max_items:
            raise InvalidField("too_many", f"{name} has {len(value)} > {self.max_items} items")

    def dump(self, value: Any) -> Any:
        return b"".join(value)

    def load(self, key: str, raw: Any, context: Any) -> Any:
        if type(raw) is not bytes or len(raw) % self.item_bytes:
            raise InvalidField("malformed", f"{key!r} is not whole {self.item_bytes}-byte items")
        count = len(raw) // self.item_bytes
        if count > self.max_items:
            raise InvalidField("too_many", f"{key!r} has {count} items")
        return list(_splitter(self.item_bytes, count).unpack(raw))


@functools.lru_cache(maxsize=SPLITTERS_MAX)
def _splitter(item_bytes: int, count: int) -> struct.Struct:
    """The `struct` layout that cuts ``count`` items of ``item_bytes`` out of one bytes."""
    return struct.Struct(f"{item_bytes}s" * count)


@dataclass(frozen=True, slots=True)
class Record(FieldKind):
    """A ``record_type`` instance that travels as the array of its ``names`` (its positional
    fields, in order; each an int in ``0..high``)."""

    record_type: type
    names: tuple[str, ...]
    high: int
    _fields_of: Callable[[Any], tuple[Any, ...]] = field(init=False, repr=False)
    _keyword_only: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fields_of", attrgetter(*self.names))
        keyword_only = any(f.kw_only for f in fields(self.record_type))
        object.__setattr__(self, "_keyword_only", keyword_only)

    def check(self, name: str, value: Any) -> None:
        if type(value) is not self.record_type:
            raise InvalidField("malformed", f"{name} must be a {self.record_type.__name__}")

    def check_items(self, name: str, values: Any) -> None:
        record_type = self.record_type
        if not all(type(v) is record_type for v in values):
            raise InvalidField("malformed", f"{name} must hold {record_type.__name__}s only")

    def dump(self, value: Any) -> Any:
        return self._fields_of(value)  # a tuple packs as an array

    def dump_items(self, values: Any) -> list[Any]:
        return list(map(self._fields_of, values))

    def load(self, key: str, raw: Any, context: Any) -> Any:
        high, size = self.high, len(self.names)
        if not (
            type(raw) is list
            and len(raw) == size
            and all(type(v) is int and 0 <= v <= high for v in raw)
        ):
            raise InvalidField("malformed", f"bad {self.record_type.__name__} in {key!r}")
        if self._keyword_only:
            return self.record_type(**dict(zip(self.names, raw, strict=True)))
        return self.record_type(*raw)


@dataclass(frozen=True, slots=True)
class Nullable(FieldKind):
    """``item`` or None (nil on the wire)."""

    item: FieldKind

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.item.check(name, value)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.item.dump(value)

    def load(self, key: str, raw: Any, context: Any) -> Any:
        return None if raw is None else self.item.load(key, raw, context)


@dataclass(frozen=True, slots=True)
class Items(FieldKind):
    """A ``container`` (list or tuple) of at most ``max_items`` values of kind ``item``; more
    are counted under ``too_many``."""

    item: FieldKind
    max_items: int
    container: type = list

    def check(self, name: str, value: Any) -> None:
        if type(value) is not self.container:
            raise InvalidField("malformed", f"{name} must be a {self.container.__name__}")
        if len(value) > self.max_items:
            raise InvalidField("too_many", f"{name} has {len(value)} > {self.max_items} items")
        self.item.check_items(name, value)

    def dump(self, value: Any) -> Any:
        return self.item.dump_items(value)

    def load(self, key: str, raw: Any, context: Any) -> Any:
        if type(raw) is not list:
            raise InvalidField("malformed", f"field {key!r} missing or not a list")
        if len(raw) > self.max_items:
            raise InvalidField("too_many", f"field {key!r} has {len(raw)} > {self.max_items} items")
        return self.container(self.item.load(key, v, context) for v in raw)


@dataclass(frozen=True, slots=True)
class Attachments(FieldKind):
    """Bulk buffers that travel as ZMQ frames of their own after the message's frame."""

    in_body: ClassVar[bool] = False

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, Sequence):
            raise InvalidField("malformed", f"{name} must be a sequence of buffers")
