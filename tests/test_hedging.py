"""The hedging rule (`meshkv.node.hedging`): hedge delays from round trips, and whom to avoid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane.config import DataPlaneConfig
from meshkv.errors import ConfigError
from meshkv.node.hedging import AvoidList, RoundTrips, quantile

CONFIG = DataPlaneConfig(
    hedge_samples_min=4,
    round_trip_samples_max=8,
    hedge_delay_min_s=0.01,
    hedge_delay_max_s=0.2,
    hedge_delay_initial_s=0.05,
    hedge_quantile=0.99,
    avoid_hold_s=5.0,
    avoid_members_max=2,
)


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        ([3.0], 0.99, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0.75, 3.0),
        ([4.0, 3.0, 2.0, 1.0], 1.0, 4.0),
        (list(range(1, 101)), 0.99, 99),
        (list(range(1, 101)), 0.01, 1),
    ],
)
def test_quantile_is_the_nearest_rank(samples: list[float], q: float, expected: float) -> None:
    assert quantile(samples, q) == expected


@given(st.lists(st.floats(0, 10), min_size=1, max_size=50), st.floats(0.01, 1))
def test_quantile_is_one_of_the_samples_and_grows_with_q(samples: list[float], q: float) -> None:
    assert quantile(samples, q) in samples
    assert quantile(samples, q) <= quantile(samples, 1.0) == max(samples)


@pytest.mark.parametrize(
    ("samples", "expected_s"),
    [
        ([], 0.05),  # a fresh member: the initial delay
        ([0.001, 0.001, 0.001], 0.05),  # still fewer than hedge_samples_min
        ([0.001] * 4, 0.01),  # a quiet mesh: the lower bound
        ([0.03] * 4, 0.03),  # the observed p99
        ([0.001] * 3 + [0.15], 0.15),  # p99 of 4 samples is the slowest
        ([0.001] * 3 + [5.0], 0.2),  # one stall does not stretch it past the upper bound
        ([5.0] + [0.001] * 8, 0.01),  # the stall slid out of the window of 8
    ],
)
def test_the_hedge_delay_follows_the_round_trips_within_its_bounds(
    samples: list[float], expected_s: float
) -> None:
    trips = RoundTrips(CONFIG)
    for sample in samples:
        trips.record(sample)
    assert trips.hedge_delay_s() == pytest.approx(expected_s)
    assert len(trips) == min(len(samples), 8)


def test_a_full_window_recomputes_its_delay_once_per_sixteen_new_samples() -> None:
    config = DataPlaneConfig()  # a window of 512: recomputed every 16 samples
    trips = RoundTrips(config)
    for _ in range(512):
        trips.record(0.001)
    assert trips.hedge_delay_s() == config.hedge_delay_min_s
    for _ in range(15):
        trips.record(0.2)
    assert trips.hedge_delay_s() == config.hedge_delay_min_s  # 15 new: not recomputed yet
    trips.record(0.2)
    assert trips.hedge_delay_s() == 0.2  # 16 slow of 512 is past the 99th percentile


def test_an_avoided_member_is_asked_last_until_a_reply_clears_it() -> None:
    avoided = AvoidList(CONFIG)
    avoided.avoid("b", now_s=100.0)
    assert avoided.order(["b", "c", "d"], now_s=101.0) == ["c", "d", "b"]
    assert avoided.order(["c", "d"], now_s=101.0) == ["c", "d"]
    avoided.clear("b")
    assert avoided.order(["b", "c"], now_s=101.0) == ["b", "c"]


def test_an_avoided_member_is_tried_first_again_after_the_hold() -> None:
    avoided = AvoidList(CONFIG)
    avoided.avoid("b", now_s=100.0)
    assert avoided.is_avoided("b", now_s=104.9)
    assert not avoided.is_avoided("b", now_s=105.0)
    assert avoided.order(["b", "c"], now_s=105.0) == ["b", "c"]
    assert len(avoided) == 0


def test_avoiding_again_restarts_the_hold() -> None:
    avoided = AvoidList(CONFIG)
    avoided.avoid("b", now_s=100.0)
    avoided.avoid("b", now_s=104.0)
    assert avoided.is_avoided("b", now_s=108.0)


def test_past_the_bound_the_member_avoided_longest_ago_is_forgotten() -> None:
    avoided = AvoidList(CONFIG)
    for at_s, name in enumerate(["a", "b", "c"]):
        avoided.avoid(name, now_s=100.0 + at_s)
    assert len(avoided) == 2
    assert not avoided.is_avoided("a", now_s=103.0)
    assert avoided.order(["c", "b", "a"], now_s=103.0) == ["a", "c", "b"]


def test_a_zero_hold_never_avoids() -> None:
    avoided = AvoidList(DataPlaneConfig(avoid_hold_s=0))
    avoided.avoid("b", now_s=1.0)
    assert avoided.order(["b", "c"], now_s=1.0) == ["b", "c"]


@pytest.mark.parametrize(
    ("knobs", "key"),
    [
        ({"hedge_quantile": 0}, "dataplane.hedge_quantile"),
        ({"hedge_quantile": 1.5}, "dataplane.hedge_quantile"),
        ({"hedge_delay_min_s": 0.5, "hedge_delay_max_s": 0.1}, "dataplane.hedge_delay_max_s"),
        ({"hedge_delay_min_s": -1}, "dataplane.hedge_delay_min_s"),
        ({"hedge_samples_min": 0}, "dataplane.hedge_samples_min"),
        (
            {"hedge_samples_min": 10, "round_trip_samples_max": 5},
            "dataplane.round_trip_samples_max",
        ),
        ({"avoid_members_max": 0}, "dataplane.avoid_members_max"),
        ({"avoid_hold_s": -1}, "dataplane.avoid_hold_s"),
    ],
)
def test_bad_hedging_knobs_name_the_key(knobs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DataPlaneConfig(**knobs)
