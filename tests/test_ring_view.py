"""RingView: current and previous ring, epoch acceptance, and the one-step fallback home."""

import hashlib
from collections.abc import Callable

import pytest

from meshkv.errors import UsageError
from meshkv.ring import HashRing, RingView
from meshkv.ring import view as view_module

ABC = ["a/0", "b/0", "c/0"]
KEYS = [hashlib.blake2b(f"view{i}".encode(), digest_size=16).digest() for i in range(2000)]


def a_key(before: HashRing, after: HashRing, moved: Callable[[str, str], bool]) -> bytes:
    """The first test key whose (old home, new home) pair satisfies `moved`."""
    return next(k for k in KEYS if moved(before.home(k), after.home(k)))


FALLBACK_TABLE = [
    # (case, members before, members after, which key, expected fallback)
    ("join, key moved to the newcomer", ABC, [*ABC, "d/0"], "moved", "old home"),
    ("join, key stayed", ABC, [*ABC, "d/0"], "stayed", None),
    ("leave, the leaver's key", ABC, ["a/0", "b/0"], "moved", None),
    ("leave, key stayed", ABC, ["a/0", "b/0"], "stayed", None),
    ("replace, key moved from a stayer", ABC, ["a/0", "b/0", "d/0"], "moved from a stayer",
     "old home"),
    ("replace, key moved from the leaver", ABC, ["a/0", "b/0", "d/0"], "moved from the leaver",
     None),
]  # fmt: skip

KEY_CHOICE = {
    "moved": lambda old, new: old != new,
    "stayed": lambda old, new: old == new,
    "moved from a stayer": lambda old, new: old != new and old != "c/0",
    "moved from the leaver": lambda old, new: old == "c/0",
}


@pytest.mark.parametrize(
    ("before", "after", "which", "expected"),
    [row[1:] for row in FALLBACK_TABLE],
    ids=[row[0] for row in FALLBACK_TABLE],
)
def test_fallback_home_table(
    before: list[str], after: list[str], which: str, expected: str | None
) -> None:
    view = RingView(before, 64)
    assert view.update(after)
    key = a_key(HashRing(before, 64), HashRing(after, 64), KEY_CHOICE[which])
    old_home = HashRing(before, 64).home(key)
    assert view.home(key) == HashRing(after, 64).home(key)
    assert view.fallback_home(key) == (old_home if expected == "old home" else None)


def test_before_any_change_there_is_no_previous_ring() -> None:
    view = RingView(ABC, 64)
    assert view.previous is None
    assert view.current == HashRing(ABC, 64)
    assert view.epoch == view.current.epoch
    assert view.accepts_epoch(view.epoch)
    assert not view.accepts_epoch(HashRing(["a/0"], 64).epoch)
    assert all(view.fallback_home(k) is None for k in KEYS[:50])


def test_the_same_member_set_is_no_change() -> None:
    view = RingView(ABC, 64)
    assert not view.update(reversed(ABC))
    assert not view.update([*ABC, "a/0"])
    assert view.previous is None


def test_an_unchanged_member_set_builds_no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    view = RingView(ABC, 64)
    built: list[object] = []

    def counting_ring(*args: object, **kwargs: object) -> HashRing:
        built.append(args)
        return HashRing(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(view_module, "HashRing", counting_ring)
    for _ in range(3):
        assert not view.update([*reversed(ABC), "b/0"])
    assert built == []
    assert view.update([*ABC, "d/0"])
    assert len(built) == 1


def test_epochs_of_the_current_and_previous_ring_are_accepted_older_ones_not() -> None:
    view = RingView(ABC, 64)
    first = view.epoch
    assert view.update([*ABC, "d/0"])
    second = view.epoch
    assert view.previous == HashRing(ABC, 64)
    assert view.accepts_epoch(first) and view.accepts_epoch(second)
    assert view.update([*ABC, "d/0", "e/0"])
    assert view.previous == HashRing([*ABC, "d/0"], 64)
    assert view.accepts_epoch(second) and view.accepts_epoch(view.epoch)
    assert not view.accepts_epoch(first)


def test_the_first_members_have_no_fallback() -> None:
    view = RingView(vnodes=64)
    assert view.update(ABC)
    assert view.previous == HashRing([], 64)
    assert all(view.fallback_home(k) is None for k in KEYS[:50])


def test_a_view_keeps_its_ring_parameters() -> None:
    view = RingView(ABC, 32, probes=2)
    view.update(["a/0"])
    assert (view.current.vnodes, view.current.probes) == (32, 2)
    assert view.previous is not None and view.previous.probes == 2


def test_an_empty_current_ring_has_no_home() -> None:
    view = RingView(ABC, 64)
    assert view.update([])
    with pytest.raises(UsageError, match="no members"):
        view.home(KEYS[0])
    with pytest.raises(UsageError, match="no members"):
        view.fallback_home(KEYS[0])
