"""Probe positions (vectorized and scalar agree, follow the documented formula) and the
multi-probe share model."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkv.ring.probes import (
    MAX_PROBES,
    multi_probe_arc_loads,
    probe_positions,
    probe_positions_of,
)
from tests.test_ring import fmix64

MASK_64 = 2**64 - 1


@given(st.lists(st.integers(0, MASK_64), min_size=1, max_size=40), st.integers(1, MAX_PROBES))
def test_vectorized_and_scalar_probes_follow_the_formula(where: list[int], probes: int) -> None:
    table = probe_positions(np.array(where, dtype=np.uint64), probes)
    assert table.shape == (probes, len(where))
    for column, position in enumerate(where):
        expected = [position] + [
            fmix64(position ^ ((j * 0x9E3779B97F4A7C15) & MASK_64)) for j in range(1, probes)
        ]
        assert probe_positions_of(position, probes) == expected
        assert table[:, column].tolist() == expected


def test_one_probe_loads_are_the_arcs() -> None:
    arcs = np.random.default_rng(1).dirichlet(np.ones(50))
    assert multi_probe_arc_loads(arcs, 1) == pytest.approx(arcs)


@pytest.mark.parametrize("probes", [2, 4, 8])
def test_probe_loads_sum_to_one_and_even_out_long_arcs(probes: int) -> None:
    arcs = np.random.default_rng(2).dirichlet(np.ones(200))
    loads = multi_probe_arc_loads(arcs, probes)
    assert loads.sum() == pytest.approx(1.0)
    assert np.all(np.diff(loads[np.argsort(arcs)]) >= -1e-15)  # a longer arc never wins less
    assert loads.max() / loads.mean() < arcs.max() / arcs.mean()


def test_probe_loads_of_equal_arcs_are_equal() -> None:
    assert multi_probe_arc_loads(np.full(10, 0.1), 4) == pytest.approx(np.full(10, 0.1))
