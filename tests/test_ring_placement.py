"""Placement (`meshkv.ring.placement`): replicas on distinct members, pointer hosts, and who
restores the copies of a dead member."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.ring.hashring import HashRing
from meshkv.ring.placement import pointer_hosts, replica_targets, stray_pointers, to_restore
from tests.test_node import keys_for

MEMBERS = [f"m{i}/0" for i in range(6)]
KEYS = [k for salt in range(40) for k in keys_for(2, salt=str(salt))]


def test_replicas_are_distinct_members_and_never_the_pusher() -> None:
    ring = HashRing(MEMBERS)
    targets = replica_targets(ring, KEYS, 3, me="m0/0")
    assert "m0/0" not in targets
    for key in KEYS:
        holders = [name for name, keys in targets.items() if key in keys]
        assert len(holders) == len(set(holders))
        expected = [n for n in ring.preference_list(key, 3) if n != "m0/0"]
        assert sorted(holders) == sorted(expected)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_pointer_host_is_the_member_after_the_replicas(replicas: int) -> None:
    ring = HashRing(MEMBERS)
    hosts = pointer_hosts(ring, KEYS, replicas, me="nobody")
    for key in KEYS:
        (host,) = [name for name, keys in hosts.items() if key in keys]
        assert host == ring.preference_list(key, replicas + 1)[replicas]
        assert host not in ring.preference_list(key, replicas)


def test_no_pointer_host_when_every_member_is_a_replica() -> None:
    assert pointer_hosts(HashRing(MEMBERS[:2]), KEYS, 2, me="m0/0") == {}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from(MEMBERS))
def test_after_a_death_exactly_one_survivor_restores_each_copy_it_held(
    replicas: int, gone: str
) -> None:
    before = HashRing(MEMBERS)
    after = before.without_member(gone)
    restorers: dict[bytes, list[str]] = {}
    for me in after.members:
        held = [k for k in KEYS if me in before.preference_list(k, replicas)]
        for key in to_restore(after, gone, held, replicas, me=me):
            restorers.setdefault(key, []).append(me)
    for key in KEYS:
        replicas_before = before.preference_list(key, replicas)
        survived = gone in replicas_before and len(replicas_before) > 1  # a copy is left
        assert len(restorers.get(key, [])) == (1 if survived else 0)


def test_a_restarted_member_gets_its_copies_back_from_the_first_other_replica() -> None:
    ring = HashRing(MEMBERS)  # m1 is on it again, with a new and empty boot
    restored: list[bytes] = []
    for me in ring.members:
        held = [k for k in KEYS if me in ring.preference_list(k, 2) and me != "m1/0"]
        for key in to_restore(ring, "m1/0", held, 2, me=me):
            names = ring.preference_list(key, 2)
            assert "m1/0" in names and next(n for n in names if n != "m1/0") == me
            restored.append(key)
    assert sorted(restored) == sorted(k for k in KEYS if "m1/0" in ring.preference_list(k, 2))


def test_nothing_to_restore_on_a_ring_of_the_lost_member_alone() -> None:
    assert to_restore(HashRing(["m1/0"]), "m1/0", KEYS, 2, me="m0/0") == []


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_a_copy_away_from_its_replicas_is_pointed_out_to_its_replicas_and_pointer_host(
    replicas: int,
) -> None:
    ring = HashRing(MEMBERS)
    targets = stray_pointers(ring, KEYS, replicas, me="m0/0")
    assert "m0/0" not in targets
    for key in KEYS:
        names = ring.preference_list(key, replicas + 1)
        pointed = sorted(name for name, keys in targets.items() if key in keys)
        if "m0/0" in names[:replicas]:
            assert pointed == []  # a replica: readers ask it anyway
        else:
            assert pointed == sorted(n for n in names if n != "m0/0")


def test_no_stray_pointers_on_an_empty_ring() -> None:
    assert stray_pointers(HashRing([]), KEYS, 2, me="m0/0") == {}
