"""Lifeguard local health: the score bounds and the timeout scaling."""

from __future__ import annotations

import pytest

from meshkv.gossip.awareness import Awareness, clamped_score, scaled_s


@pytest.mark.parametrize(
    ("score", "delta", "max_multiplier", "expected"),
    [(0, -1, 8, 0), (0, 1, 8, 1), (6, 3, 8, 7), (7, 1, 8, 7), (3, -2, 8, 1), (0, 5, 1, 0)],
)
def test_clamped_score(score: int, delta: int, max_multiplier: int, expected: int) -> None:
    assert clamped_score(score, delta, max_multiplier) == expected


@pytest.mark.parametrize(("timeout_s", "score", "expected_s"), [(0.5, 0, 0.5), (0.5, 3, 2.0)])
def test_scaled(timeout_s: float, score: int, expected_s: float) -> None:
    assert scaled_s(timeout_s, score) == pytest.approx(expected_s)


def test_awareness_backs_off_and_recovers() -> None:
    health = Awareness(max_multiplier=4)
    for _ in range(10):
        health.apply(1)
    assert health.scale(1.0) == pytest.approx(4.0)
    for _ in range(10):
        health.apply(-1)
    assert health.scale(1.0) == pytest.approx(1.0)
