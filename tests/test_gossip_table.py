"""The member table: merging updates into events, suspicion lifecycle, forgetting the dead."""

from __future__ import annotations

import random

import pytest

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind
from meshkv.gossip.member import MemberState
from meshkv.gossip.table import MemberTable
from meshkv.gossip.updates import Alive, Dead, Suspect

CONFIG = GossipConfig.test()


def _alive(name: str, incarnation: int = 10, nonce: int = 1, **meta: object) -> Alive:
    return Alive(name=name, nonce=nonce, incarnation=incarnation, address="h:1", meta=meta)


def _table(*names: str) -> MemberTable:
    table = MemberTable(CONFIG, "me/0", random.Random(0))
    for name in names:
        table.apply(_alive(name), 0.0)
    table.take_events()
    return table


def _kinds(table: MemberTable) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.member.name) for e in table.take_events()]


def test_updates_become_events_and_news() -> None:
    table = MemberTable(CONFIG, "me/0", random.Random(0))
    assert table.apply(_alive("a/0"), 0.0)
    assert not table.apply(_alive("a/0"), 0.0)  # the same update again is no news
    assert table.apply(_alive("a/0", 11, region="x"), 0.0)
    assert table.apply(Suspect(name="a/0", nonce=1, incarnation=11, source="b/0"), 0.0)
    assert table.apply(_alive("a/0", 12, region="x"), 0.0)
    assert table.apply(_alive("a/0", 20, nonce=2), 0.0)  # a new boot
    assert table.apply(Dead(name="a/0", nonce=2, incarnation=20, source="b/0", left=True), 0.0)
    assert not table.apply(Dead(name="a/0", nonce=2, incarnation=20, source="c/0"), 0.0)
    assert _kinds(table) == [
        (EventKind.JOINED, "a/0"),
        (EventKind.UPDATED, "a/0"),
        (EventKind.SUSPECT, "a/0"),
        (EventKind.ALIVE, "a/0"),
        (EventKind.JOINED, "a/0"),
        (EventKind.LEFT, "a/0"),
    ]
    assert table.live_count == 0


def test_suspicion_is_verified_before_a_death() -> None:
    table = _table("a/0", "b/0", "c/0", "d/0")
    table.apply(Suspect(name="a/0", nonce=1, incarnation=10, source="b/0"), 1.0)
    suspicion = table.get("a/0").suspicion  # type: ignore[union-attr]
    assert suspicion is not None
    deadline_s = table.next_deadline_s()
    assert deadline_s == pytest.approx(1.0 + suspicion.max_s)  # no confirmations yet
    deaths, verify = table.expire(deadline_s, verify_s=0.05)
    assert deaths == [] and [m.name for m in verify] == ["a/0"]
    assert table.next_deadline_s() == pytest.approx(deadline_s + 0.05)
    deaths, verify = table.expire(deadline_s + 0.05, verify_s=0.05)
    assert [d.name for d in deaths] == ["a/0"] and verify == []
    assert table.get("a/0").state is MemberState.DEAD  # type: ignore[union-attr]


def test_confirmations_shorten_the_suspicion_and_a_refutation_ends_it() -> None:
    table = _table("a/0", "b/0", "c/0", "d/0", "e/0")
    table.apply(Suspect(name="a/0", nonce=1, incarnation=10, source="b/0"), 0.0)
    first_s = table.next_deadline_s()
    assert table.apply(Suspect(name="a/0", nonce=1, incarnation=10, source="c/0"), 0.1)
    assert not table.apply(Suspect(name="a/0", nonce=1, incarnation=10, source="c/0"), 0.1)
    assert table.apply(Suspect(name="a/0", nonce=1, incarnation=10, source="d/0"), 0.2)
    suspicion = table.get("a/0").suspicion  # type: ignore[union-attr]
    assert suspicion is not None
    assert table.next_deadline_s() == pytest.approx(suspicion.min_s)
    assert suspicion.min_s < first_s
    table.apply(_alive("a/0", 11), 0.3)  # refuted
    assert table.next_deadline_s() == float("inf")
    assert table.expire(100.0, verify_s=0.05) == ([], [])


def test_dead_members_are_forgotten_after_retention() -> None:
    table = _table("a/0", "b/0")
    table.apply(Dead(name="a/0", nonce=1, incarnation=10, source="b/0"), 5.0)
    assert table.pick_dead() is table.get("a/0")
    assert table.next_deadline_s() == pytest.approx(5.0 + CONFIG.dead_retention_s)
    table.expire(5.0 + CONFIG.dead_retention_s, verify_s=0.05)
    assert table.get("a/0") is None and len(table) == 1 and table.names() == ["b/0"]
    assert table.pick_dead() is None


def test_table_is_bounded() -> None:
    table = MemberTable(CONFIG.replace(max_members=3), "me/0", random.Random(0))
    for i in range(5):
        table.apply(_alive(f"m{i}/0"), 0.0)
    assert len(table) == 3 and table.full_drops == 2


def test_random_picks_are_distinct_live_members() -> None:
    table = _table(*(f"m{i}/0" for i in range(30)))
    table.apply(Dead(name="m3/0", nonce=1, incarnation=10, source="x/0"), 0.0)
    table.apply(Suspect(name="m4/0", nonce=1, incarnation=10, source="x/0"), 0.0)
    for _ in range(50):
        picked = [m.name for m in table.pick(5, exclude="m5/0", alive_only=True)]
        assert len(set(picked)) == 5 and not {"m3/0", "m4/0", "m5/0"} & set(picked)
    assert len(table.pick(40, alive_only=False)) == 29  # all live ones, suspects included


def test_the_suspects_addresses_are_those_to_watch_until_refuted_or_dead() -> None:
    table = MemberTable(CONFIG, "me/0", random.Random(0))
    for name, address in (("a/0", "h:1"), ("b/0", "h:2"), ("c/0", "h:3")):
        table.apply(Alive(name=name, nonce=1, incarnation=10, address=address, meta={}), 0.0)
    assert table.suspect_addresses() == set()
    for name in ("a/0", "b/0"):
        table.apply(Suspect(name=name, nonce=1, incarnation=10, source="c/0"), 1.0)
    assert table.suspect_addresses() == {"h:1", "h:2"}
    table.apply(_alive("a/0", 11), 1.5)  # refuted
    table.apply(Dead(name="b/0", nonce=1, incarnation=10, source="c/0"), 1.5)
    assert table.suspect_addresses() == set()
