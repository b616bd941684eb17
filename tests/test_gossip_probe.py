"""Probe order (shuffled round robin) and the relay table's bound and expiry."""

from __future__ import annotations

import random

from meshkv.gossip.probe import ProbeOrder, Relay, RelayTable


def test_every_member_probed_once_per_round() -> None:
    names = [f"m{i}" for i in range(20)]
    order = ProbeOrder(random.Random(1))
    for _ in range(3):
        round_ = [order.next(lambda: names, lambda n: True) for _ in names]
        assert sorted(round_) == sorted(names)  # type: ignore[type-var]


def test_new_member_probed_within_the_round_and_ineligible_skipped() -> None:
    names = [f"m{i}" for i in range(10)]
    order = ProbeOrder(random.Random(2))
    first = order.next(lambda: names, lambda n: n != "m3")
    names.append("new")
    order.add("new")
    rest = [order.next(lambda: names, lambda n: n != "m3") for _ in range(9)]
    assert "m3" not in [first, *rest]
    assert "new" in rest
    assert ProbeOrder(random.Random(3)).next(lambda: [], lambda n: True) is None


def test_relay_table_expires_in_order_and_is_bounded() -> None:
    table = RelayTable(max_pending=2)
    table.add(1, Relay("a:1", 10, 1.0))
    table.add(2, Relay("b:1", 20, 2.0))
    assert table.full()
    assert table.next_deadline_s() == 1.0
    assert table.pop(2) == Relay("b:1", 20, 2.0)
    assert [r.origin_seq for r in table.pop_expired(1.5)] == [10]
    assert table.next_deadline_s() == float("inf")
