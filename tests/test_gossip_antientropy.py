"""Push-pull: interval scaling, splitting tables into frames, merging remote records."""

from __future__ import annotations

import dataclasses

import pytest

from meshkv.gossip.antientropy import push_pull_interval_s, split_records, updates_from_record
from meshkv.gossip.member import MemberState
from meshkv.gossip.messages import MemberRecord, wire_bytes
from meshkv.gossip.updates import Alive, Dead, Suspect


@pytest.mark.parametrize(
    ("n", "expected_s"), [(1, 10.0), (32, 10.0), (33, 20.0), (64, 20.0), (65, 30.0), (1000, 60.0)]
)
def test_interval_grows_with_size(n: int, expected_s: float) -> None:
    assert push_pull_interval_s(10.0, n) == pytest.approx(expected_s)


def _record(i: int, state: MemberState = MemberState.ALIVE) -> MemberRecord:
    return MemberRecord(name=f"m{i}/0", nonce=i, address=f"10.0.0.{i % 250}:7946",
                        incarnation=1000 + i, state=state, meta={"ns": "x" * (i % 40)})  # fmt: skip


def test_split_records_fits_each_part() -> None:
    records = [_record(i) for i in range(500)]
    parts = split_records(records, budget_bytes=1500)
    assert [r for part in parts for r in part] == records
    for part in parts:
        assert sum(wire_bytes(r.to_wire()) for r in part) <= 1500
    assert split_records([], 1500) == [[]]


@pytest.mark.parametrize(
    ("state", "kinds"),
    [
        (MemberState.ALIVE, [Alive]),
        (MemberState.SUSPECT, [Alive, Suspect]),
        (MemberState.DEAD, [Suspect]),  # a remote death is only a suspicion here
        (MemberState.LEFT, [Dead]),
    ],
)
def test_record_to_updates(state: MemberState, kinds: list[type]) -> None:
    updates = updates_from_record(_record(3, state), source="peer/0")
    assert [type(u) for u in updates] == kinds
    for update in updates:
        assert (update.name, update.nonce, update.incarnation) == ("m3/0", 3, 1003)
        # trusted construction equals validated construction, bytes included
        rebuilt = type(update)(**{f: getattr(update, f) for f in _fields(update)})
        assert rebuilt == update and rebuilt.packed() == update.packed()
    if state is MemberState.LEFT:
        assert updates[0].left and updates[0].source == "peer/0"


def _fields(update: object) -> list[str]:
    return [f.name for f in dataclasses.fields(update) if f.init]  # type: ignore[arg-type]
