"""The broadcast queue: least-sent first, newest first among equals, replaced, bounded."""

from __future__ import annotations

import pytest

from meshkv.gossip.broadcast import BroadcastQueue, retransmit_limit


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [(3, 1, 3), (3, 9, 7), (3, 16, 9), (3, 64, 13), (3, 1000, 21), (2.5, 1000, 18), (0, 64, 0)],
)
def test_retransmit_limit(mult: float, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


def test_least_sent_first_then_newest() -> None:
    queue = BroadcastQueue(max_entries=10)
    for key in "abc":
        queue.put(key, key, 10)
    assert queue.take(1000, 2, limit=5) == ["c", "b"]
    assert queue.take(1000, 2, limit=5) == ["a", "c"]  # a was never sent, c and b once
    queue.put("d", "d", 10)
    assert queue.take(1000, 1, limit=5) == ["d"]


def test_each_update_is_sent_limit_times() -> None:
    queue = BroadcastQueue(max_entries=10)
    queue.put("a", "a", 10)
    sent = [queue.take(1000, 5, limit=3) for _ in range(5)]
    assert sent == [["a"], ["a"], ["a"], [], []]
    assert len(queue) == 0


def test_newer_update_replaces_and_restarts_count() -> None:
    queue = BroadcastQueue(max_entries=10)
    queue.put("a", "a1", 10)
    queue.take(1000, 5, limit=2)
    queue.put("a", "a2", 10)
    assert len(queue) == 1
    assert queue.take(1000, 5, limit=2) == ["a2"]
    assert queue.take(1000, 5, limit=2) == ["a2"]
    assert queue.take(1000, 5, limit=2) == []


def test_budget_skips_what_does_not_fit_and_keeps_it() -> None:
    queue = BroadcastQueue(max_entries=10)
    queue.put("small", "small", 10)
    queue.put("big", "big", 100)
    assert queue.take(50, 5, limit=3) == ["small"]
    assert queue.take(200, 5, limit=3) == ["big", "small"]


def test_full_queue_drops_the_most_sent() -> None:
    queue = BroadcastQueue(max_entries=2)
    queue.put("a", "a", 10)
    queue.take(1000, 1, limit=9)  # a sent once
    queue.put("b", "b", 10)
    queue.put("c", "c", 10)  # full: a goes
    assert queue.dropped_full == 1
    assert sorted(queue.take(1000, 5, limit=9)) == ["b", "c"]


def test_replacements_never_pile_up() -> None:
    queue = BroadcastQueue(max_entries=4)
    for round_ in range(10_000):
        queue.put("flapping", round_, 10)
    assert queue._stale <= len(queue) + 16
    assert sum(len(b) for b in queue._buckets) <= 32
    assert queue.take(1000, 5, limit=2) == [9999]
