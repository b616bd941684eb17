"""Lifeguard suspicion timing: pure functions checked against a table of cases."""

from __future__ import annotations

import math

import pytest

from meshkv.gossip.suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_min_timeout_s,
    suspicion_timeout_s,
)


@pytest.mark.parametrize(
    ("mult", "n", "interval_s", "expected_s"),
    [
        (4, 1, 1.0, 4.0),  # log10 scale never below 1
        (4, 10, 1.0, 4.0),
        (4, 100, 1.0, 8.0),
        (4, 1000, 0.5, 6.0),
        (2.5, 64, 0.25, 2.5 * math.log10(64) * 0.25),
        (2.5, 0, 0.25, 0.625),
    ],
)
def test_min_timeout(mult: float, n: int, interval_s: float, expected_s: float) -> None:
    assert suspicion_min_timeout_s(mult, n, interval_s) == pytest.approx(expected_s)


@pytest.mark.parametrize(
    ("wanted", "n", "expected"),
    [(2, 64, 2), (2, 4, 2), (2, 3, 0), (3, 4, 0), (0, 100, 0)],
)
def test_expected_confirmations(wanted: int, n: int, expected: int) -> None:
    assert expected_confirmations(wanted, n) == expected


@pytest.mark.parametrize(
    ("confirmations", "k", "expected_s"),
    [
        (0, 3, 30.0),  # starts at the maximum
        (1, 3, 30.0 - 20.0 * math.log(2) / math.log(4)),
        (2, 3, 30.0 - 20.0 * math.log(3) / math.log(4)),
        (3, 3, 10.0),  # k confirmations: the minimum
        (5, 3, 10.0),
        (0, 0, 10.0),  # nobody to confirm: the minimum at once
    ],
)
def test_timeout_shrinks_with_confirmations(confirmations: int, k: int, expected_s: float) -> None:
    assert suspicion_timeout_s(confirmations, k, 10.0, 30.0) == pytest.approx(expected_s)


def test_timeout_never_below_min_or_above_max() -> None:
    for k in range(0, 6):
        previous = math.inf
        for n in range(0, 8):
            timeout_s = suspicion_timeout_s(n, k, 2.0, 6.0)
            assert 2.0 <= timeout_s <= 6.0
            assert timeout_s <= previous
            previous = timeout_s


def test_confirmations_are_distinct_and_bounded() -> None:
    suspicion = Suspicion(start_s=100.0, min_s=1.0, max_s=3.0, k=2, first_source="a/0")
    assert suspicion.deadline_s == pytest.approx(103.0)
    assert not suspicion.confirm("a/0")  # the first suspector does not confirm itself
    assert suspicion.confirm("b/0")
    assert not suspicion.confirm("b/0")
    assert suspicion.confirm("c/0")
    assert suspicion.deadline_s == pytest.approx(101.0)
    assert not suspicion.confirm("d/0")  # k reached
