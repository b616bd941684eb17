"""SortedPoints: the slice-table successor search equals a linear scan; past the last point the
successor is the wrapped copy of the first point."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.ring.points import SLICE_SEARCH_MIN_POSITIONS, SortedPoints

TOP = 2**64 - 1
anywhere = st.integers(0, TOP)
# Points packed into a narrow stretch put many points into one slice.
clustered = st.integers(0, 2**40).map(lambda offset: 2**63 + offset)
point_lists = st.lists(st.one_of(anywhere, clustered), min_size=1, max_size=300)


def reference(points: list[int], position: int) -> int:
    """Index of the first point >= position; len(points) (the wrapped first point) if none."""
    return next((i for i, point in enumerate(points) if point >= position), len(points))


@settings(max_examples=200, deadline=None)
@given(point_lists, st.lists(st.one_of(anywhere, clustered), max_size=60))
def test_successors_match_a_linear_scan(points: list[int], extra: list[int]) -> None:
    points.sort()
    where = [0, 1, TOP - 1, TOP, *extra]
    where += points + [(p + 1) & TOP for p in points] + [(p - 1) & TOP for p in points]
    ring = SortedPoints(np.array(points, dtype=np.uint64))
    expected = [reference(points, w) for w in where]
    assert ring.successors(np.array(where, dtype=np.uint64)).tolist() == expected
    assert ring.wrapped.tolist() == [*points, points[0]]
    # Large batches take the slice table instead of a binary search.
    copies = SLICE_SEARCH_MIN_POSITIONS // len(where) + 1
    batch = np.array(where * copies, dtype=np.uint64)
    assert ring.successors(batch).tolist() == expected * copies


@pytest.mark.parametrize("copies", [1, SLICE_SEARCH_MIN_POSITIONS])
def test_a_point_at_the_top_of_the_ring_is_found(copies: int) -> None:
    points = SortedPoints(np.array([5, TOP], dtype=np.uint64))
    found = points.successors(np.array([6, TOP, 0, 5] * copies, dtype=np.uint64))
    assert found.tolist() == [1, 1, 0, 0] * copies
    assert points.successors(np.array([TOP] * copies, dtype=np.uint64)).tolist() == [1] * copies


@pytest.mark.parametrize("copies", [1, SLICE_SEARCH_MIN_POSITIONS])
def test_one_crowded_slice_of_many_equal_points(copies: int) -> None:
    points = SortedPoints(np.array([7] * 50 + [2**63] * 50, dtype=np.uint64))
    found = points.successors(np.array([0, 7, 8, 2**63, 2**63 + 1] * copies, dtype=np.uint64))
    assert found.tolist() == [0, 0, 50, 50, 100] * copies
